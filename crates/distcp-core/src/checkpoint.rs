//! An open checkpoint folder: its validated metadata, its data files (opened once, read positionally), each
//! chunk's record resolved once into a [`ResolvedChunk`], and reads of whole tensors, boxes of tensors and
//! non-tensor values.
//!
//! The flow: `.metadata` → [`Metadata::validate`] → [`Checkpoint::plan_read`] ([`plan_region`], then each chunk
//! resolved) → executor ([`BoxRead::copy_into`], [`copy_resolved`] on the host; the CUDA executor) → destination.

use crate::copy::{copy_resolved, CopyError};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::exec::row_major_strides;
use crate::layout::{self, Found, Layout, LayoutKind};
use crate::limits::{self, checked_nbytes};
use crate::metadata::{ItemMetadata, Metadata, PathElem, StorageInfo, StorageKey, TensorMetadata};
use crate::plan::{check_region, plan_region, ChunkRead, Region};
use crate::source::{open_regular, FileRegion};
pub use crate::source::{DataFile, Fixup, ResolvedChunk, Source};
use crate::torch_save::{self, PickleMemo, PyObject, RecordError, TensorRecord};
use crate::write::save::is_rank_metadata;
use crate::zip::ZipError;
use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::io::Read;
use std::ops::Range;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};

/// A whole stored record in memory (for tools and tests; reads use [`Checkpoint::resolve`]).
#[derive(Debug, Clone)]
pub struct Blob {
  path: PathBuf,
  bytes: Arc<[u8]>,
}

impl Blob {
  /// The record's bytes, with any transform (compression) undone.
  pub fn bytes(&self) -> &[u8] {
    &self.bytes
  }

  /// The data file the record was read from.
  pub fn path(&self) -> &Path {
    &self.path
  }
}

/// Where one chunk of a tensor is stored.
#[derive(Debug, Clone)]
pub struct ChunkLocation {
  /// Where the chunk starts in the whole tensor, per dimension.
  pub offsets: Vec<u64>,
  /// The chunk's extent per dimension.
  pub sizes: Vec<u64>,
  /// The data file and byte range holding the chunk's record.
  pub info: StorageInfo,
}

/// What [`Checkpoint::summary`] reports.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
  /// `.metadata` or `__{rank}.metadata`.
  pub metadata_file: String,
  /// The DCP metadata version torch recorded (`None` before torch wrote one).
  pub version: Option<String>,
  /// The module torch pickled `TensorProperties` from (it moved between torch versions).
  pub tensor_properties_module: Option<String>,
  /// The `save_id` of the storage metadata, if torch recorded one.
  pub save_id: Option<String>,
  /// The `checkpoint_id` of the storage metadata, if torch recorded one.
  pub checkpoint_id: Option<String>,
  /// Data files, sorted.
  pub files: Vec<String>,
  /// Number of ranks that wrote data files (`__{rank}_{n}.distcp`).
  pub ranks: usize,
  /// Whether `.metadata` carries `planner_data` (each key's path in the nested state dict).
  pub has_planner_data: bool,
  /// Whether `.metadata` carries `storage_meta` (torch ≥ 2.4 writers).
  pub has_storage_meta: bool,
  /// [`LayoutKind::name`]: `dcp`, `dcp-safetensors`, `hf-storage-sharded`, `hf-safetensors`.
  pub layout: &'static str,
  /// Which writer produced the checkpoint, in words.
  pub writer: String,
  /// The NeMo-RL weights folder the checkpoint was found in, if any.
  pub nemo_rl_weights: Option<String>,
  /// The tokenizer saved beside a NeMo-RL run's weights (`policy/tokenizer`), if any.
  pub tokenizer_beside: Option<String>,
  /// The oldest torch (major, minor) whose `dcp.load` reads this `.metadata` (see [`Metadata::oldest_torch`]);
  /// `None` for the layouts without one (torch's HF storage reader: torch ≥ 2.9).
  pub oldest_torch: Option<(u32, u32)>,
}

type ChunkId = (String, usize);

/// Resolved chunks of an open checkpoint. File-backed ones are small and kept for good; decompressed ones are
/// kept up to [`limits::RESOLVED_MEMORY_CACHE_BYTES`], the least recently resolved dropped first.
#[derive(Debug, Default)]
struct ResolvedCache {
  chunks: HashMap<ChunkId, Arc<ResolvedChunk>>,
  in_memory: VecDeque<(ChunkId, u64)>,
  memory_bytes: u64,
}

impl ResolvedCache {
  fn insert(&mut self, id: ChunkId, chunk: Arc<ResolvedChunk>) {
    if let Source::Memory(bytes) = &chunk.source {
      let n = bytes.len() as u64;
      self.in_memory.push_back((id.clone(), n));
      self.memory_bytes += n;
      while self.memory_bytes > limits::RESOLVED_MEMORY_CACHE_BYTES && self.in_memory.len() > 1 {
        if let Some((old, n)) = self.in_memory.pop_front() {
          self.chunks.remove(&old);
          self.memory_bytes -= n;
        }
      }
    }
    self.chunks.insert(id, chunk);
  }
}

/// A read of one box of one tensor, planned and resolved once ([`Checkpoint::plan_read`]): which chunks it
/// touches, what of each, and where their bytes are. The caller paces it: [`BoxRead::will_need`] starts the disk
/// (before faulting in a destination, say), [`BoxRead::copy_into`] copies on several threads, and
/// [`BoxRead::copy_here`] on the caller's thread only. [`Checkpoint::read_into`] is `will_need`, then `copy_into`.
pub struct BoxRead<'a> {
  ck: &'a Checkpoint,
  key: &'a str,
  region: &'a Region,
  plan: Vec<ChunkRead>,
  chunks: Vec<Arc<ResolvedChunk>>,
  dtype: DType,
  bytes: u64,
}

impl BoxRead<'_> {
  /// Bytes of the box (row-major): what the destination must hold.
  pub fn bytes(&self) -> u64 {
    self.bytes
  }

  /// Asks the kernel to start reading what each chunk read needs of its chunk (asynchronous readahead of the
  /// extent the box spans, not whole chunks; nothing is copied).
  pub fn will_need(&self) {
    for (read, chunk) in self.plan.iter().zip(&self.chunks) {
      crate::copy::will_need(chunk, read, &self.region.sizes);
    }
  }

  /// Copies the box into `dst`. Chunks that each fill whole rows of it (sharded on dim 0, the common case) are
  /// copied on several threads at once: more reads in flight for the disk, and every core copying when the data
  /// is cached.
  pub fn copy_into(&self, dst: &mut [u8]) -> Result<()> {
    self.check_dst(dst)?;
    if let Some(slabs) = whole_row_slabs(&self.plan, self.region, self.dtype.size() as u64) {
      return self.copy_slabs_in_parallel(slabs, dst);
    }
    self.copy_chunks(dst)
  }

  /// Copies the box into `dst` on this thread only: for a caller that already keeps the cores busy (a
  /// conversion's slab readers) and asked for readahead once for many such reads.
  pub fn copy_here(&self, dst: &mut [u8]) -> Result<()> {
    self.check_dst(dst)?;
    self.copy_chunks(dst)
  }

  fn check_dst(&self, dst: &[u8]) -> Result<()> {
    if self.bytes == dst.len() as u64 {
      return Ok(());
    }
    Err(self.ck.bad_request(
      self.key,
      format!(
        "the destination holds {} bytes, the {} box {:?} needs {}",
        dst.len(),
        self.dtype,
        self.region.sizes,
        self.bytes
      ),
    ))
  }

  fn copy_chunks(&self, dst: &mut [u8]) -> Result<()> {
    for (read, chunk) in self.plan.iter().zip(&self.chunks) {
      copy_resolved(chunk, read, dst, &self.region.sizes)
        .map_err(|e| self.ck.copy_error(chunk, self.key, e))?;
    }
    Ok(())
  }

  fn copy_slabs_in_parallel(&self, slabs: Vec<(usize, Range<usize>)>, dst: &mut [u8]) -> Result<()> {
    let mut parts: Vec<(usize, &mut [u8])> = Vec::with_capacity(slabs.len());
    let mut rest = dst;
    let mut at = 0;
    for (i, range) in slabs {
      let (_, tail) = std::mem::take(&mut rest).split_at_mut(range.start - at);
      let (mine, tail) = tail.split_at_mut(range.len());
      parts.push((i, mine));
      rest = tail;
      at = range.end;
    }
    let threads = crate::threads::cores().min(parts.len());
    let per = parts.len().div_ceil(threads);
    let (ck, key, plan, chunks) = (self.ck, self.key, &self.plan, &self.chunks);
    std::thread::scope(|s| {
      let mut handles = Vec::new();
      let mut parts = parts;
      while !parts.is_empty() {
        let batch: Vec<(usize, &mut [u8])> = parts.drain(..per.min(parts.len())).collect();
        handles.push(s.spawn(move || -> Result<()> {
          for (i, out) in batch {
            let read = &plan[i];
            let mut local = read.clone();
            local.dst_start = vec![0; read.dst_start.len()];
            copy_resolved(&chunks[i], &local, out, &read.lengths)
              .map_err(|e| ck.copy_error(&chunks[i], key, e))?;
          }
          Ok(())
        }));
      }
      handles
        .into_iter()
        .try_for_each(|h| h.join().unwrap_or_else(|_| Err(ck.bad_request(key, "a reader thread panicked"))))
    })
  }
}

/// A record's bytes before parsing: a range of a data file, or decompressed in memory.
enum RecordBytes {
  File { file: Arc<DataFile>, offset: u64, len: u64 },
  Memory { path: PathBuf, bytes: Vec<u8> },
}

impl RecordBytes {
  fn path(&self) -> &Path {
    match self {
      RecordBytes::File { file, .. } => &file.path,
      RecordBytes::Memory { path, .. } => path,
    }
  }

  fn parse(&self, memo: &PickleMemo) -> std::result::Result<PyObject, RecordError> {
    match self {
      RecordBytes::File { file, offset, len } => {
        torch_save::parse_with(&FileRegion { file, offset: *offset, len: *len }, Some(memo))
      }
      RecordBytes::Memory { bytes, .. } => torch_save::parse_with(&bytes[..], Some(memo)),
    }
  }

  /// The storage of `rec` (a tensor of this record) as a source.
  fn storage(&self, rec: &TensorRecord) -> Source {
    match self {
      RecordBytes::File { file, offset, .. } => Source::File {
        file: file.clone(),
        offset: offset + rec.storage.start as u64,
        len: rec.storage.len() as u64,
      },
      RecordBytes::Memory { bytes, .. } => Source::Memory(Arc::from(&bytes[rec.storage.clone()])),
    }
  }
}

/// Reads at most `bound` decompressed bytes of a zstd stream; more is an error (a decompression bomb stops at
/// the bound, having allocated no more than it).
fn zstd_bounded(src: &[u8], bound: u64) -> std::result::Result<Vec<u8>, String> {
  let dec = zstd::stream::read::Decoder::new(src)
    .map_err(|e| format!("zstd-compressed item does not decompress: {e}"))?;
  let mut out = Vec::new();
  dec
    .take(bound.saturating_add(1))
    .read_to_end(&mut out)
    .map_err(|e| format!("zstd-compressed item does not decompress: {e}"))?;
  if out.len() as u64 > bound {
    return Err(format!(
      "zstd-compressed item decompresses to more than the {bound} bytes .metadata allows for it (stopped there)"
    ));
  }
  Ok(out)
}

/// An open DCP checkpoint folder: start here with [`Checkpoint::open`], then read tensors with
/// [`Checkpoint::read_tensor`] or [`Checkpoint::read_into`]. Safe to share between threads.
#[derive(Debug)]
pub struct Checkpoint {
  /// The folder as given to [`Checkpoint::open`].
  pub root: PathBuf,
  /// The metadata file that was read (`.metadata`, or a rank's `__{rank}.metadata`).
  pub metadata_path: PathBuf,
  /// The parsed and validated metadata: every key, its type, shape and chunks.
  pub metadata: Metadata,
  /// Which layout the folder holds and who wrote it.
  pub layout: Layout,
  canonical_root: PathBuf,
  files: Mutex<HashMap<String, Arc<DataFile>>>,
  /// Data files whose tensor chunks' storage entries point at plain row-major bytes (safetensors), not at
  /// `torch.save` records.
  raw_files: HashSet<String>,
  resolved: Mutex<ResolvedCache>,
  /// `data.pkl`s already unpickled, shared by every record of this checkpoint.
  pickles: PickleMemo,
}

/// When every read covers whole rows of `region` and there are several worth splitting, each read's byte range of
/// the destination, sorted by position; `None` otherwise.
fn whole_row_slabs(plan: &[ChunkRead], region: &Region, es: u64) -> Option<Vec<(usize, Range<usize>)>> {
  const MIN_PARALLEL_BYTES: u64 = 8 << 20;
  // one core (or none that can start a thread) gains nothing from a thread
  if plan.len() < 2
    || crate::threads::cores() < 2
    || region.sizes.is_empty()
    || checked_nbytes(&region.sizes, es as usize)? < MIN_PARALLEL_BYTES
  {
    return None;
  }
  let row_bytes = checked_nbytes(&region.sizes[1..], es as usize)?;
  let mut slabs = Vec::with_capacity(plan.len());
  for (i, r) in plan.iter().enumerate() {
    if r.lengths[1..] != region.sizes[1..] || r.dst_start[1..].iter().any(|&d| d != 0) {
      return None;
    }
    let start = usize::try_from(r.dst_start[0].checked_mul(row_bytes)?).ok()?;
    let len = usize::try_from(r.lengths[0].checked_mul(row_bytes)?).ok()?;
    slabs.push((i, start..start.checked_add(len)?));
  }
  slabs.sort_by_key(|(_, r)| r.start);
  // chunks never overlap in a valid checkpoint; refuse the parallel path (not the read) if these do
  slabs.windows(2).all(|w| w[0].1.end <= w[1].1.start).then_some(slabs)
}

fn check_relative_path(rel: &str) -> bool {
  let p = Path::new(rel);
  !rel.is_empty() && p.components().all(|c| matches!(c, Component::Normal(_))) && !rel.contains('\\')
}

/// Reads `.metadata` (a regular file, at most [`limits::MAX_METADATA_BYTES`]) into memory.
pub(crate) fn read_metadata_file(path: &Path) -> Result<Vec<u8>> {
  let (file, len) = open_regular(path)?;
  if len > limits::MAX_METADATA_BYTES {
    return Err(Error::LimitExceeded {
      path: path.to_path_buf(),
      what: "the .metadata file".into(),
      value: len,
      limit: limits::MAX_METADATA_BYTES,
      limit_name: "limits::MAX_METADATA_BYTES",
    });
  }
  let mut bytes = Vec::new();
  // the length from fstat sizes the buffer; a file growing meanwhile is cut at the limit
  bytes.try_reserve_exact(len as usize).map_err(|_| Error::OutOfMemory {
    path: path.to_path_buf(),
    key: ".metadata".into(),
    bytes: len,
  })?;
  file.take(limits::MAX_METADATA_BYTES + 1).read_to_end(&mut bytes).map_err(|e| Error::io(path, e))?;
  if bytes.len() as u64 > limits::MAX_METADATA_BYTES {
    return Err(Error::LimitExceeded {
      path: path.to_path_buf(),
      what: "the .metadata file".into(),
      value: bytes.len() as u64,
      limit: limits::MAX_METADATA_BYTES,
      limit_name: "limits::MAX_METADATA_BYTES",
    });
  }
  Ok(bytes)
}

impl Checkpoint {
  /// Opens the checkpoint at `root`, whichever layout it has (see [`crate::layout`]): `.metadata` (or a
  /// rank-local `__{rank}.metadata` when there is none) with `torch.save` records or safetensors blobs, a folder of
  /// safetensors files (torch's HF storage, Hugging Face), or a NeMo-RL run folder. The metadata is parsed (or
  /// built from the safetensors headers) and validated ([`Metadata::validate`]) before anything else is read.
  pub fn open(root: impl AsRef<Path>, rank: Option<u32>) -> Result<Checkpoint> {
    match layout::find(root.as_ref(), rank)? {
      Found::DcpMetadata { dir, metadata_path, nemo_rl } => Self::open_dcp(dir, metadata_path, nemo_rl),
      Found::Safetensors { dir, nemo_rl } => Self::open_safetensors(dir, nemo_rl),
    }
  }

  fn open_dcp(root: PathBuf, metadata_path: PathBuf, nemo_rl: Option<layout::NemoRl>) -> Result<Checkpoint> {
    let bytes = read_metadata_file(&metadata_path)?;
    let metadata = Metadata::parse(&bytes, &metadata_path)?;
    drop(bytes);
    if metadata_path.file_name().and_then(|n| n.to_str()).is_some_and(is_rank_metadata) {
      metadata.validate_rank_local(&metadata_path)?;
    } else {
      metadata.validate(&metadata_path)?;
    }
    let canonical_root = root.canonicalize().map_err(|e| Error::io(&root, e))?;
    // in key order, so the error names the first offending key the same way every time
    let mut unsafe_paths: Vec<(&StorageKey, &StorageInfo)> =
      metadata.storage_data.iter().filter(|(_, i)| !check_relative_path(&i.relative_path)).collect();
    unsafe_paths.sort_by_key(|(k, _)| metadata.items.iter().position(|(f, _)| *f == k.fqn));
    if let Some((key, info)) = unsafe_paths.first() {
      return Err(Error::UnsafePath {
        checkpoint: root.clone(),
        key: key.fqn.clone(),
        relative_path: info.relative_path.clone(),
      });
    }
    let layout = Layout {
      kind: LayoutKind::Dcp,
      writer: "torch.distributed.checkpoint FileSystemWriter (torch.save records)".into(),
      dir: root.clone(),
      nemo_rl,
    };
    let mut ck = Checkpoint {
      root,
      metadata_path,
      metadata,
      layout,
      canonical_root,
      files: Mutex::new(HashMap::new()),
      raw_files: HashSet::new(),
      resolved: Mutex::new(ResolvedCache::default()),
      pickles: PickleMemo::default(),
    };
    ck.find_safetensors_blobs()?;
    Ok(ck)
  }

  fn open_safetensors(root: PathBuf, nemo_rl: Option<layout::NemoRl>) -> Result<Checkpoint> {
    let (metadata, mut layout, files) = layout::read_folder(&root)?;
    let index = root.join(layout::HF_INDEX_FILE);
    let metadata_path = if index.is_file() { index } else { root.clone() };
    metadata.validate(&metadata_path)?;
    layout.nemo_rl = nemo_rl;
    let canonical_root = root.canonicalize().map_err(|e| Error::io(&root, e))?;
    Ok(Checkpoint {
      root,
      metadata_path,
      metadata,
      layout,
      canonical_root,
      raw_files: files.keys().cloned().collect(),
      files: Mutex::new(files),
      resolved: Mutex::new(ResolvedCache::default()),
      pickles: PickleMemo::default(),
    })
  }

  /// torch ≥ 2.9 with `serialization_format=SAFETENSORS` writes each data file as its non-tensor records
  /// followed by one safetensors blob holding every tensor chunk of the file (keyed by FQN, `saved_offsets` in
  /// `DCP_SHARDING_INFO`); `.metadata` gives each chunk the blob's start as offset. The blob headers are read
  /// and checked against `.metadata` here, and each chunk's storage entry is pointed at its bytes.
  fn find_safetensors_blobs(&mut self) -> Result<()> {
    let mut per_file: HashMap<&str, Vec<(&str, usize)>> = HashMap::new();
    for (key, item) in &self.metadata.items {
      if let ItemMetadata::Tensor(t) = item {
        for (i, c) in t.chunks.iter().enumerate() {
          let sk = StorageKey { fqn: key.clone(), offset: Some(c.offsets.clone()) };
          if let Some(info) = self.metadata.storage_data.get(&sk) {
            per_file.entry(info.relative_path.as_str()).or_default().push((key.as_str(), i));
          }
        }
      }
    }
    let mut updates: Vec<(StorageKey, StorageInfo)> = Vec::new();
    let mut raw = Vec::new();
    let mut rels: Vec<&str> = per_file.keys().copied().collect();
    rels.sort_unstable();
    for rel in rels {
      let chunks = &per_file[rel];
      let Some(&(key0, i0)) = chunks.first() else { continue };
      let base = self.storage_info(key0, Some(&self.tensor(key0)?.chunks[i0].offsets))?.offset;
      // a missing or short file is reported by the read that needs it, as for torch.save records
      let Ok(file) = self.data_file(key0, rel) else { continue };
      if !crate::safetensors::looks_like_header(&file, base) {
        // torch.save records: opened again when first read, exactly as without this look
        self.files.lock().unwrap_or_else(|p| p.into_inner()).remove(rel);
        continue;
      }
      let header = crate::safetensors::read_header(&file, base, file.len())?;
      let sharding = header.sharding_info(&file.path)?.unwrap_or_default();
      let bad = |reason: String| Error::SafetensorsHeader { path: file.path.clone(), reason };
      for &(key, i) in chunks {
        let t = self.tensor(key)?;
        let c = &t.chunks[i];
        let info = self.storage_info(key, Some(&c.offsets))?;
        if info.offset != base {
          return Err(bad(format!(
            "key `{key}`: .metadata puts this chunk at byte {}, not in the safetensors blob at byte {base}",
            info.offset
          )));
        }
        let Some(ht) = header.tensor(key) else {
          if c.numel() == 0 {
            continue;
          }
          return Err(bad(format!("key `{key}`: not in the file's safetensors blob")));
        };
        if sharding.get(key) != Some(&c.offsets) {
          return Err(bad(format!(
            "key `{key}`: DCP_SHARDING_INFO says saved_offsets {:?}, .metadata says {:?}",
            sharding.get(key),
            c.offsets
          )));
        }
        if ht.dtype != t.dtype() || ht.shape != c.sizes || ht.len != info.length {
          return Err(bad(format!(
            "key `{key}`: the blob holds {} {:?} ({} bytes), .metadata says {} {:?} ({} bytes)",
            ht.dtype,
            ht.shape,
            ht.len,
            t.dtype(),
            c.sizes,
            info.length
          )));
        }
        let sk = StorageKey { fqn: key.to_owned(), offset: Some(c.offsets.clone()) };
        updates.push((sk, StorageInfo { offset: ht.start, length: ht.len, ..info.clone() }));
      }
      raw.push(rel.to_owned());
    }
    if raw.is_empty() {
      return Ok(());
    }
    for (k, v) in updates {
      self.metadata.storage_data.insert(k, v);
    }
    self.raw_files.extend(raw);
    self.layout.kind = LayoutKind::DcpSafetensors;
    self.layout.writer =
      "torch.distributed.checkpoint FileSystemWriter(serialization_format=SAFETENSORS) (torch ≥ 2.9)".into();
    Ok(())
  }

  /// Every key of the flat state dict, in `.metadata` order.
  pub fn keys(&self) -> impl Iterator<Item = &str> {
    self.metadata.items.iter().map(|(k, _)| k.as_str())
  }

  /// What `.metadata` says about `key`: a tensor (dtype, shape, chunks) or a non-tensor value.
  pub fn item(&self, key: &str) -> Result<&ItemMetadata> {
    self
      .metadata
      .item(key)
      .ok_or_else(|| Error::NoSuchKey { checkpoint: self.root.clone(), key: key.to_owned() })
  }

  /// The tensor metadata of `key`; an error if `key` is missing or a non-tensor value.
  pub fn tensor(&self, key: &str) -> Result<&TensorMetadata> {
    match self.item(key)? {
      ItemMetadata::Tensor(t) => Ok(t),
      ItemMetadata::Bytes => Err(self.bad_request(key, "is not a tensor (it is a non-tensor value)")),
    }
  }

  fn bad_request(&self, key: &str, reason: impl Into<String>) -> Error {
    Error::BadRequest { checkpoint: self.root.clone(), key: key.to_owned(), reason: reason.into() }
  }

  fn storage_info(&self, fqn: &str, offset: Option<&[u64]>) -> Result<&StorageInfo> {
    let key = StorageKey { fqn: fqn.to_owned(), offset: offset.map(<[u64]>::to_vec) };
    self.metadata.storage_data.get(&key).ok_or_else(|| Error::Metadata {
      path: self.metadata_path.clone(),
      reason: match offset {
        Some(o) => format!("key `{fqn}`: no storage entry for the chunk at {o:?}"),
        None => format!("key `{fqn}`: no storage entry"),
      },
    })
  }

  /// Where each chunk of a tensor is stored.
  pub fn chunk_locations(&self, key: &str) -> Result<Vec<ChunkLocation>> {
    let t = self.tensor(key)?;
    t.chunks
      .iter()
      .map(|c| {
        Ok(ChunkLocation {
          offsets: c.offsets.clone(),
          sizes: c.sizes.clone(),
          info: self.storage_info(key, Some(&c.offsets))?.clone(),
        })
      })
      .collect()
  }

  /// Where the pickled record of non-tensor value `key` is stored.
  pub fn object_location(&self, key: &str) -> Result<StorageInfo> {
    Ok(self.storage_info(key, None)?.clone())
  }

  fn data_file(&self, key: &str, rel: &str) -> Result<Arc<DataFile>> {
    let mut files = self.files.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(f) = files.get(rel) {
      return Ok(f.clone());
    }
    let path = self.root.join(rel);
    let canonical = match path.canonicalize() {
      Ok(c) => c,
      Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
        return Err(Error::MissingDataFile {
          checkpoint: self.root.clone(),
          key: key.to_owned(),
          relative_path: rel.to_owned(),
        })
      }
      Err(e) => return Err(Error::io(path, e)),
    };
    // a symlink may not lead out of the checkpoint
    if !canonical.starts_with(&self.canonical_root) {
      return Err(Error::UnsafePath {
        checkpoint: self.root.clone(),
        key: key.to_owned(),
        relative_path: rel.to_owned(),
      });
    }
    let file = Arc::new(DataFile::open(path)?);
    files.insert(rel.to_owned(), file.clone());
    Ok(file)
  }

  /// The bytes of one stored item, bounds-checked, with any transform (zstd) undone; a decompressed item may be
  /// at most `bound` bytes.
  fn record_bytes(&self, key: &str, info: &StorageInfo, bound: u64) -> Result<RecordBytes> {
    let file = self.data_file(key, &info.relative_path)?;
    let file_len = file.len();
    if info.offset.checked_add(info.length).is_none_or(|end| end > file_len) {
      return Err(Error::OutOfBounds {
        path: file.path.clone(),
        key: key.to_owned(),
        offset: info.offset,
        end: info.offset.saturating_add(info.length),
        file_len,
      });
    }
    if info.transform_descriptors.is_empty() {
      return Ok(RecordBytes::File { file, offset: info.offset, len: info.length });
    }
    let path = file.path.clone();
    let mut bytes = Vec::new();
    bytes.try_reserve_exact(info.length as usize).map_err(|_| Error::OutOfMemory {
      path: path.clone(),
      key: key.to_owned(),
      bytes: info.length,
    })?;
    bytes.resize(info.length as usize, 0);
    file.read_exact_at(&mut bytes, info.offset).map_err(|f| f.into_error(&path, key))?;
    for d in &info.transform_descriptors {
      let name = d.split('/').next().unwrap_or("");
      if name != "stream.zstd" {
        return Err(Error::Unsupported {
          checkpoint: self.root.clone(),
          key: key.to_owned(),
          reason: format!("unknown stream transform `{d}`"),
        });
      }
      bytes = zstd_bounded(&bytes, bound).map_err(|reason| Error::Decompress {
        path: path.clone(),
        key: key.to_owned(),
        reason,
      })?;
    }
    Ok(RecordBytes::Memory { path, bytes })
  }

  /// The whole stored record of an item in memory, with any transform undone (for tools and tests).
  pub fn blob(&self, key: &str, info: &StorageInfo) -> Result<Blob> {
    match self.record_bytes(key, info, limits::MAX_DECOMPRESSED_BYTES)? {
      RecordBytes::Memory { path, bytes } => Ok(Blob { path, bytes: Arc::from(bytes) }),
      RecordBytes::File { file, offset, len } => {
        let mut bytes = Vec::new();
        bytes.try_reserve_exact(len as usize).map_err(|_| Error::OutOfMemory {
          path: file.path.clone(),
          key: key.to_owned(),
          bytes: len,
        })?;
        bytes.resize(len as usize, 0);
        file.read_exact_at(&mut bytes, offset).map_err(|f| f.into_error(&file.path, key))?;
        Ok(Blob { path: file.path.clone(), bytes: Arc::from(bytes) })
      }
    }
  }

  fn record_error(&self, path: &Path, key: &str, e: RecordError) -> Error {
    let path = path.to_path_buf();
    match e {
      RecordError::Zip(ZipError::Compressed { entry, method }) => {
        Error::CompressedEntry { path, key: key.to_owned(), entry, method }
      }
      RecordError::Zip(ZipError::Malformed(reason)) => Error::Record {
        path,
        key: key.to_owned(),
        reason: format!("not a valid torch.save archive: {reason}"),
      },
      RecordError::Zip(ZipError::Read { offset, len, kind, message }) => {
        if kind == std::io::ErrorKind::UnexpectedEof {
          Error::ShortRead { path, key: key.to_owned(), offset, expected: len, got: 0 }
        } else {
          Error::io(path, std::io::Error::new(kind, message))
        }
      }
      RecordError::Forbidden { module, name } => Error::ForbiddenGlobal { path, module, name },
      RecordError::Invalid(reason) => Error::Record { path, key: key.to_owned(), reason },
    }
  }

  /// The record of chunk `chunk` of tensor `key`, checked against what `.metadata` says.
  fn chunk_record_bytes(&self, key: &str, chunk: usize) -> Result<(RecordBytes, TensorRecord)> {
    let t = self.tensor(key)?;
    let Some(c) = t.chunks.get(chunk) else {
      return Err(self.bad_request(key, format!("has no chunk {chunk}")));
    };
    let info = self.storage_info(key, Some(&c.offsets))?;
    // a compressed chunk holds its tensor's bytes and a small archive around them, never more
    let bound = checked_nbytes(&c.sizes, t.dtype().size())
      .and_then(|n| n.checked_add(limits::ARCHIVE_OVERHEAD_BYTES))
      .unwrap_or(u64::MAX)
      .min(limits::MAX_DECOMPRESSED_BYTES);
    let bytes = self.record_bytes(key, info, bound)?;
    if self.raw_files.contains(&info.relative_path) {
      return self.raw_record(key, bytes, &t.chunks[chunk].sizes, t.dtype());
    }
    let rec = match bytes.parse(&self.pickles).map_err(|e| self.record_error(bytes.path(), key, e))? {
      PyObject::Record(rec) => rec,
      _ => {
        return Err(Error::Record {
          path: bytes.path().to_path_buf(),
          key: key.to_owned(),
          reason: "the item is not a tensor, but .metadata lists it as one".into(),
        })
      }
    };
    if rec.dtype != t.dtype() || rec.shape != c.sizes {
      return Err(Error::Record {
        path: bytes.path().to_path_buf(),
        key: key.to_owned(),
        reason: format!(
          "the stored chunk is {} {:?}, but .metadata says {} {:?} at offsets {:?}",
          rec.dtype,
          rec.shape,
          t.dtype(),
          c.sizes,
          c.offsets
        ),
      });
    }
    Ok((bytes, rec))
  }

  /// A chunk stored as plain row-major bytes (safetensors): its record is implied by the metadata, whose byte
  /// length was checked against dtype × shape when the header was read.
  fn raw_record(
    &self,
    key: &str,
    bytes: RecordBytes,
    sizes: &[u64],
    dtype: DType,
  ) -> Result<(RecordBytes, TensorRecord)> {
    let path = bytes.path().to_path_buf();
    let RecordBytes::File { len, .. } = &bytes else {
      return Err(Error::Unsupported {
        checkpoint: self.root.clone(),
        key: key.to_owned(),
        reason: "a stream transform on a safetensors-stored chunk".into(),
      });
    };
    let nbytes = checked_nbytes(sizes, dtype.size());
    let (Some(stride), Some(n), Ok(storage_len)) = (row_major_strides(sizes), nbytes, usize::try_from(*len))
    else {
      return Err(Error::SizeOverflow { path, key: key.to_owned(), what: format!("the chunk {sizes:?}") });
    };
    if n != *len {
      return Err(Error::Record {
        path,
        key: key.to_owned(),
        reason: format!("the stored chunk holds {len} bytes, a {dtype} {sizes:?} chunk needs {n}"),
      });
    }
    let rec = TensorRecord {
      dtype,
      shape: sizes.to_vec(),
      stride,
      storage_offset: 0,
      storage: 0..storage_len,
      big_endian: false,
      conj: false,
      neg: false,
    };
    Ok((bytes, rec))
  }

  /// The parsed record of chunk `chunk` of tensor `key` and where its storage is (not cached; reads use
  /// [`Checkpoint::resolve`]).
  pub fn chunk_record(&self, key: &str, chunk: usize) -> Result<(Source, TensorRecord)> {
    let (bytes, rec) = self.chunk_record_bytes(key, chunk)?;
    Ok((bytes.storage(&rec), rec))
  }

  /// Chunk `chunk` of tensor `key`, resolved: where its storage bytes are, how they are laid out, and whether
  /// copied bytes need a fixup. Resolved once per open checkpoint (the zip directory and `data.pkl` are read,
  /// and a compressed record decompressed, on first use) and shared by every later read; safe from any thread.
  pub fn resolve_chunk(&self, key: &str, chunk: usize) -> Result<Arc<ResolvedChunk>> {
    let id = (key.to_owned(), chunk);
    if let Some(c) = self.resolved.lock().unwrap_or_else(|p| p.into_inner()).chunks.get(&id) {
      return Ok(c.clone());
    }
    // resolved outside the lock: another thread may resolve the same chunk meanwhile, and one result is kept
    let (bytes, rec) = self.chunk_record_bytes(key, chunk)?;
    let t = self.tensor(key)?;
    let c = &t.chunks[chunk];
    let resolved = Arc::new(ResolvedChunk {
      index: chunk,
      offsets: c.offsets.clone(),
      sizes: c.sizes.clone(),
      dtype: rec.dtype,
      source: bytes.storage(&rec),
      layout: rec.layout(),
      fixup: rec.fixup(),
    });
    let mut cache = self.resolved.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(c) = cache.chunks.get(&id) {
      return Ok(c.clone());
    }
    cache.insert(id, resolved.clone());
    Ok(resolved)
  }

  /// Every chunk of tensor `key`, resolved (see [`Checkpoint::resolve_chunk`]), in `.metadata` chunk order.
  /// This is what executors consume: the host copy ([`copy_resolved`]) and the CUDA executor.
  pub fn resolve(&self, key: &str) -> Result<Vec<Arc<ResolvedChunk>>> {
    let n = self.tensor(key)?.chunks.len();
    (0..n).map(|i| self.resolve_chunk(key, i)).collect()
  }

  /// The coded error for a failed copy out of `chunk` (shared by every executor, so they report alike).
  pub fn copy_error(&self, chunk: &ResolvedChunk, key: &str, e: CopyError) -> Error {
    let path = chunk.source.path().map_or_else(|| self.root.clone(), Path::to_path_buf);
    match e {
      CopyError::Read(f) => f.into_error(&path, key),
      CopyError::Lower(e) => Error::SizeOverflow { path, key: key.to_owned(), what: e.to_string() },
      CopyError::Bounds(reason) => Error::Record { path, key: key.to_owned(), reason },
      CopyError::Alloc(bytes) => Error::OutOfMemory { path, key: key.to_owned(), bytes },
    }
  }

  /// The byte size of `region` of tensor `key`, checked.
  fn region_bytes(&self, key: &str, t: &TensorMetadata, region: &Region) -> Result<u64> {
    checked_nbytes(&region.sizes, t.dtype().size()).ok_or_else(|| Error::SizeOverflow {
      path: self.metadata_path.clone(),
      key: key.to_owned(),
      what: format!("the byte size of the box {:?}", region.sizes),
    })
  }

  /// Plans a read of the box `region` of tensor `key`: checks the box, finds the chunks that overlap it and
  /// resolves them (see [`BoxRead`]). No data is read.
  pub fn plan_read<'a>(&'a self, key: &'a str, region: &'a Region) -> Result<BoxRead<'a>> {
    let t = self.tensor(key)?;
    check_region(&t.size, region).map_err(|r| self.bad_request(key, r))?;
    let bytes = self.region_bytes(key, t, region)?;
    let plan = plan_region(t, region);
    // chunks are disjoint (validated at open), so the box is covered when the overlaps add up to it: always so in
    // a `.metadata`, where chunks cover the tensor; a rank-local `__{rank}.metadata` may hold only part of it
    if plan.iter().try_fold(0u64, |n, r| n.checked_add(r.numel())) != region.numel() {
      return Err(self.bad_request(
        key,
        format!(
          "the box {:?} at {:?} is not all in {} (it holds only some chunks of the tensor)",
          region.sizes,
          region.offsets,
          self.metadata_path.display()
        ),
      ));
    }
    let chunks = plan.iter().map(|r| self.resolve_chunk(key, r.chunk)).collect::<Result<_>>()?;
    Ok(BoxRead { ck: self, key, region, plan, chunks, dtype: t.dtype(), bytes })
  }

  /// Reads the box `region` of tensor `key` into `dst` (row-major, `region.numel() × element size` bytes),
  /// touching only the chunks that overlap it: the disk is asked for everything first, then the chunks are copied.
  pub fn read_into(&self, key: &str, region: &Region, dst: &mut [u8]) -> Result<()> {
    let read = self.plan_read(key, region)?;
    read.will_need();
    read.copy_into(dst)
  }

  /// Resolves the chunks of `key` and asks the kernel to start reading their storage (asynchronous readahead;
  /// nothing is copied). A later read finds the chunks resolved.
  pub fn prefetch(&self, key: &str) -> Result<()> {
    let t = self.tensor(key)?;
    self.plan_read(key, &Region::whole(&t.size))?.will_need();
    Ok(())
  }

  /// Bytes of tensor `key`, checked against 64 bits.
  pub fn tensor_bytes(&self, key: &str) -> Result<u64> {
    let t = self.tensor(key)?;
    self.region_bytes(key, t, &Region::whole(&t.size))
  }

  /// Reads the whole tensor into a new buffer.
  pub fn read_tensor(&self, key: &str) -> Result<Vec<u8>> {
    let t = self.tensor(key)?;
    let n = self.tensor_bytes(key)?;
    let Ok(len) = usize::try_from(n) else {
      return Err(self.bad_request(key, "is too large to hold in memory"));
    };
    let mut buf = Vec::new();
    buf.try_reserve_exact(len).map_err(|_| Error::OutOfMemory {
      path: self.metadata_path.clone(),
      key: key.to_owned(),
      bytes: n,
    })?;
    buf.resize(len, 0);
    self.read_into(key, &Region::whole(&t.size), &mut buf)?;
    Ok(buf)
  }

  /// A non-tensor value. Tensors inside it are read out (at most [`limits::MAX_OBJECT_BYTES`] in all).
  pub fn read_object(&self, key: &str) -> Result<PyObject> {
    if let ItemMetadata::Tensor(_) = self.item(key)? {
      return Err(self.bad_request(key, "is a tensor, not a non-tensor value"));
    }
    let info = self.storage_info(key, None)?;
    let bytes = self.record_bytes(key, info, limits::MAX_OBJECT_BYTES)?;
    let obj = bytes.parse(&self.pickles).map_err(|e| self.record_error(bytes.path(), key, e))?;
    let mut left = limits::MAX_OBJECT_BYTES;
    self.materialise(obj, &bytes, key, &mut left, 0)
  }

  /// Replaces each tensor record in `obj` by its values; `left` is what the limit still allows.
  fn materialise(
    &self,
    obj: PyObject,
    bytes: &RecordBytes,
    key: &str,
    left: &mut u64,
    depth: usize,
  ) -> Result<PyObject> {
    let path = bytes.path().to_path_buf();
    if depth > limits::MAX_NESTING {
      return Err(Error::Record { path, key: key.to_owned(), reason: "value nested too deeply".into() });
    }
    let many = |v: Vec<PyObject>, left: &mut u64| -> Result<Vec<PyObject>> {
      v.into_iter().map(|o| self.materialise(o, bytes, key, left, depth + 1)).collect()
    };
    Ok(match obj {
      PyObject::Record(rec) => {
        let n = checked_nbytes(&rec.shape, rec.dtype.size()).ok_or_else(|| Error::SizeOverflow {
          path: path.clone(),
          key: key.to_owned(),
          what: format!("the byte size of a {} tensor of shape {:?}", rec.dtype, rec.shape),
        })?;
        // declared sizes are checked before anything is allocated: an expanded (stride-0) view of one stored
        // element can claim any size
        if n > *left {
          return Err(Error::LimitExceeded {
            path,
            what: format!("key `{key}`: a {} tensor of shape {:?} inside the value", rec.dtype, rec.shape),
            value: n,
            limit: limits::MAX_OBJECT_BYTES,
            limit_name: "limits::MAX_OBJECT_BYTES",
          });
        }
        *left -= n;
        let mut data = Vec::new();
        data.try_reserve_exact(n as usize).map_err(|_| Error::OutOfMemory {
          path: path.clone(),
          key: key.to_owned(),
          bytes: n,
        })?;
        data.resize(n as usize, 0);
        if n > 0 {
          let read = ChunkRead {
            chunk: 0,
            src_start: vec![0; rec.shape.len()],
            dst_start: vec![0; rec.shape.len()],
            lengths: rec.shape.clone(),
          };
          let chunk = ResolvedChunk {
            index: 0,
            offsets: vec![0; rec.shape.len()],
            sizes: rec.shape.clone(),
            dtype: rec.dtype,
            source: bytes.storage(&rec),
            layout: rec.layout(),
            fixup: rec.fixup(),
          };
          copy_resolved(&chunk, &read, &mut data, &rec.shape).map_err(|e| self.copy_error(&chunk, key, e))?;
        }
        PyObject::Tensor(crate::value::Tensor { dtype: rec.dtype, shape: rec.shape, data })
      }
      PyObject::List(v) => PyObject::List(many(v, left)?),
      PyObject::Tuple(v) => PyObject::Tuple(many(v, left)?),
      PyObject::Dict(v) => {
        let mut out = Vec::with_capacity(v.len());
        for (k, o) in v {
          out.push((
            self.materialise(k, bytes, key, left, depth + 1)?,
            self.materialise(o, bytes, key, left, depth + 1)?,
          ));
        }
        PyObject::Dict(out)
      }
      other => other,
    })
  }

  /// The box a read of `key` with optional `offsets`/`sizes` means: neither → the whole tensor; offsets
  /// default to 0, sizes to the rest of each dimension. The box is checked against the tensor.
  pub fn region(&self, key: &str, offsets: Option<Vec<u64>>, sizes: Option<Vec<u64>>) -> Result<Region> {
    let t = self.tensor(key)?;
    let offsets = offsets.unwrap_or_else(|| vec![0; t.size.len()]);
    let sizes = match sizes {
      Some(s) => s,
      None => t.size.iter().zip(&offsets).map(|(n, o)| n.saturating_sub(*o)).collect(),
    };
    let region = Region { offsets, sizes };
    check_region(&t.size, &region).map_err(|r| self.bad_request(key, r))?;
    Ok(region)
  }

  /// Files, ranks and format details recorded in `.metadata`.
  pub fn summary(&self) -> Summary {
    let md = &self.metadata;
    let files: BTreeSet<String> = md.storage_data.values().map(|i| i.relative_path.clone()).collect();
    // torch names data files `__{rank}_{n}.distcp`
    // torch names DCP data files `__{rank}_{n}.distcp`, HF-storage shards `shard-{rank}-model-…`
    let ranks: BTreeSet<&str> = files
      .iter()
      .filter_map(|f| {
        f.strip_prefix("__").and_then(|r| r.split('_').next()).or_else(|| layout::shard_rank(f))
      })
      .collect();
    let path_text = |p: &Path| p.to_string_lossy().into_owned();
    Summary {
      metadata_file: if self.metadata_path == self.root {
        "(safetensors headers)".to_owned()
      } else {
        self.metadata_path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default()
      },
      version: md.version.clone(),
      tensor_properties_module: md.tensor_properties_module().filter(|m| !m.is_empty()).map(str::to_owned),
      save_id: md.storage_meta.as_ref().and_then(|s| s.save_id.clone()),
      checkpoint_id: md.storage_meta.as_ref().and_then(|s| s.checkpoint_id.clone()),
      ranks: ranks.len(),
      files: files.into_iter().collect(),
      has_planner_data: md.planner_data.is_some(),
      has_storage_meta: md.storage_meta.is_some(),
      layout: self.layout.kind.name(),
      writer: self.layout.writer.clone(),
      nemo_rl_weights: self.layout.nemo_rl.as_ref().map(|n| path_text(&n.weights_dir)),
      tokenizer_beside: self.layout.nemo_rl.as_ref().and_then(|n| n.tokenizer_dir.as_deref()).map(path_text),
      oldest_torch: matches!(self.layout.kind, LayoutKind::Dcp | LayoutKind::DcpSafetensors)
        .then(|| md.oldest_torch()),
    }
  }

  /// Where `key` sits in the nested state dict torch saved: its `planner_data` path, or the key itself as one
  /// top-level name when the checkpoint records none (torch ≤ 2.3 without planner data, safetensors layouts).
  pub fn planner_path(&self, key: &str) -> std::borrow::Cow<'_, [PathElem]> {
    match self.metadata.planner_data.as_ref().and_then(|pd| pd.get(key)) {
      Some(path) => std::borrow::Cow::Borrowed(path.as_slice()),
      None => std::borrow::Cow::Owned(vec![PathElem::Key(key.to_owned())]),
    }
  }

  /// The nested state dict torch saved, rebuilt from every key's [`Checkpoint::planner_path`].
  pub fn nested(&self) -> Result<crate::write::Nested> {
    let paths: Vec<(&str, std::borrow::Cow<'_, [PathElem]>)> =
      self.keys().map(|k| (k, self.planner_path(k))).collect();
    crate::write::unflatten(paths.iter().map(|(k, p)| (*k, p.as_ref()))).map_err(|e| Error::Metadata {
      path: self.metadata_path.clone(),
      reason: format!("key `{}`: {}", e.key, e.reason),
    })
  }

  /// Element type of a tensor.
  pub fn dtype(&self, key: &str) -> Result<DType> {
    Ok(self.tensor(key)?.dtype())
  }
}
