//! An open checkpoint folder: its metadata, lazily mapped data files, and reads of whole tensors, boxes of
//! tensors and non-tensor values.

use crate::copy::{copy_chunk, RunSource};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::metadata::{ItemMetadata, Metadata, StorageInfo, StorageKey, TensorMetadata};
use crate::plan::{check_region, plan_region, ChunkRead, Region};
use crate::torch_save::{self, PyObject, RecordError, TensorRecord};
use crate::zip::ZipError;
use memmap2::{Mmap, MmapMut};
use std::collections::HashMap;
use std::fs::File;
use std::ops::Range;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};

/// A data file, mapped once and shared by every read (and by zero-copy buffers handed to callers).
#[derive(Debug)]
pub struct DataFile {
  pub path: PathBuf,
  file: File,
  map: Option<Mmap>,
}

impl DataFile {
  fn open(path: PathBuf) -> std::io::Result<DataFile> {
    let file = File::open(&path)?;
    let len = file.metadata()?.len();
    // SAFETY: the mapping is read-only. A checkpoint being truncated or rewritten in place while it is read is
    // outside the contract (DCP saves by writing new files and renaming .metadata last).
    let map = if len == 0 { None } else { Some(unsafe { Mmap::map(&file)? }) };
    Ok(DataFile { path, file, map })
  }

  /// A new copy-on-write mapping of `range` only. Each call returns memory at a fresh address, which matters for
  /// JS: V8 refuses two external buffers over the same pointer (nodejs/node#32463). Copy-on-write, so a caller
  /// that writes into it changes its private pages and never the checkpoint (and never faults).
  fn map_range(&self, range: Range<usize>) -> std::io::Result<(MmapMut, usize)> {
    let page = 4096;
    let start = range.start - range.start % page;
    // SAFETY: as in `open`; the mapping is private (MAP_PRIVATE), so writes never reach the file.
    let map = unsafe {
      memmap2::MmapOptions::new().offset(start as u64).len(range.end - start).map_copy(&self.file)?
    };
    Ok((map, range.start - start))
  }

  pub fn bytes(&self) -> &[u8] {
    self.map.as_deref().unwrap_or(&[])
  }

  pub(crate) fn file(&self) -> &File {
    &self.file
  }

  /// Asks the kernel to start reading `range` now (one large readahead instead of faults and small reads).
  fn will_need(&self, range: Range<usize>) {
    if let Some(map) = &self.map {
      // advice only; an error changes nothing but speed
      let _ = map.advise_range(memmap2::Advice::WillNeed, range.start, range.len());
    }
  }
}

/// When every read covers whole rows of `region` and there are several worth splitting, each read's byte range of
/// the destination, sorted by position; `None` otherwise.
fn whole_row_slabs(plan: &[ChunkRead], region: &Region, es: u64) -> Option<Vec<(usize, Range<usize>)>> {
  const MIN_PARALLEL_BYTES: u64 = 8 << 20;
  if plan.len() < 2 || region.sizes.is_empty() || region.numel() * es < MIN_PARALLEL_BYTES {
    return None;
  }
  let row_bytes = region.sizes[1..].iter().product::<u64>() * es;
  let mut slabs = Vec::with_capacity(plan.len());
  for (i, r) in plan.iter().enumerate() {
    if r.lengths[1..] != region.sizes[1..] || r.dst_start[1..].iter().any(|&d| d != 0) {
      return None;
    }
    let start = usize::try_from(r.dst_start[0] * row_bytes).ok()?;
    let len = usize::try_from(r.lengths[0] * row_bytes).ok()?;
    slabs.push((i, start..start + len));
  }
  slabs.sort_by_key(|(_, r)| r.start);
  // chunks never overlap in a valid checkpoint; refuse the parallel path (not the read) if these do
  slabs.windows(2).all(|w| w[0].1.end <= w[1].1.start).then_some(slabs)
}

/// Runs of at least this many bytes are read with `pread` (the kernel copies from the page cache, no page faults
/// on a mapping); shorter ones are copied from the mapping, where a syscall would cost more than the copy.
const PREAD_MIN: usize = 64 * 1024;

/// A chunk's storage inside a mapped data file.
struct FileStorage<'a> {
  file: &'a DataFile,
  /// File offset of the storage's first byte.
  base: u64,
  mapped: &'a [u8],
}

impl RunSource for FileStorage<'_> {
  fn copy_run(&self, offset: usize, out: &mut [u8]) -> std::io::Result<()> {
    if out.len() >= PREAD_MIN {
      use std::os::unix::fs::FileExt;
      self.file.file.read_exact_at(out, self.base + offset as u64)
    } else {
      self.mapped.copy_run(offset, out)
    }
  }
}

/// The bytes of one stored item: a range of a mapped file, or a decompressed copy.
#[derive(Debug, Clone)]
pub enum Blob {
  Mapped { file: Arc<DataFile>, range: Range<usize> },
  Owned { path: PathBuf, bytes: Arc<Vec<u8>> },
}

impl Blob {
  pub fn bytes(&self) -> &[u8] {
    match self {
      Blob::Mapped { file, range } => &file.bytes()[range.clone()],
      Blob::Owned { bytes, .. } => bytes,
    }
  }

  pub fn path(&self) -> &Path {
    match self {
      Blob::Mapped { file, .. } => &file.path,
      Blob::Owned { path, .. } => path,
    }
  }
}

/// Where one chunk of a tensor is stored.
#[derive(Debug, Clone)]
pub struct ChunkLocation {
  pub offsets: Vec<u64>,
  pub sizes: Vec<u64>,
  pub info: StorageInfo,
}

/// A tensor's stored bytes, mapped on their own (see [`Checkpoint::map_stored`]).
pub struct MappedTensor {
  pub map: MmapMut,
  /// Where the tensor starts in `map`.
  pub offset: usize,
  pub len: usize,
}

impl MappedTensor {
  pub fn bytes_mut(&mut self) -> &mut [u8] {
    &mut self.map[self.offset..self.offset + self.len]
  }
}

#[derive(Debug)]
pub struct Checkpoint {
  pub root: PathBuf,
  pub metadata_path: PathBuf,
  pub metadata: Metadata,
  canonical_root: PathBuf,
  files: Mutex<HashMap<String, Arc<DataFile>>>,
}

fn check_relative_path(rel: &str) -> bool {
  let p = Path::new(rel);
  !rel.is_empty() && p.components().all(|c| matches!(c, Component::Normal(_))) && !rel.contains('\\')
}

impl Checkpoint {
  /// Opens the checkpoint folder `root`: `.metadata`, or a rank-local `__{rank}.metadata` when there is none.
  pub fn open(root: impl AsRef<Path>, rank: Option<u32>) -> Result<Checkpoint> {
    let root = root.as_ref().to_path_buf();
    let rank_hint = match rank {
      Some(r) => format!(" or __{r}.metadata"),
      None => " or __0.metadata".to_owned(),
    };
    if !root.is_dir() {
      return Err(Error::NoCheckpoint { path: root, rank_hint });
    }
    let candidates = [root.join(".metadata"), root.join(format!("__{}.metadata", rank.unwrap_or(0)))];
    let Some(metadata_path) = candidates.into_iter().find(|p| p.is_file()) else {
      return Err(Error::NoCheckpoint { path: root, rank_hint });
    };
    let bytes = std::fs::read(&metadata_path).map_err(|e| Error::io(&metadata_path, e))?;
    let metadata = Metadata::parse(&bytes, &metadata_path)?;
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
    Ok(Checkpoint { root, metadata_path, metadata, canonical_root, files: Mutex::new(HashMap::new()) })
  }

  pub fn keys(&self) -> impl Iterator<Item = &str> {
    self.metadata.items.iter().map(|(k, _)| k.as_str())
  }

  pub fn item(&self, key: &str) -> Result<&ItemMetadata> {
    self
      .metadata
      .item(key)
      .ok_or_else(|| Error::NoSuchKey { checkpoint: self.root.clone(), key: key.to_owned() })
  }

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
    let file = Arc::new(DataFile::open(path.clone()).map_err(|e| Error::io(path, e))?);
    files.insert(rel.to_owned(), file.clone());
    Ok(file)
  }

  /// The stored bytes of one item, bounds-checked and with any transform (zstd) undone.
  pub fn blob(&self, key: &str, info: &StorageInfo) -> Result<Blob> {
    let file = self.data_file(key, &info.relative_path)?;
    let file_len = file.bytes().len() as u64;
    let end = info.offset.checked_add(info.length);
    let range = match end {
      Some(end) if end <= file_len => info.offset as usize..end as usize,
      _ => {
        return Err(Error::OutOfBounds {
          path: file.path.clone(),
          key: key.to_owned(),
          offset: info.offset,
          end: info.offset.saturating_add(info.length),
          file_len,
        })
      }
    };
    if info.transform_descriptors.is_empty() {
      return Ok(Blob::Mapped { file, range });
    }
    let mut bytes = file.bytes()[range].to_vec();
    for d in &info.transform_descriptors {
      let name = d.split('/').next().unwrap_or("");
      if name != "stream.zstd" {
        return Err(Error::Unsupported {
          checkpoint: self.root.clone(),
          key: key.to_owned(),
          reason: format!("unknown stream transform `{d}`"),
        });
      }
      bytes = zstd::stream::decode_all(&bytes[..]).map_err(|e| Error::Record {
        path: file.path.clone(),
        key: key.to_owned(),
        reason: format!("zstd-compressed item does not decompress: {e}"),
      })?;
    }
    Ok(Blob::Owned { path: file.path.clone(), bytes: Arc::new(bytes) })
  }

  fn record_error(&self, blob: &Blob, key: &str, e: RecordError) -> Error {
    let path = blob.path().to_path_buf();
    match e {
      RecordError::Zip(ZipError::Compressed { entry, method }) => {
        Error::CompressedEntry { path, key: key.to_owned(), entry, method }
      }
      RecordError::Zip(ZipError::Malformed(reason)) => Error::Record {
        path,
        key: key.to_owned(),
        reason: format!("not a valid torch.save archive: {reason}"),
      },
      RecordError::Forbidden { module, name } => Error::ForbiddenGlobal { path, module, name },
      RecordError::Invalid(reason) => Error::Record { path, key: key.to_owned(), reason },
    }
  }

  fn parse_blob(&self, blob: &Blob, key: &str) -> Result<PyObject> {
    torch_save::parse(blob.bytes()).map_err(|e| self.record_error(blob, key, e))
  }

  /// The record of the chunk at index `chunk` of tensor `key`, checked against what `.metadata` says.
  pub fn chunk_record(&self, key: &str, chunk: usize) -> Result<(Blob, TensorRecord)> {
    let t = self.tensor(key)?;
    let Some(c) = t.chunks.get(chunk) else {
      return Err(self.bad_request(key, format!("has no chunk {chunk}")));
    };
    let info = self.storage_info(key, Some(&c.offsets))?;
    let blob = self.blob(key, info)?;
    let rec = match self.parse_blob(&blob, key)? {
      PyObject::Tensor(rec) => rec,
      _ => {
        return Err(Error::Record {
          path: blob.path().to_path_buf(),
          key: key.to_owned(),
          reason: "the item is not a tensor, but .metadata lists it as one".into(),
        })
      }
    };
    if rec.dtype != t.dtype() || rec.shape != c.sizes {
      return Err(Error::Record {
        path: blob.path().to_path_buf(),
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
    Ok((blob, rec))
  }

  /// Reads the box `region` of tensor `key` into `dst` (row-major, `region.numel() × element size` bytes),
  /// touching only the chunks that overlap it.
  pub fn read_into(&self, key: &str, region: &Region, dst: &mut [u8]) -> Result<()> {
    let t = self.tensor(key)?;
    check_region(&t.size, region).map_err(|r| self.bad_request(key, r))?;
    let es = t.dtype().size() as u64;
    let want = region.numel().checked_mul(es);
    if want != Some(dst.len() as u64) {
      return Err(self.bad_request(
        key,
        format!(
          "the destination holds {} bytes, the {} box {:?} needs {}",
          dst.len(),
          t.dtype(),
          region.sizes,
          region.numel() * es
        ),
      ));
    }
    let plan = plan_region(t, region);
    let covered: u64 = plan.iter().map(|r| r.numel()).sum();
    if covered != region.numel() {
      return Err(Error::Metadata {
        path: self.metadata_path.clone(),
        reason: format!(
          "key `{key}`: the stored chunks cover {covered} of the {} requested elements",
          region.numel()
        ),
      });
    }
    // start the disk on every chunk this read needs before copying from the first
    self.prefetch_chunks(key, plan.iter().map(|r| r.chunk))?;
    if let Some(slabs) = whole_row_slabs(&plan, region, es) {
      return self.read_slabs_in_parallel(key, &plan, slabs, dst);
    }
    for read in &plan {
      self.copy_read(key, read, dst, &region.sizes)?;
    }
    Ok(())
  }

  /// Copies one planned chunk read into `dst`, a row-major buffer of `dst_sizes`.
  fn copy_read(&self, key: &str, read: &ChunkRead, dst: &mut [u8], dst_sizes: &[u64]) -> Result<()> {
    let (blob, rec) = self.chunk_record(key, read.chunk)?;
    let storage = &blob.bytes()[rec.storage.clone()];
    let copied = match &blob {
      Blob::Mapped { file, range } => {
        let src = FileStorage { file, base: (range.start + rec.storage.start) as u64, mapped: storage };
        copy_chunk(&src, &rec, read, dst, dst_sizes)
      }
      Blob::Owned { .. } => copy_chunk(storage, &rec, read, dst, dst_sizes),
    };
    copied.map_err(|e| Error::io(blob.path(), e))
  }

  /// Chunks that each fill whole rows of the destination (sharded on dim 0, the common case) own disjoint byte
  /// ranges of it, so they are copied on several threads at once: more reads in flight for the disk, and both
  /// cores copying when the data is cached.
  fn read_slabs_in_parallel(
    &self,
    key: &str,
    plan: &[ChunkRead],
    slabs: Vec<(usize, Range<usize>)>,
    dst: &mut [u8],
  ) -> Result<()> {
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
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(parts.len());
    let per = parts.len().div_ceil(threads);
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
            self.copy_read(key, &local, out, &read.lengths)?;
          }
          Ok(())
        }));
      }
      handles
        .into_iter()
        .try_for_each(|h| h.join().unwrap_or_else(|_| Err(self.bad_request(key, "a reader thread panicked"))))
    })
  }

  /// Asks the kernel to start reading the stored chunks of `key` (asynchronous readahead; nothing is copied).
  pub fn prefetch(&self, key: &str) -> Result<()> {
    let n = self.tensor(key)?.chunks.len();
    self.prefetch_chunks(key, 0..n)
  }

  fn prefetch_chunks(&self, key: &str, chunks: impl Iterator<Item = usize>) -> Result<()> {
    let t = self.tensor(key)?;
    for i in chunks {
      let info = self.storage_info(key, Some(&t.chunks[i].offsets))?;
      if let Ok(Blob::Mapped { file, range }) = self.blob(key, info) {
        file.will_need(range);
      }
    }
    Ok(())
  }

  /// Reads the whole tensor into a new buffer.
  pub fn read_tensor(&self, key: &str) -> Result<Vec<u8>> {
    let t = self.tensor(key)?;
    let len = t.numel().checked_mul(t.dtype().size() as u64).and_then(|n| usize::try_from(n).ok());
    let Some(len) = len else {
      return Err(self.bad_request(key, "is too large to hold in memory"));
    };
    let mut buf = vec![0u8; len];
    self.read_into(key, &Region::whole(&t.size), &mut buf)?;
    Ok(buf)
  }

  /// The whole tensor mapped straight from its data file, when its stored bytes are already what torch shows:
  /// one chunk covering the tensor, row-major, our byte order, aligned for the element type. `None` otherwise.
  pub fn map_stored(&self, key: &str) -> Result<Option<MappedTensor>> {
    let t = self.tensor(key)?;
    if t.chunks.len() != 1 || t.chunks[0].sizes != t.size || t.numel() == 0 {
      return Ok(None);
    }
    let (blob, rec) = self.chunk_record(key, 0)?;
    let Blob::Mapped { file, range } = blob else {
      return Ok(None);
    };
    let es = t.dtype().size();
    let start = range.start + rec.storage.start;
    if !rec.is_plain() || start % es != 0 {
      return Ok(None);
    }
    let len = t.numel() as usize * es;
    let (map, offset) = file.map_range(start..start + len).map_err(|e| Error::io(&file.path, e))?;
    Ok(Some(MappedTensor { map, offset, len }))
  }

  /// A non-tensor value.
  pub fn read_object(&self, key: &str) -> Result<PyObject> {
    if let ItemMetadata::Tensor(_) = self.item(key)? {
      return Err(self.bad_request(key, "is a tensor, not a non-tensor value"));
    }
    let info = self.storage_info(key, None)?;
    let blob = self.blob(key, info)?;
    let obj = self.parse_blob(&blob, key)?;
    // tensors nested in a value (e.g. a tuple of tensors) are copied out while the blob is at hand
    Ok(materialise(obj, blob.bytes()))
  }

  /// Element type of a tensor.
  pub fn dtype(&self, key: &str) -> Result<DType> {
    Ok(self.tensor(key)?.dtype())
  }
}

fn materialise(obj: PyObject, blob: &[u8]) -> PyObject {
  match obj {
    PyObject::Tensor(rec) => {
      let mut data = vec![0u8; rec.numel() as usize * rec.dtype.size()];
      let read = crate::plan::ChunkRead {
        chunk: 0,
        src_start: vec![0; rec.shape.len()],
        dst_start: vec![0; rec.shape.len()],
        lengths: rec.shape.clone(),
      };
      if !data.is_empty() {
        // a slice source cannot fail
        let _ = copy_chunk(&blob[rec.storage.clone()], &rec, &read, &mut data, &rec.shape);
      }
      PyObject::TensorData { dtype: rec.dtype, shape: rec.shape, data }
    }
    PyObject::List(v) => PyObject::List(v.into_iter().map(|o| materialise(o, blob)).collect()),
    PyObject::Tuple(v) => PyObject::Tuple(v.into_iter().map(|o| materialise(o, blob)).collect()),
    PyObject::Dict(v) => PyObject::Dict(v.into_iter().map(|(k, o)| (k, materialise(o, blob))).collect()),
    other => other,
  }
}
