//! `dcp.save` for one rank: flatten, write `__0_0.distcp` (non-tensor items first, then tensors, in flattening
//! order, as torch's single-threaded CPU writer does), fsync it, then commit `.metadata` with torch's
//! `.metadata.tmp` → fsync → rename → fsync-the-folder sequence.
//!
//! Crash safety when the folder already holds a checkpoint (a `.metadata`, or a rank-local `__0.metadata`): the old
//! checkpoint stays loadable until the new one is complete, and every moment in between has a `.metadata` that
//! names only complete, fsynced data:
//! 1. the new data goes to a fresh file `__0_0.distcp.<token>.tmp` (fsynced); the old files are untouched;
//! 2. `.metadata` is replaced (tmp + rename) by one that points at that file — the new checkpoint is now live;
//! 3. the old checkpoint's files (the data files its metadata names, plain files directly in the folder, and
//!    rank-local `__N.metadata` files) are removed;
//! 4. `__0_0.distcp` is made a hard link to the new data, `.metadata` is replaced again to point at it, and the
//!    temporary name is removed.
//!
//! A crash before 2 leaves the old checkpoint (plus a stray temporary file, which the next save removes); after 2
//! the new one. The folder ends up with exactly `.metadata` and `__0_0.distcp` (plus files that were never part
//! of a checkpoint, which are left alone). In an empty or new folder the data is written as `__0_0.distcp` at once,
//! as torch does. A failed save (an error, not a crash) removes what it wrote. On a file system without hard
//! links the new data keeps its temporary name (still a valid checkpoint).
//!
//! The whole save holds the folder's lock ([`crate::commit::DirLock`], `.distcp.lock`, removed when the save
//! ends): a second save or conversion into the same folder fails at once with `ERR_DISTCP_LOCKED` and changes
//! nothing. Because every writer holds the lock, the leftovers the lock holder finds are a dead writer's: an
//! unreferenced `__0_0.distcp.<token>.tmp` and `.metadata.tmp` are removed; a temporary data file that
//! `.metadata` names (a save killed after its commit) stays a valid checkpoint until the next save replaces it.
//! Opening a checkpoint never writes.
//!
//! Only files whose names are DCP data files (`__<rank>_<n>.distcp`, distcp's `__0_0.distcp.<token>.tmp`,
//! rank-local `__<rank>.metadata`) that the old `.metadata` names and that are regular files in the folder are
//! ever removed: a `.metadata` naming some other file (`precious.txt`) cannot make a save delete it.

use crate::commit::{crash_point, sync_dir, DirLock};
use crate::error::{Error, Result};
use crate::metadata::{
  Chunk, ItemMetadata, Metadata, PathElem, StorageInfo, StorageKey, TensorMetadata, TensorProperties,
};
use crate::write::flatten::{flatten, Layout};
use crate::write::metadata_writer::{metadata_pickle, MetadataDoc, DCP_VERSION};
use crate::write::record::{pickle_value, write_archive, Pickled};
use crate::write::value::{SaveValue, TensorRef};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

/// The data file torch's rank 0 writes.
pub const DATA_FILE: &str = "__0_0.distcp";
pub(crate) const METADATA: &str = ".metadata";
pub(crate) const METADATA_TMP: &str = ".metadata.tmp";
const TMP_PREFIX: &str = "__0_0.distcp.";
pub(crate) const TMP_SUFFIX: &str = ".tmp";
pub(crate) const SHARD_METADATA: &str = "torch.distributed._shard.sharded_tensor.metadata";

/// Where [`save`] stops on purpose, to test crash safety (see [`SaveOptions::fail_at`]).
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailPoint {
  /// After the first item of the data file is written.
  AfterFirstItem,
  /// After the data file is complete and fsynced, before any `.metadata` is written.
  BeforeCommit,
  /// Replacing a checkpoint: after `.metadata` points at the temporary data file.
  AfterCommit,
  /// Replacing a checkpoint: after the old files are gone and `__0_0.distcp` links to the new data.
  AfterLink,
  /// Replacing a checkpoint: after `.metadata` points at `__0_0.distcp`, before the temporary name is removed.
  AfterFinalCommit,
}

impl FailPoint {
  /// The name [`FailPoint::from_name`] takes; `save:<name>` is its crash point (`DISTCP_TEST_CRASH_AT`).
  pub fn name(self) -> &'static str {
    match self {
      FailPoint::AfterFirstItem => "afterFirstItem",
      FailPoint::BeforeCommit => "beforeCommit",
      FailPoint::AfterCommit => "afterCommit",
      FailPoint::AfterLink => "afterLink",
      FailPoint::AfterFinalCommit => "afterFinalCommit",
    }
  }

  pub fn from_name(name: &str) -> Option<FailPoint> {
    Some(match name {
      "afterFirstItem" => FailPoint::AfterFirstItem,
      "beforeCommit" => FailPoint::BeforeCommit,
      "afterCommit" => FailPoint::AfterCommit,
      "afterLink" => FailPoint::AfterLink,
      "afterFinalCommit" => FailPoint::AfterFinalCommit,
      _ => return None,
    })
  }
}

/// How [`save`] writes; [`SaveOptions::default`] writes what torch ≥ 2.4 writes, fsynced.
#[derive(Debug, Clone)]
pub struct SaveOptions {
  /// Which torch traversal makes the flat keys (default: torch ≥ 2.4's).
  pub layout: Layout,
  /// `Metadata.version` (default `"1.0.0"`, what torch ≥ 2.9 writes; older versions keep it as a plain attribute).
  pub version: Option<String>,
  /// fsync data, metadata and folder (default true; off only for tests and throwaway output).
  pub sync: bool,
  /// Test hook: stop at this point, with an I/O error (`abort == false`) or by aborting the process (a crash).
  #[doc(hidden)]
  pub fail_at: Option<(FailPoint, bool)>,
  /// Asked before the bytes of each item are read, when the caller is still filling them (default: none, every
  /// byte is in place when `save` is called).
  pub ready: Option<std::sync::Arc<dyn BytesReady>>,
}

/// Lets a save start writing while its caller still fills the tensors' memory (the binding copies the state dict
/// into staging memory on the JS thread while the writer already writes the first items): the writer waits here
/// for the bytes it is about to read.
pub trait BytesReady: Send + Sync + std::fmt::Debug {
  /// Returns once `data` (a tensor's or a bytes value's memory) holds its final bytes; an error stops the save.
  fn wait(&self, data: &[u8]) -> io::Result<()>;
}

impl Default for SaveOptions {
  fn default() -> Self {
    SaveOptions {
      layout: Layout::Torch24,
      version: Some(DCP_VERSION.to_owned()),
      sync: true,
      fail_at: None,
      ready: None,
    }
  }
}

/// What a save wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct SaveSummary {
  /// Flat keys, in `.metadata` order.
  pub keys: Vec<String>,
  /// Tensors written.
  pub tensors: usize,
  /// Non-tensor values written (each a pickled `torch.save` item).
  pub objects: usize,
  /// The data file `.metadata` names (`__0_0.distcp`).
  pub data_file: String,
  /// Size of the data file.
  pub data_bytes: u64,
  /// Size of `.metadata`.
  pub metadata_bytes: u64,
  /// An older checkpoint was replaced.
  pub replaced: bool,
}

enum Kind<'v, 'a> {
  Tensor(&'v TensorRef<'a>),
  Object,
}

struct Planned<'v, 'a> {
  key: String,
  path: Vec<PathElem>,
  kind: Kind<'v, 'a>,
  pickled: Pickled<'a>,
}

/// Saves the state dict `root` (a [`SaveValue::Dict`]) into the checkpoint folder `dir`, created if needed. Bytes
/// of tensors are read from the caller's slices while they are written.
pub fn save(dir: impl AsRef<Path>, root: &SaveValue, options: &SaveOptions) -> Result<SaveSummary> {
  let dir = dir.as_ref();
  let invalid =
    |key: String, reason: String| Error::InvalidInput { checkpoint: dir.to_path_buf(), key, reason };

  // everything that can be wrong with the input is found before the disk is touched
  let flat = flatten(root, options.layout).map_err(|e| invalid(e.key, e.reason))?;
  let mut planned = Vec::with_capacity(flat.len());
  for item in flat {
    let kind = match item.value {
      SaveValue::Tensor(t) => Kind::Tensor(t),
      _ => Kind::Object,
    };
    if let (Kind::Object, Some(ready)) = (&kind, &options.ready) {
      // pickling an object reads its bytes values now (they go into data.pkl), not when it is written
      wait_inside(item.value, ready.as_ref()).map_err(|e| Error::io(dir, e))?;
    }
    let pickled = pickle_value(item.value).map_err(|r| invalid(item.key.clone(), r))?;
    planned.push(Planned { key: item.key, path: item.path, kind, pickled });
  }

  match fs::metadata(dir) {
    Ok(m) if m.is_dir() => {}
    Ok(_) => return Err(Error::NotADirectory { path: dir.to_path_buf() }),
    Err(e) if e.kind() == io::ErrorKind::NotFound => {
      fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    Err(e) => return Err(Error::io(dir, e)),
  }
  // held until the save returns; its leftovers (below) are a dead writer's
  let _lock = DirLock::acquire(dir)?;
  crash_point("save:locked");
  let old = OldCheckpoint::scan(dir)?;
  old.remove_stale(dir);

  let replacing = old.exists;
  let data_name =
    if replacing { format!("{TMP_PREFIX}{}{TMP_SUFFIX}", token()) } else { DATA_FILE.to_owned() };
  let data_path = dir.join(&data_name);

  let written = write_data(&data_path, &data_name, &planned, options).and_then(|storage| {
    fail(options, FailPoint::BeforeCommit, &data_path)?;
    let bytes = metadata_bytes(dir, &planned, &storage, options)?;
    commit_metadata(dir, &bytes, options.sync)?;
    Ok((storage, bytes.len() as u64))
  });
  let (storage, mut metadata_len) = match written {
    Ok(w) => w,
    Err(e) => {
      let _ = fs::remove_file(&data_path);
      let _ = fs::remove_file(dir.join(METADATA_TMP));
      return Err(e);
    }
  };
  let data_bytes = storage.last().map_or(0, |(_, i)| i.offset + i.length);

  let mut data_file = data_name.clone();
  if replacing {
    // the new checkpoint is live (its .metadata names `data_name`); the rest is tidying up
    fail(options, FailPoint::AfterCommit, &data_path)?;
    old.remove_files(dir, &data_name);
    let final_path = dir.join(DATA_FILE);
    let _ = fs::remove_file(&final_path);
    if fs::hard_link(&data_path, &final_path).is_ok() {
      if options.sync {
        sync_dir(dir)?;
      }
      fail(options, FailPoint::AfterLink, &data_path)?;
      let renamed: Vec<(StorageKey, StorageInfo)> = storage
        .iter()
        .map(|(k, i)| (k.clone(), StorageInfo { relative_path: DATA_FILE.to_owned(), ..i.clone() }))
        .collect();
      let bytes = metadata_bytes(dir, &planned, &renamed, options)?;
      match commit_metadata(dir, &bytes, options.sync) {
        Ok(()) => {
          metadata_len = bytes.len() as u64;
          data_file = DATA_FILE.to_owned();
          fail(options, FailPoint::AfterFinalCommit, &data_path)?;
          fs::remove_file(&data_path).map_err(|e| Error::io(&data_path, e))?;
          if options.sync {
            sync_dir(dir)?;
          }
        }
        Err(e) => {
          // .metadata still names the temporary file, which is complete: the save stands
          let _ = fs::remove_file(&final_path);
          let _ = fs::remove_file(dir.join(METADATA_TMP));
          return Err(e);
        }
      }
    }
  }

  let tensors = planned.iter().filter(|p| matches!(p.kind, Kind::Tensor(_))).count();
  Ok(SaveSummary {
    keys: planned.iter().map(|p| p.key.clone()).collect(),
    tensors,
    objects: planned.len() - tensors,
    data_file,
    data_bytes,
    metadata_bytes: metadata_len,
    replaced: replacing,
  })
}

/// Waits (see [`SaveOptions::ready`]) for every bytes value and tensor inside `v`.
fn wait_inside(v: &SaveValue, ready: &dyn BytesReady) -> io::Result<()> {
  match v {
    SaveValue::Bytes(b) => ready.wait(b),
    SaveValue::Tensor(t) => ready.wait(t.data),
    SaveValue::List(items) | SaveValue::Tuple(items) => items.iter().try_for_each(|x| wait_inside(x, ready)),
    SaveValue::Dict(pairs) => pairs.iter().try_for_each(|(k, x)| {
      wait_inside(k, ready)?;
      wait_inside(x, ready)
    }),
    _ => Ok(()),
  }
}

pub(crate) fn token() -> String {
  let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
  format!("{:x}{:x}", crate::commit::process_id(), nanos & 0xffff_ffff_ffff)
}

fn fail(options: &SaveOptions, at: FailPoint, path: &Path) -> Result<()> {
  crash_point(&format!("save:{}", at.name()));
  match options.fail_at {
    Some((p, abort)) if p == at => {
      if abort {
        std::process::abort();
      }
      Err(Error::io(path, io::Error::other(format!("injected failure ({at:?})"))))
    }
    _ => Ok(()),
  }
}

/// Writes the data file: non-tensor items first, then tensors; returns each item's storage entry.
fn write_data(
  path: &Path,
  name: &str,
  planned: &[Planned],
  options: &SaveOptions,
) -> Result<Vec<(StorageKey, StorageInfo)>> {
  let io_err = |e| Error::io(path, e);
  let file = OpenOptions::new().write(true).create(true).truncate(true).open(path).map_err(io_err)?;
  let mut out = BufWriter::with_capacity(256 << 10, file);
  let order = planned
    .iter()
    .filter(|p| matches!(p.kind, Kind::Object))
    .chain(planned.iter().filter(|p| matches!(p.kind, Kind::Tensor(_))));
  let mut storage = Vec::with_capacity(planned.len());
  let mut pos = 0u64;
  for (i, p) in order.enumerate() {
    if let Some(ready) = &options.ready {
      for s in &p.pickled.storages {
        ready.wait(s).map_err(io_err)?;
      }
    }
    let (_, len) = write_archive(&mut out, &p.pickled).map_err(io_err)?;
    let offset = match p.kind {
      Kind::Tensor(t) => Some(vec![0; t.shape.len()]),
      Kind::Object => None,
    };
    storage.push((
      StorageKey { fqn: p.key.clone(), offset },
      StorageInfo { relative_path: name.to_owned(), offset: pos, length: len, transform_descriptors: vec![] },
    ));
    pos += len;
    if i == 0 {
      out.flush().map_err(io_err)?;
      fail(options, FailPoint::AfterFirstItem, path)?;
    }
  }
  let file = out.into_inner().map_err(|e| io_err(e.into_error()))?;
  if options.sync {
    file.sync_all().map_err(io_err)?;
  }
  Ok(storage)
}

fn metadata_bytes(
  dir: &Path,
  planned: &[Planned],
  storage: &[(StorageKey, StorageInfo)],
  options: &SaveOptions,
) -> Result<Vec<u8>> {
  let items: Vec<(String, ItemMetadata)> = planned
    .iter()
    .map(|p| {
      let item = match p.kind {
        Kind::Tensor(t) => ItemMetadata::Tensor(TensorMetadata {
          properties: TensorProperties {
            dtype: t.dtype,
            requires_grad: false,
            pin_memory: false,
            module: SHARD_METADATA.to_owned(),
          },
          size: t.shape.clone(),
          chunks: vec![Chunk { offsets: vec![0; t.shape.len()], sizes: t.shape.clone() }],
        }),
        Kind::Object => ItemMetadata::Bytes,
      };
      (p.key.clone(), item)
    })
    .collect();
  let planner: Vec<(String, Vec<PathElem>)> =
    planned.iter().map(|p| (p.key.clone(), p.path.clone())).collect();
  metadata_pickle(
    &MetadataDoc {
      items: &items,
      planner_data: Some(&planner),
      storage_data: storage,
      version: options.version.as_deref(),
    },
    &dir.join(METADATA),
  )
}

/// `.metadata.tmp` → fsync → rename over `.metadata` → fsync the folder.
pub(crate) fn commit_metadata(dir: &Path, bytes: &[u8], sync: bool) -> Result<()> {
  commit_metadata_as(dir, METADATA, METADATA_TMP, bytes, sync)
}

/// `tmp_name` → fsync → rename over `name` → fsync the folder (`.metadata`, or a rank-local `__{rank}.metadata`).
pub(crate) fn commit_metadata_as(
  dir: &Path,
  name: &str,
  tmp_name: &str,
  bytes: &[u8],
  sync: bool,
) -> Result<()> {
  let tmp = dir.join(tmp_name);
  let mut f = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
  f.write_all(bytes).map_err(|e| Error::io(&tmp, e))?;
  if sync {
    f.sync_all().map_err(|e| Error::io(&tmp, e))?;
  }
  drop(f);
  let target = dir.join(name);
  fs::rename(&tmp, &target).map_err(|e| Error::io(&target, e))?;
  if sync {
    sync_dir(dir)?;
  }
  Ok(())
}

/// The checkpoint a folder holds before a save.
pub(crate) struct OldCheckpoint {
  pub(crate) exists: bool,
  /// Files of the old checkpoint directly in the folder: data files its metadata names, rank-local metadata.
  pub(crate) files: Vec<String>,
}

pub(crate) fn is_plain_name(rel: &str) -> bool {
  let p = Path::new(rel);
  let mut c = p.components();
  matches!((c.next(), c.next()), (Some(std::path::Component::Normal(_)), None))
    && !rel.contains(['/', '\\'])
    && rel != METADATA
}

/// A file name DCP data lives under: torch's `__<rank>_<n>.distcp`, distcp's temporary `__0_0.distcp.<token>.tmp`,
/// or a rank-local `__<rank>.metadata`. Nothing else is ever removed as part of an old checkpoint.
pub(crate) fn is_data_file_name(name: &str) -> bool {
  let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
  let torch = name
    .strip_prefix("__")
    .and_then(|s| s.strip_suffix(".distcp"))
    .and_then(|s| s.split_once('_'))
    .is_some_and(|(r, n)| digits(r) && digits(n));
  let ours = is_temp_data_name(name);
  torch || ours || is_rank_metadata(name)
}

/// distcp's temporary data file name `__<rank>_<n>.distcp.<token>.tmp` (rank 0's single-rank save, or any rank of a
/// multi-rank save, [`crate::write::ranks`]).
pub(crate) fn is_temp_data_name(name: &str) -> bool {
  let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
  name
    .strip_prefix("__")
    .and_then(|s| s.strip_suffix(TMP_SUFFIX))
    .and_then(|s| s.split_once(".distcp."))
    .is_some_and(|(rn, t)| {
      rn.split_once('_').is_some_and(|(r, n)| digits(r) && digits(n))
        && !t.is_empty()
        && t.bytes().all(|b| b.is_ascii_alphanumeric())
    })
}

pub(crate) fn is_rank_metadata(name: &str) -> bool {
  name
    .strip_prefix("__")
    .and_then(|s| s.strip_suffix(".metadata"))
    .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

impl OldCheckpoint {
  pub(crate) fn scan(dir: &Path) -> Result<OldCheckpoint> {
    let mut metadata_files: Vec<PathBuf> = Vec::new();
    let mut files = Vec::new();
    if dir.join(METADATA).is_file() {
      metadata_files.push(dir.join(METADATA));
    }
    let entries = fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    for e in entries.flatten() {
      let name = e.file_name().to_string_lossy().into_owned();
      if is_rank_metadata(&name) {
        metadata_files.push(dir.join(&name));
        files.push(name);
      }
    }
    for m in &metadata_files {
      // an unreadable old .metadata names nothing we could remove safely; it is replaced all the same
      let Ok(bytes) = fs::read(m) else { continue };
      let Ok(md) = Metadata::parse(&bytes, m) else { continue };
      for info in md.storage_data.values() {
        if is_plain_name(&info.relative_path)
          && is_data_file_name(&info.relative_path)
          && !files.contains(&info.relative_path)
        {
          files.push(info.relative_path.clone());
        }
      }
    }
    Ok(OldCheckpoint { exists: !metadata_files.is_empty(), files })
  }

  /// Leftovers of interrupted saves: `.metadata.tmp`, and temporary data files no metadata names.
  pub(crate) fn remove_stale(&self, dir: &Path) {
    let _ = fs::remove_file(dir.join(METADATA_TMP));
    let Ok(entries) = fs::read_dir(dir) else { return };
    for e in entries.flatten() {
      let name = e.file_name().to_string_lossy().into_owned();
      if is_temp_data_name(&name) && !self.files.contains(&name) {
        let _ = fs::remove_file(e.path());
      }
    }
  }

  /// Removes the old checkpoint's files (regular files only; never `keep`).
  pub(crate) fn remove_files(&self, dir: &Path, keep: &str) {
    for name in &self.files {
      if name == keep {
        continue;
      }
      let path = dir.join(name);
      if fs::symlink_metadata(&path).is_ok_and(|m| m.is_file()) {
        let _ = fs::remove_file(&path);
      }
    }
  }
}

#[cfg(test)]
mod tests {
  use super::*;
  use crate::checkpoint::Checkpoint;
  use crate::dtype::DType;
  use crate::torch_save::PyObject;

  fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("distcp-save-{name}-{}", token()));
    let _ = fs::remove_dir_all(&d);
    d
  }

  fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
      fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
  }

  fn state<'a>(w: &'a [u8], step: i64) -> SaveValue<'a> {
    let s = |x: &str| SaveValue::Str(x.into());
    SaveValue::Dict(vec![
      (
        s("model"),
        SaveValue::Dict(vec![(
          s("w"),
          SaveValue::Tensor(TensorRef { dtype: DType::Float32, shape: vec![2, 2], data: w }),
        )]),
      ),
      (s("step"), SaveValue::Int(step)),
      (
        s("optim"),
        SaveValue::Dict(vec![(
          s("param_groups"),
          SaveValue::List(vec![SaveValue::Dict(vec![(s("lr"), SaveValue::Float(0.5))])]),
        )]),
      ),
    ])
  }

  fn floats(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
  }

  fn check(dir: &Path, w: &[u8], step: i64) {
    let ck = Checkpoint::open(dir, None).unwrap();
    let keys: Vec<&str> = ck.keys().collect();
    assert_eq!(keys, ["model.w", "step", "optim.param_groups.0.lr"]);
    assert_eq!(ck.read_tensor("model.w").unwrap(), w);
    assert_eq!(ck.read_object("step").unwrap(), PyObject::Int(step));
    assert_eq!(ck.read_object("optim.param_groups.0.lr").unwrap(), PyObject::Float(0.5));
    let pd = ck.metadata.planner_data.as_ref().unwrap();
    assert_eq!(
      pd["optim.param_groups.0.lr"],
      vec![
        PathElem::Key("optim".into()),
        PathElem::Key("param_groups".into()),
        PathElem::Index(0),
        PathElem::Key("lr".into())
      ]
    );
  }

  #[test]
  fn saves_and_replaces() {
    let dir = tmpdir("replace");
    let w1 = floats(&[1.0, 2.0, 3.0, 4.0]);
    let s = save(&dir, &state(&w1, 1), &SaveOptions::default()).unwrap();
    assert!(!s.replaced);
    assert_eq!((s.tensors, s.objects), (1, 2));
    assert_eq!(listing(&dir), [".metadata", "__0_0.distcp"]);
    check(&dir, &w1, 1);
    // objects come first in the data file
    let ck = Checkpoint::open(&dir, None).unwrap();
    assert_eq!(ck.object_location("step").unwrap().offset, 0);

    let w2 = floats(&[5.0, 6.0, 7.0, 8.0]);
    let s = save(&dir, &state(&w2, 2), &SaveOptions::default()).unwrap();
    assert!(s.replaced);
    assert_eq!(s.data_file, DATA_FILE);
    assert_eq!(listing(&dir), [".metadata", "__0_0.distcp"]);
    check(&dir, &w2, 2);
    fs::remove_dir_all(&dir).unwrap();
  }

  #[test]
  fn a_failed_save_keeps_the_old_checkpoint() {
    let dir = tmpdir("fail");
    let w1 = floats(&[1.0, 2.0, 3.0, 4.0]);
    save(&dir, &state(&w1, 1), &SaveOptions::default()).unwrap();
    let w2 = floats(&[5.0, 6.0, 7.0, 8.0]);
    for at in [FailPoint::AfterFirstItem, FailPoint::BeforeCommit] {
      let opts = SaveOptions { fail_at: Some((at, false)), ..Default::default() };
      let e = save(&dir, &state(&w2, 2), &opts).unwrap_err();
      assert!(e.to_string().contains("injected failure"), "{e}");
      assert_eq!(listing(&dir), [".metadata", "__0_0.distcp"], "{at:?}");
      check(&dir, &w1, 1);
    }
    // past the commit the new checkpoint is live, whatever happens next
    for at in [FailPoint::AfterCommit, FailPoint::AfterLink, FailPoint::AfterFinalCommit] {
      let opts = SaveOptions { fail_at: Some((at, false)), ..Default::default() };
      assert!(save(&dir, &state(&w2, 2), &opts).is_err());
      check(&dir, &w2, 2);
      // and the next save tidies up
      save(&dir, &state(&w1, 1), &SaveOptions::default()).unwrap();
      assert_eq!(listing(&dir), [".metadata", "__0_0.distcp"], "{at:?}");
      check(&dir, &w1, 1);
    }
    // bad input is found before anything is written
    let short = SaveValue::Dict(vec![(
      SaveValue::Str("w".into()),
      SaveValue::Tensor(TensorRef { dtype: DType::Float32, shape: vec![3], data: &[0; 11] }),
    )]);
    let e = save(&dir, &short, &SaveOptions::default()).unwrap_err();
    assert_eq!(e.code(), "ERR_DISTCP_INVALID_INPUT");
    assert!(e.to_string().contains("needs 12 bytes, its data has 11"), "{e}");
    check(&dir, &w1, 1);
    fs::remove_dir_all(&dir).unwrap();
  }

  #[test]
  fn a_failed_first_save_leaves_nothing() {
    let dir = tmpdir("first");
    let w = floats(&[1.0, 2.0, 3.0, 4.0]);
    let opts = SaveOptions { fail_at: Some((FailPoint::AfterFirstItem, false)), ..Default::default() };
    assert!(save(&dir, &state(&w, 1), &opts).is_err());
    assert!(listing(&dir).is_empty());
    fs::remove_dir_all(&dir).unwrap();
  }

  #[test]
  fn a_save_never_deletes_a_file_the_old_metadata_names_unless_it_is_a_data_file() {
    let dir = tmpdir("precious");
    let w = floats(&[1.0, 2.0, 3.0, 4.0]);
    save(&dir, &state(&w, 1), &SaveOptions::default()).unwrap();
    // an old .metadata whose data file is `precious.txt` (a user's file that happens to be named there)
    let mut md = Metadata::parse(&fs::read(dir.join(METADATA)).unwrap(), Path::new("m")).unwrap();
    fs::rename(dir.join(DATA_FILE), dir.join("precious.txt")).unwrap();
    for info in md.storage_data.values_mut() {
      info.relative_path = "precious.txt".into();
    }
    fs::write(dir.join(METADATA), md.to_pickle(Path::new("m")).unwrap()).unwrap();
    let precious = fs::read(dir.join("precious.txt")).unwrap();
    save(&dir, &state(&w, 2), &SaveOptions::default()).unwrap();
    check(&dir, &w, 2);
    assert_eq!(listing(&dir), [".metadata", "__0_0.distcp", "precious.txt"]);
    assert_eq!(fs::read(dir.join("precious.txt")).unwrap(), precious);
    fs::remove_dir_all(&dir).unwrap();
  }

  #[test]
  fn a_locked_folder_is_refused_and_left_alone() {
    let dir = tmpdir("locked");
    let w = floats(&[1.0, 2.0, 3.0, 4.0]);
    save(&dir, &state(&w, 1), &SaveOptions::default()).unwrap();
    let held = DirLock::acquire(&dir).unwrap();
    let e = save(&dir, &state(&w, 2), &SaveOptions::default()).unwrap_err();
    assert_eq!(e.code(), "ERR_DISTCP_LOCKED");
    assert!(e.to_string().contains(&format!("pid {}", std::process::id())), "{e}");
    drop(held);
    assert_eq!(listing(&dir), [".metadata", "__0_0.distcp"]);
    check(&dir, &w, 1);
    fs::remove_dir_all(&dir).unwrap();
  }

  #[test]
  fn data_file_names() {
    for n in ["__0_0.distcp", "__12_3.distcp", "__0_0.distcp.1a2b.tmp", "__3.metadata"] {
      assert!(is_data_file_name(n), "{n}");
    }
    for n in
      ["precious.txt", "__0_0.distcp.tmp", "__a_0.distcp", "__0_0.distcp.x/y.tmp", ".metadata", "__0_.distcp"]
    {
      assert!(!is_data_file_name(n), "{n}");
    }
  }

  #[test]
  fn a_file_is_not_a_checkpoint_folder() {
    let dir = tmpdir("file");
    fs::write(&dir, b"x").unwrap();
    let e = save(&dir, &state(&floats(&[0.0; 4]), 1), &SaveOptions::default()).unwrap_err();
    assert_eq!(e.code(), "ERR_DISTCP_NOT_A_DIRECTORY");
    fs::remove_file(&dir).unwrap();
  }

  #[test]
  fn old_multi_file_checkpoints_are_removed_but_other_files_kept() {
    let dir = tmpdir("multi");
    let w = floats(&[1.0, 2.0, 3.0, 4.0]);
    save(&dir, &state(&w, 1), &SaveOptions::default()).unwrap();
    // pretend the old checkpoint had a second data file, plus an unrelated file of the user's
    let mut md = Metadata::parse(&fs::read(dir.join(METADATA)).unwrap(), Path::new("m")).unwrap();
    fs::copy(dir.join(DATA_FILE), dir.join("__1_0.distcp")).unwrap();
    for info in md.storage_data.values_mut() {
      if info.offset == 0 {
        info.relative_path = "__1_0.distcp".into();
      }
    }
    fs::write(dir.join(METADATA), md.to_pickle(Path::new("m")).unwrap()).unwrap();
    fs::write(dir.join("README"), b"mine").unwrap();
    fs::write(dir.join("__0_0.distcp.deadbeef.tmp"), b"stale").unwrap();
    check(&dir, &w, 1);
    save(&dir, &state(&w, 3), &SaveOptions::default()).unwrap();
    assert_eq!(listing(&dir), [".metadata", "README", "__0_0.distcp"]);
    check(&dir, &w, 3);
    fs::remove_dir_all(&dir).unwrap();
  }
}
