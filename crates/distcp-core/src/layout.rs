//! Which checkpoint layout a folder holds, and the metadata of the layouts that have no `.metadata`.
//!
//! Detected automatically by [`crate::Checkpoint::open`]:
//! - DCP (`.metadata` / `__{rank}.metadata`), with `torch.save` records or (torch ≥ 2.9,
//!   `serialization_format=SAFETENSORS`) one safetensors blob per data file (see [`crate::checkpoint`]);
//! - safetensors files without `.metadata`: torch's `HuggingFaceStorageWriter` (per-rank
//!   `shard-SSSSS-model-XXXXX-of-YYYYY.safetensors` whose `__metadata__` carries `DCP_SHARDING_INFO`, or
//!   consolidated `model-*.safetensors` + index) and plain Hugging Face folders (`model.safetensors`, or shards
//!   listed by `model.safetensors.index.json`);
//! - a NeMo-RL run folder (`step_N`, `step_N/policy`, `…/policy/weights`): the weights folder is found the way
//!   NeMo-RL finds it (v1 `weights/`, v2 `weights/model/`), its format by NeMo-RL's `detect_checkpoint_format`
//!   (any `.distcp` → DCP, else `.safetensors`, else `.bin`/`.pt`/`.pth`, which distcp does not read).
//!
//! The synthesized metadata is what torch's `HuggingFaceStorageReader.read_metadata` builds: one chunk per file
//! a tensor appears in, at its `saved_offsets` (0 without sharding info), the tensor's size the largest
//! `offset + shape` in each dimension. It then goes through the same [`Metadata::validate`] as a `.metadata`.

use crate::error::{Error, Result};
use crate::limits;
use crate::metadata::{
  Chunk, ItemMetadata, Metadata, StorageInfo, StorageKey, TensorMetadata, TensorProperties,
};
use crate::safetensors::{self, Header, SUFFIX};
use crate::source::DataFile;
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The index transformers (and torch's HF storage) write beside sharded safetensors.
pub const HF_INDEX_FILE: &str = "model.safetensors.index.json";
/// The folder torch's `HuggingFaceStorageWriter(enable_consolidation=True)` keeps the per-rank shards in.
pub const HF_SHARDED_DIR: &str = "sharded";

/// What kind of files hold the checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayoutKind {
  /// `.metadata` + `torch.save` records.
  Dcp,
  /// `.metadata` + safetensors blobs in the `.distcp` files.
  DcpSafetensors,
  /// Per-rank safetensors shards with `DCP_SHARDING_INFO` (`HuggingFaceStorageWriter(save_distributed=True)`).
  HfStorageSharded,
  /// Whole tensors in safetensors files (Hugging Face, or torch's HF storage without sharding).
  HfSafetensors,
}

impl LayoutKind {
  /// The stable name `inspect` reports.
  pub fn name(self) -> &'static str {
    match self {
      LayoutKind::Dcp => "dcp",
      LayoutKind::DcpSafetensors => "dcp-safetensors",
      LayoutKind::HfStorageSharded => "hf-storage-sharded",
      LayoutKind::HfSafetensors => "hf-safetensors",
    }
  }
}

/// A NeMo-RL run folder the weights were found in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NemoRl {
  /// `…/step_N/policy/weights`.
  pub weights_dir: PathBuf,
  /// `…/policy/tokenizer` when it exists: what NeMo-RL's converter uses when no tokenizer is given.
  pub tokenizer_dir: Option<PathBuf>,
}

/// The layout of an open checkpoint, for `inspect` and for conversion defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
  /// What kind of files hold the checkpoint.
  pub kind: LayoutKind,
  /// Which writer produced it, in words.
  pub writer: String,
  /// The folder the checkpoint's files are in (the input, or a weights folder inside a NeMo-RL run).
  pub dir: PathBuf,
  /// The NeMo-RL run the weights were found in, when they were.
  pub nemo_rl: Option<NemoRl>,
}

/// Where a checkpoint's metadata comes from, before opening.
#[derive(Debug)]
pub enum Found {
  /// A `.metadata` (or `__{rank}.metadata`) file.
  DcpMetadata { dir: PathBuf, metadata_path: PathBuf, nemo_rl: Option<NemoRl> },
  /// `.safetensors` files in `dir`.
  Safetensors { dir: PathBuf, nemo_rl: Option<NemoRl> },
}

fn metadata_file(dir: &Path, rank: Option<u32>) -> Option<PathBuf> {
  // anything by that name counts (a FIFO or folder named .metadata is refused by name, not skipped)
  [dir.join(".metadata"), dir.join(format!("__{}.metadata", rank.unwrap_or(0)))]
    .into_iter()
    .find(|p| p.symlink_metadata().is_ok())
}

/// `.safetensors` files directly in `dir` (not hidden), sorted by name.
fn safetensors_files(dir: &Path) -> Vec<String> {
  let mut out: Vec<String> = std::fs::read_dir(dir)
    .map(|rd| {
      rd.flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(SUFFIX) && !n.starts_with('.'))
        .collect()
    })
    .unwrap_or_default();
  out.sort();
  out
}

fn find_in(dir: &Path, rank: Option<u32>, nemo_rl: Option<NemoRl>) -> Option<Found> {
  if !dir.is_dir() {
    return None;
  }
  if let Some(metadata_path) = metadata_file(dir, rank) {
    return Some(Found::DcpMetadata { dir: dir.to_path_buf(), metadata_path, nemo_rl });
  }
  if !safetensors_files(dir).is_empty() {
    return Some(Found::Safetensors { dir: dir.to_path_buf(), nemo_rl });
  }
  None
}

/// File names under `dir` (recursively, at most a few levels and entries): what NeMo-RL's
/// `detect_checkpoint_format` walks.
fn walk_names(dir: &Path, depth: usize, out: &mut Vec<String>) {
  const MAX_ENTRIES: usize = 100_000;
  let Ok(rd) = std::fs::read_dir(dir) else { return };
  for e in rd.flatten() {
    if out.len() >= MAX_ENTRIES {
      return;
    }
    let Ok(ft) = e.file_type() else { continue };
    if ft.is_dir() && depth > 0 {
      walk_names(&e.path(), depth - 1, out);
    } else if ft.is_file() {
      out.push(e.file_name().to_string_lossy().into_owned());
    }
  }
}

/// The NeMo-RL weights folder (`…/policy/weights`) for a folder given as a step folder, `policy/` or
/// `policy/weights` itself, and the folder holding the weights inside it (v2: `model/`, v1: itself).
fn nemo_rl_weights(input: &Path) -> Option<PathBuf> {
  let parent = input.parent().filter(|_| input.file_name().is_some_and(|n| n == "model"));
  [input.join("policy").join("weights"), input.join("weights"), input.to_path_buf()]
    .into_iter()
    .chain(parent.map(Path::to_path_buf))
    .find(|w| w.file_name().is_some_and(|n| n == "weights") && w.is_dir())
}

fn nemo_rl_of(weights: &Path) -> NemoRl {
  let tokenizer = weights.parent().map(|p| p.join("tokenizer")).filter(|t| t.is_dir());
  NemoRl { weights_dir: weights.to_path_buf(), tokenizer_dir: tokenizer }
}

/// Finds the checkpoint at `input` (see the module docs for the order).
pub fn find(input: &Path, rank: Option<u32>) -> Result<Found> {
  let no_checkpoint = |extra: &str| Error::NoCheckpoint {
    path: input.to_path_buf(),
    rank_hint: format!(
      "{}, .safetensors files, or a NeMo-RL weights folder{extra}",
      match rank {
        Some(r) => format!(" or __{r}.metadata"),
        None => " or __0.metadata".to_owned(),
      }
    ),
  };
  if !input.is_dir() {
    return Err(no_checkpoint(""));
  }
  // a weights folder inside a NeMo-RL run: tag it, so inspect and convert know where the tokenizer is
  let nemo = nemo_rl_weights(input);
  let tag = |dir: &Path| nemo.as_ref().filter(|w| dir.starts_with(w)).map(|w| nemo_rl_of(w));
  if let Some(found) = find_in(input, rank, tag(input)) {
    return Ok(found);
  }
  let Some(weights) = nemo.as_ref() else {
    // the seed's DTensor v2 layout: `<dir>/model/.metadata`
    return find_in(&input.join("model"), rank, None).ok_or_else(|| no_checkpoint(""));
  };
  let mut names = Vec::new();
  walk_names(weights, 3, &mut names);
  // NeMo-RL's detect_checkpoint_format: any .distcp → DCP; else .safetensors; else .bin/.pt/.pth
  let dcp = names.iter().any(|n| n.ends_with(".distcp"));
  let st = names.iter().any(|n| n.ends_with(SUFFIX));
  for dir in [weights.join("model"), weights.clone()] {
    match find_in(&dir, rank, Some(nemo_rl_of(weights))) {
      Some(f @ Found::DcpMetadata { .. }) if dcp || !st => return Ok(f),
      Some(f @ Found::Safetensors { .. }) if !dcp => return Ok(f),
      _ => {}
    }
  }
  if names.iter().any(|n| n.ends_with(".bin") || n.ends_with(".pt") || n.ends_with(".pth")) {
    return Err(no_checkpoint(&format!(
      " (found torch.save .bin/.pt weights under {}, a format distcp does not read)",
      weights.display()
    )));
  }
  Err(no_checkpoint(""))
}

/// Safetensors files opened at [`read_folder`], to be reused by reads.
pub type OpenedFiles = HashMap<String, Arc<DataFile>>;

/// The metadata of a folder of safetensors files, as torch's `HuggingFaceStorageReader` builds it, with each
/// chunk's storage pointing at its bytes; the files are opened once and returned for reads.
pub fn read_folder(dir: &Path) -> Result<(Metadata, Layout, OpenedFiles)> {
  let index_path = dir.join(HF_INDEX_FILE);
  // with an index, its files (as transformers reads them); without, every .safetensors file (as torch does)
  let (names, listed) = if index_path.symlink_metadata().is_ok() {
    index_files(&read_index(&index_path)?, &index_path)?
  } else {
    (safetensors_files(dir), Vec::new())
  };
  if names.len() > limits::MAX_SAFETENSORS_FILES {
    return Err(Error::LimitExceeded {
      path: dir.to_path_buf(),
      what: format!("a folder of {} safetensors files (counted as bytes)", names.len()),
      value: names.len() as u64,
      limit: limits::MAX_SAFETENSORS_FILES as u64,
      limit_name: "limits::MAX_SAFETENSORS_FILES",
    });
  }
  let mut files = OpenedFiles::new();
  let mut items: Vec<(String, ItemMetadata)> = Vec::new();
  let mut position: HashMap<String, usize> = HashMap::new();
  let mut storage: HashMap<StorageKey, StorageInfo> = HashMap::new();
  let mut sharded = 0usize;
  let mut torch_written = false;
  for name in &names {
    let path = dir.join(name);
    if path.symlink_metadata().is_err() {
      return Err(Error::MissingDataFile {
        checkpoint: dir.to_path_buf(),
        key: String::new(),
        relative_path: name.clone(),
      });
    }
    let file = Arc::new(DataFile::open(path.clone())?);
    let header: Header = safetensors::read_header(&file, 0, file.len())?;
    let sharding = header.sharding_info(&path)?;
    sharded += usize::from(sharding.is_some());
    torch_written |= header.metadata.contains_key(safetensors::DCP_VERSION);
    for t in &header.tensors {
      let offsets = match &sharding {
        Some(s) => s.get(&t.name).cloned().ok_or_else(|| Error::SafetensorsHeader {
          path: path.clone(),
          reason: format!("tensor `{}` has no entry in {}", t.name, safetensors::DCP_SHARDING_INFO),
        })?,
        None => vec![0; t.shape.len()],
      };
      if offsets.len() != t.shape.len() {
        return Err(Error::SafetensorsHeader {
          path: path.clone(),
          reason: format!(
            "tensor `{}`: {} saved_offsets {:?} for a {}-dimensional tensor",
            t.name,
            safetensors::DCP_SHARDING_INFO,
            offsets,
            t.shape.len()
          ),
        });
      }
      let mut end = Vec::with_capacity(offsets.len());
      for (&o, &s) in offsets.iter().zip(&t.shape) {
        end.push(o.checked_add(s).ok_or_else(|| Error::SizeOverflow {
          path: path.clone(),
          key: t.name.clone(),
          what: format!("saved_offsets {offsets:?} + shape {:?}", t.shape),
        })?);
      }
      let at = *position.entry(t.name.clone()).or_insert_with(|| {
        items.push((
          t.name.clone(),
          ItemMetadata::Tensor(TensorMetadata {
            properties: TensorProperties {
              dtype: t.dtype,
              requires_grad: false,
              pin_memory: false,
              module: String::new(),
            },
            size: vec![0; end.len()],
            chunks: Vec::new(),
          }),
        ));
        items.len() - 1
      });
      let ItemMetadata::Tensor(tm) = &mut items[at].1 else { continue };
      if tm.dtype() != t.dtype || tm.size.len() != end.len() {
        return Err(Error::SafetensorsHeader {
          path: path.clone(),
          reason: format!(
            "tensor `{}` is {} with {} dimensions here, {} with {} in another file",
            t.name,
            t.dtype,
            end.len(),
            tm.dtype(),
            tm.size.len()
          ),
        });
      }
      for (s, e) in tm.size.iter_mut().zip(&end) {
        *s = (*s).max(*e);
      }
      tm.chunks.push(Chunk { offsets: offsets.clone(), sizes: t.shape.clone() });
      let key = StorageKey { fqn: t.name.clone(), offset: Some(offsets) };
      let info = StorageInfo {
        relative_path: name.clone(),
        offset: t.start,
        length: t.len,
        transform_descriptors: vec![],
      };
      if storage.insert(key, info).is_some() {
        return Err(Error::ChunkLayout {
          path: path.clone(),
          key: t.name.clone(),
          reason: "two files hold the same chunk of this tensor".into(),
        });
      }
    }
    files.insert(name.clone(), file);
  }
  // the index must not promise a tensor its file does not hold (transformers would fail on it at load)
  for (key, file) in &listed {
    if !storage.iter().any(|(k, i)| k.fqn == *key && i.relative_path == *file) {
      return Err(Error::Metadata {
        path: index_path,
        reason: format!("weight_map puts `{key}` in {file}, which does not hold it"),
      });
    }
  }
  let ranks: BTreeSet<&str> = names.iter().filter_map(|n| shard_rank(n)).collect();
  let (kind, writer) = if sharded > 0 && !ranks.is_empty() {
    (
      LayoutKind::HfStorageSharded,
      format!("torch HuggingFaceStorageWriter(save_distributed=True), {} rank file(s)", ranks.len()),
    )
  } else if safetensors_files(&dir.join(HF_SHARDED_DIR)).iter().any(|n| shard_rank(n).is_some()) {
    // torch's consolidation writes headers without __metadata__; the per-rank shards beside tell it apart
    (
      LayoutKind::HfSafetensors,
      "torch HuggingFaceStorageWriter(enable_consolidation=True): consolidated, per-rank shards in sharded/"
        .to_owned(),
    )
  } else if torch_written || sharded > 0 {
    // save_distributed=False: one process wrote whole tensors (saved_offsets all 0)
    (LayoutKind::HfSafetensors, "torch HuggingFaceStorageWriter".to_owned())
  } else {
    (LayoutKind::HfSafetensors, "Hugging Face safetensors (save_pretrained or compatible)".to_owned())
  };
  let md = Metadata::from_parts(items, storage);
  Ok((md, Layout { kind, writer, dir: dir.to_path_buf(), nemo_rl: None }, files))
}

/// The bytes of a `model.safetensors.index.json` (a regular file of at most [`limits::MAX_METADATA_BYTES`]).
fn read_index(path: &Path) -> Result<Vec<u8>> {
  use std::io::Read;
  let (file, len) = crate::source::open_regular(path)?;
  let too_big = |value: u64| Error::LimitExceeded {
    path: path.to_path_buf(),
    what: "the safetensors index".into(),
    value,
    limit: limits::MAX_METADATA_BYTES,
    limit_name: "limits::MAX_METADATA_BYTES",
  };
  if len > limits::MAX_METADATA_BYTES {
    return Err(too_big(len));
  }
  let mut bytes = Vec::new();
  file.take(limits::MAX_METADATA_BYTES + 1).read_to_end(&mut bytes).map_err(|e| Error::io(path, e))?;
  if bytes.len() as u64 > limits::MAX_METADATA_BYTES {
    return Err(too_big(bytes.len() as u64));
  }
  Ok(bytes)
}

/// `SSSSS` of torch's per-rank name `shard-SSSSS-model-XXXXX-of-YYYYY.safetensors`.
pub fn shard_rank(name: &str) -> Option<&str> {
  let rest = name.strip_prefix("shard-")?;
  let (rank, tail) = rest.split_once('-')?;
  (tail.starts_with("model-") && rank.bytes().all(|b| b.is_ascii_digit())).then_some(rank)
}

/// The files a `model.safetensors.index.json` names (sorted), each a plain file name in the folder, and its
/// `(key, file)` entries.
type IndexFiles = (Vec<String>, Vec<(String, String)>);
fn index_files(bytes: &[u8], path: &Path) -> Result<IndexFiles> {
  let bad = |reason: String| Error::Metadata { path: path.to_path_buf(), reason };
  let v: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| bad(format!("not JSON: {e}")))?;
  let Some(map) = v.get("weight_map").and_then(|m| m.as_object()) else {
    return Err(bad("no weight_map object".into()));
  };
  let mut seen = BTreeSet::new();
  let mut out = Vec::new();
  let mut entries = Vec::with_capacity(map.len());
  for (key, file) in map {
    let Some(f) = file.as_str() else {
      return Err(bad(format!("weight_map entry `{key}` is not a file name")));
    };
    let plain = !f.is_empty() && !f.contains('/') && !f.contains('\\') && f != "." && f != "..";
    if !plain {
      return Err(Error::UnsafePath {
        checkpoint: path.to_path_buf(),
        key: key.clone(),
        relative_path: f.to_owned(),
      });
    }
    if seen.insert(f.to_owned()) {
      out.push(f.to_owned());
    }
    entries.push((key.clone(), f.to_owned()));
  }
  out.sort();
  Ok((out, entries))
}

#[cfg(test)]
mod tests {
  use super::*;

  #[test]
  fn shard_names() {
    assert_eq!(shard_rank("shard-00002-model-00001-of-00001.safetensors"), Some("00002"));
    assert_eq!(shard_rank("model-00001-of-00002.safetensors"), None);
    assert_eq!(shard_rank("shard-x-model-1.safetensors"), None);
  }

  #[test]
  fn index_names_must_be_plain() {
    let p = Path::new("i.json");
    assert_eq!(
      index_files(br#"{"weight_map":{"a":"b.safetensors","c":"a.safetensors","d":"b.safetensors"}}"#, p)
        .unwrap()
        .0,
      ["a.safetensors", "b.safetensors"]
    );
    let e = index_files(br#"{"weight_map":{"a":"../x.safetensors"}}"#, p).unwrap_err();
    assert_eq!(e.code(), "ERR_DISTCP_UNSAFE_PATH");
    assert_eq!(index_files(b"{}", p).unwrap_err().code(), "ERR_DISTCP_METADATA");
  }
}
