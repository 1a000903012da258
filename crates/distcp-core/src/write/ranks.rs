//! `dcp.save` across ranks: the parts of torch's `FileSystemWriter` that touch the disk, for a save whose planning
//! (dedup, global plan) and coordination happen elsewhere (the TypeScript layer, over c10d's TCPStore):
//! - [`write_rank_data`]: one rank writes its final plan's items into its data file (`__{rank}_0.distcp`), non-tensor
//!   items first, then tensors, in plan order (torch's single-threaded writer), fsynced; it returns the storage entries
//!   (`WriteResult`s) the coordinator needs;
//! - [`RanksSave`]: the coordinator (rank 0) holds the folder lock for the whole save, names every rank's data file,
//!   and after every rank reported success writes the merged `.metadata` last ([`RanksSave::commit`]).
//!
//! Crash safety as a single-rank save ([`crate::write::save()`]): when the folder already holds a checkpoint (or a file
//! under one of the final names), every rank writes `__{rank}_0.distcp.<token>.tmp`; `.metadata` first names those,
//! then the old checkpoint's files are removed, each temporary file is linked to its final name and `.metadata` is
//! committed again. A rank that dies leaves no `.metadata` change: the previous checkpoint stays loadable.
//!
//! [`RankLocalSave`] is torch's `use_collectives=False`: each rank writes `__{rank}_0.distcp` and its own
//! `__{rank}.metadata`, with no coordination; the same crash safety, for that rank's files only.

use crate::commit::{rank_lock_name, start_writeback, sync_dir, DirLock};
use crate::error::{Error, Result};
use crate::metadata::{ItemMetadata, Metadata, PathElem, StorageInfo, StorageKey};
use crate::write::flatten::{flatten, Layout};
use crate::write::metadata_writer::{metadata_pickle, MetadataDoc};
use crate::write::record::{pickle_value, write_archive, Pickled};
use crate::write::save::{
  commit_metadata, commit_metadata_as, is_data_file_name, is_plain_name, is_temp_data_name, token,
  OldCheckpoint, METADATA, METADATA_TMP, TMP_SUFFIX,
};
use crate::write::value::SaveValue;
use std::collections::HashMap;
use std::fs::{self, OpenOptions};
use std::io::BufWriter;
use std::path::{Path, PathBuf};

/// The most ranks one save may have (names and plans are sized from it).
pub const MAX_RANKS: usize = 1 << 20;

/// A rank's data file is handed to the disk (`sync_file_range`) every this many bytes as it is written.
const WRITEBACK_BYTES: u64 = 32 << 20;

/// One item of a rank's final plan: a flat key of its state dict, and for a tensor the chunk's offsets in the whole
/// tensor (zeros for a replicated tensor); `None` for a non-tensor item.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedItem {
  pub key: String,
  pub offsets: Option<Vec<u64>>,
}

/// The final data file name of `rank` (`__{rank}_0.distcp`, torch's `_StoragePrefix("__{rank}_")` + bucket 0).
pub fn rank_file_name(rank: usize) -> String {
  format!("__{rank}_0.distcp")
}

/// Writes the items `plan` names from this rank's state dict `root` into `dir/file_name` (created or truncated):
/// non-tensor items first, then tensors, each in plan order; returns each item's storage entry, in write order.
pub fn write_rank_data(
  dir: &Path,
  file_name: &str,
  root: &SaveValue,
  layout: Layout,
  plan: &[PlannedItem],
  sync: bool,
) -> Result<Vec<(StorageKey, StorageInfo)>> {
  let invalid = |key: &str, reason: String| Error::InvalidInput {
    checkpoint: dir.to_path_buf(),
    key: key.to_owned(),
    reason,
  };
  if !is_data_file_name(file_name) {
    return Err(invalid("", format!("`{file_name}` is not a DCP data file name")));
  }
  let flat = flatten(root, layout).map_err(|e| invalid(&e.key, e.reason))?;
  let by_key: HashMap<&str, &SaveValue> = flat.iter().map(|f| (f.key.as_str(), f.value)).collect();
  let mut planned: Vec<(&PlannedItem, Pickled, bool)> = Vec::with_capacity(plan.len());
  for item in plan {
    let value = by_key.get(item.key.as_str()).ok_or_else(|| {
      invalid(&item.key, "the plan names a key this rank's state dict does not have".into())
    })?;
    let tensor = match (value, &item.offsets) {
      (SaveValue::Tensor(t), Some(off)) if off.len() == t.shape.len() => true,
      (SaveValue::Tensor(t), _) => {
        return Err(invalid(&item.key, format!("a tensor chunk needs {} offsets", t.shape.len())));
      }
      (_, None) => false,
      (_, Some(_)) => return Err(invalid(&item.key, "offsets given for a non-tensor item".into())),
    };
    let pickled = pickle_value(value).map_err(|r| invalid(&item.key, r))?;
    planned.push((item, pickled, tensor));
  }

  let path = dir.join(file_name);
  let io_err = |e| Error::io(&path, e);
  let file = OpenOptions::new().write(true).create(true).truncate(true).open(&path).map_err(io_err)?;
  let mut out = BufWriter::with_capacity(256 << 10, file);
  let mut storage = Vec::with_capacity(planned.len());
  let mut pos = 0u64;
  // where the last writeback kick ended: ranks write side by side, and the disk should start on their bytes at once
  // rather than when the kernel's dirty threshold is reached (or at the final fsync)
  let mut kicked = 0u64;
  for (item, pickled, _) in planned.iter().filter(|p| !p.2).chain(planned.iter().filter(|p| p.2)) {
    let (_, len) = write_archive(&mut out, pickled).map_err(io_err)?;
    let in_kernel = pos.saturating_add(len).saturating_sub(out.buffer().len() as u64);
    if sync && in_kernel.saturating_sub(kicked) >= WRITEBACK_BYTES {
      start_writeback(out.get_ref(), kicked, in_kernel.saturating_sub(kicked));
      kicked = in_kernel;
    }
    storage.push((
      StorageKey { fqn: item.key.clone(), offset: item.offsets.clone() },
      StorageInfo {
        relative_path: file_name.to_owned(),
        offset: pos,
        length: len,
        transform_descriptors: vec![],
      },
    ));
    pos =
      pos.checked_add(len).ok_or_else(|| invalid(&item.key, "data file larger than 2^64 bytes".into()))?;
  }
  let file = out.into_inner().map_err(|e| io_err(e.into_error()))?;
  if sync {
    file.sync_all().map_err(io_err)?;
  }
  Ok(storage)
}

/// What rank 0 merged from every rank's plan and write results: `.metadata`'s contents, in torch's orders.
#[derive(Debug, Clone, Default)]
pub struct RanksMetadata {
  pub items: Vec<(String, ItemMetadata)>,
  pub planner_data: Vec<(String, Vec<PathElem>)>,
  /// Rank order, then each rank's write order.
  pub storage: Vec<(StorageKey, StorageInfo)>,
  pub version: Option<String>,
}

impl RanksMetadata {
  /// The pickled metadata naming `storage` (the files as they are at this commit), for the file at `path`.
  fn pickle(&self, storage: &[(StorageKey, StorageInfo)], path: &Path) -> Result<Vec<u8>> {
    metadata_pickle(
      &MetadataDoc {
        items: &self.items,
        planner_data: Some(&self.planner_data),
        storage_data: storage,
        version: self.version.as_deref(),
      },
      path,
    )
  }
}

/// The coordinator's side of a multi-rank save: holds the folder lock from [`RanksSave::begin`] until it is dropped.
pub struct RanksSave {
  dir: PathBuf,
  _lock: DirLock,
  old: OldCheckpoint,
  world: usize,
  /// Whether ranks write temporary names (something is at the path already).
  pub replacing: bool,
  token: String,
}

impl RanksSave {
  /// Creates the folder if needed, takes its lock (`ERR_DISTCP_LOCKED` when another save or conversion holds it)
  /// and removes a dead writer's leftovers.
  pub fn begin(dir: impl AsRef<Path>, world: usize) -> Result<RanksSave> {
    let dir = dir.as_ref().to_path_buf();
    if world == 0 || world > MAX_RANKS {
      return Err(Error::InvalidInput {
        checkpoint: dir,
        key: String::new(),
        reason: format!("world size {world} is not in 1..={MAX_RANKS}"),
      });
    }
    ensure_dir(&dir)?;
    let lock = DirLock::acquire(&dir)?;
    let old = OldCheckpoint::scan(&dir)?;
    old.remove_stale(&dir);
    // a file already under a final name (an old checkpoint's, or a dead save's) is never overwritten in place
    let replacing =
      old.exists || (0..world).any(|r| fs::symlink_metadata(dir.join(rank_file_name(r))).is_ok());
    Ok(RanksSave { dir, _lock: lock, old, world, replacing, token: token() })
  }

  /// The file `rank` writes in this save.
  pub fn file_name(&self, rank: usize) -> String {
    if self.replacing {
      format!("{}.{}{TMP_SUFFIX}", rank_file_name(rank), self.token)
    } else {
      rank_file_name(rank)
    }
  }

  /// Writes `.metadata` (tmp → fsync → rename → fsync folder) naming the files this save wrote; when replacing,
  /// then removes the old checkpoint's files, links each temporary file to its final name and commits again.
  /// Returns the final `.metadata` size and whether an old checkpoint was replaced.
  pub fn commit(&self, md: &RanksMetadata, sync: bool) -> Result<u64> {
    let ours: Vec<String> = (0..self.world).map(|r| self.file_name(r)).collect();
    for (key, info) in &md.storage {
      if !ours.contains(&info.relative_path) {
        return Err(Error::Metadata {
          path: self.dir.join(METADATA),
          reason: format!(
            "`{}` is stored in `{}`, which is no rank's file in this save",
            key.fqn, info.relative_path
          ),
        });
      }
    }
    let bytes = self.pickle(md, &md.storage)?;
    commit_metadata(&self.dir, &bytes, sync)?;
    if !self.replacing {
      return Ok(bytes.len() as u64);
    }
    // live now; the rest tidies up, and a failure leaves a valid checkpoint naming the temporary files
    self.old.remove_files(&self.dir, "");
    let mut renamed = md.storage.clone();
    let mut linked = Vec::new();
    for r in 0..self.world {
      let (tmp, fin) = (self.dir.join(self.file_name(r)), self.dir.join(rank_file_name(r)));
      if !tmp.exists() {
        continue;
      }
      let _ = fs::remove_file(&fin);
      if fs::hard_link(&tmp, &fin).is_err() {
        return Ok(bytes.len() as u64);
      }
      linked.push((self.file_name(r), rank_file_name(r)));
    }
    if sync && sync_dir(&self.dir).is_err() {
      return Ok(bytes.len() as u64);
    }
    for (_, info) in renamed.iter_mut() {
      if let Some((_, fin)) = linked.iter().find(|(t, _)| *t == info.relative_path) {
        info.relative_path = fin.clone();
      }
    }
    // past the first commit nothing may fail the save: the caller would take it for lost and remove its files
    let first = bytes.len() as u64;
    let Ok(bytes) = self.pickle(md, &renamed) else { return Ok(first) };
    if commit_metadata(&self.dir, &bytes, sync).is_err() {
      let _ = fs::remove_file(self.dir.join(METADATA_TMP));
      return Ok(first);
    }
    for (tmp, _) in &linked {
      let _ = fs::remove_file(self.dir.join(tmp));
    }
    if sync {
      let _ = sync_dir(&self.dir);
    }
    Ok(bytes.len() as u64)
  }

  /// After a failed save: removes the files this save named (they did not exist before it began), never
  /// `.metadata`; the previous checkpoint is untouched.
  pub fn abort(&self) {
    for r in 0..self.world {
      let p = self.dir.join(self.file_name(r));
      if fs::symlink_metadata(&p).is_ok_and(|m| m.is_file()) {
        let _ = fs::remove_file(&p);
      }
    }
    let _ = fs::remove_file(self.dir.join(METADATA_TMP));
  }

  fn pickle(&self, md: &RanksMetadata, storage: &[(StorageKey, StorageInfo)]) -> Result<Vec<u8>> {
    md.pickle(storage, &self.dir.join(METADATA))
  }
}

/// The rank-local metadata file of `rank` (torch's `__{rank}.metadata`, written by `use_collectives=False`).
pub fn rank_metadata_name(rank: usize) -> String {
  format!("__{rank}{METADATA}")
}

/// One rank's save without collectives (torch's `use_collectives=False`): it writes `__{rank}_0.distcp` and
/// `__{rank}.metadata` and touches no other rank's files. Held from [`RankLocalSave::begin`] until dropped: the
/// folder lock shared (the job's other ranks save beside it; a save or conversion of the whole folder is refused
/// meanwhile, and refuses it) and this rank's lock exclusively (another job saving the same rank is refused).
pub struct RankLocalSave {
  dir: PathBuf,
  rank: usize,
  _locks: (DirLock, DirLock),
  /// This rank's files named by its current `__{rank}.metadata`, removed once the new one is committed.
  old: Vec<String>,
  /// Whether this rank writes a temporary name (its files exist already).
  pub replacing: bool,
  token: String,
}

impl RankLocalSave {
  /// Creates the folder if needed, takes the locks (`ERR_DISTCP_LOCKED`), refuses a folder holding a global
  /// `.metadata` (`ERR_DISTCP_GLOBAL_METADATA`), and removes this rank's leftovers of a dead save.
  pub fn begin(dir: impl AsRef<Path>, rank: usize) -> Result<RankLocalSave> {
    let dir = dir.as_ref().to_path_buf();
    if rank >= MAX_RANKS {
      return Err(Error::InvalidInput {
        checkpoint: dir,
        key: String::new(),
        reason: format!("rank {rank} is not in 0..{MAX_RANKS}"),
      });
    }
    ensure_dir(&dir)?;
    let shared = DirLock::acquire_shared(&dir)?;
    let mine = DirLock::acquire_named(&dir, &rank_lock_name(rank))?;
    if fs::symlink_metadata(dir.join(METADATA)).is_ok() {
      return Err(Error::GlobalMetadataPresent { path: dir });
    }
    let prefix = format!("__{rank}_");
    let md_path = dir.join(rank_metadata_name(rank));
    let mut old = Vec::new();
    // an unreadable old metadata names nothing that could be removed safely; it is replaced all the same
    if let Some(md) = fs::read(&md_path).ok().and_then(|b| Metadata::parse(&b, &md_path).ok()) {
      for info in md.storage_data.values() {
        let name = &info.relative_path;
        if is_plain_name(name) && is_data_file_name(name) && name.starts_with(&prefix) && !old.contains(name)
        {
          old.push(name.clone());
        }
      }
    }
    let _ = fs::remove_file(dir.join(format!("{}{TMP_SUFFIX}", rank_metadata_name(rank))));
    if let Ok(entries) = fs::read_dir(&dir) {
      for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if is_temp_data_name(&name) && name.starts_with(&prefix) && !old.contains(&name) {
          let _ = fs::remove_file(e.path());
        }
      }
    }
    let replacing = md_path.exists() || fs::symlink_metadata(dir.join(rank_file_name(rank))).is_ok();
    Ok(RankLocalSave { dir, rank, _locks: (shared, mine), old, replacing, token: token() })
  }

  /// The data file this save writes.
  pub fn file_name(&self) -> String {
    if self.replacing {
      format!("{}.{}{TMP_SUFFIX}", rank_file_name(self.rank), self.token)
    } else {
      rank_file_name(self.rank)
    }
  }

  /// Commits `__{rank}.metadata` (tmp → fsync → rename → fsync folder) naming this save's data file; when
  /// replacing, then removes this rank's old files, links the temporary file to its final name and commits again.
  /// Returns the final metadata size.
  pub fn commit(&self, md: &RanksMetadata, sync: bool) -> Result<u64> {
    let (name, tmp_name) =
      (rank_metadata_name(self.rank), format!("{}{TMP_SUFFIX}", rank_metadata_name(self.rank)));
    let ours = self.file_name();
    if let Some((key, info)) = md.storage.iter().find(|(_, i)| i.relative_path != ours) {
      return Err(Error::Metadata {
        path: self.dir.join(&name),
        reason: format!(
          "`{}` is stored in `{}`, which is not this rank's file `{ours}`",
          key.fqn, info.relative_path
        ),
      });
    }
    let bytes = self.pickle(md, &md.storage)?;
    commit_metadata_as(&self.dir, &name, &tmp_name, &bytes, sync)?;
    let first = bytes.len() as u64;
    if !self.replacing {
      return Ok(first);
    }
    // live now; the rest tidies up, and a failure leaves a valid checkpoint naming the temporary file
    for old in self.old.iter().filter(|o| **o != ours) {
      let p = self.dir.join(old);
      if fs::symlink_metadata(&p).is_ok_and(|m| m.is_file()) {
        let _ = fs::remove_file(&p);
      }
    }
    let (tmp, fin) = (self.dir.join(&ours), rank_file_name(self.rank));
    let _ = fs::remove_file(self.dir.join(&fin));
    if fs::hard_link(&tmp, self.dir.join(&fin)).is_err() || (sync && sync_dir(&self.dir).is_err()) {
      return Ok(first);
    }
    let renamed: Vec<(StorageKey, StorageInfo)> = md
      .storage
      .iter()
      .map(|(k, i)| (k.clone(), StorageInfo { relative_path: fin.clone(), ..i.clone() }))
      .collect();
    // past the first commit nothing may fail the save: the caller would take it for lost and remove its file
    let Ok(bytes) = self.pickle(md, &renamed) else { return Ok(first) };
    if commit_metadata_as(&self.dir, &name, &tmp_name, &bytes, sync).is_err() {
      let _ = fs::remove_file(self.dir.join(&tmp_name));
      return Ok(first);
    }
    let _ = fs::remove_file(&tmp);
    if sync {
      let _ = sync_dir(&self.dir);
    }
    Ok(bytes.len() as u64)
  }

  /// After a failed save: removes the data file this save named (it did not exist before) and the metadata's
  /// temporary file; this rank's previous files are untouched.
  pub fn abort(&self) {
    let p = self.dir.join(self.file_name());
    if fs::symlink_metadata(&p).is_ok_and(|m| m.is_file()) {
      let _ = fs::remove_file(&p);
    }
    let _ = fs::remove_file(self.dir.join(format!("{}{TMP_SUFFIX}", rank_metadata_name(self.rank))));
  }

  fn pickle(&self, md: &RanksMetadata, storage: &[(StorageKey, StorageInfo)]) -> Result<Vec<u8>> {
    md.pickle(storage, &self.dir.join(rank_metadata_name(self.rank)))
  }
}

/// Creates `dir` if it does not exist; refuses a path that is not a folder.
fn ensure_dir(dir: &Path) -> Result<()> {
  match fs::metadata(dir) {
    Ok(m) if m.is_dir() => Ok(()),
    Ok(_) => Err(Error::NotADirectory { path: dir.to_path_buf() }),
    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
      fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))
    }
    Err(e) => Err(Error::io(dir, e)),
  }
}

#[cfg(test)]
mod tests {
  use super::*;
  use crate::checkpoint::Checkpoint;
  use crate::dtype::DType;
  use crate::metadata::{Chunk, TensorMetadata, TensorProperties};
  use crate::write::save::SHARD_METADATA;
  use crate::write::value::TensorRef;

  fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("distcp-ranks-{name}-{}", token()));
    let _ = fs::remove_dir_all(&d);
    d
  }

  fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
      fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
  }

  /// Two ranks each hold half of a 4×2 f32 tensor `w` (rows) and the same `step`; rank 1's `step` is deduped away.
  fn two_ranks(dir: &Path, base: f32) -> RanksSave {
    let save = RanksSave::begin(dir, 2).unwrap();
    let s = |x: &str| SaveValue::Str(x.into());
    let mut md = RanksMetadata { version: Some("1.0.0".into()), ..Default::default() };
    let mut chunks = vec![];
    for rank in 0..2u64 {
      let vals: Vec<u8> = (0..4).flat_map(|i| (base + (rank * 4 + i) as f32).to_le_bytes()).collect();
      let root = SaveValue::Dict(vec![
        (s("w"), SaveValue::Tensor(TensorRef { dtype: DType::Float32, shape: vec![2, 2], data: &vals })),
        (s("step"), SaveValue::Int(7)),
      ]);
      let mut plan = vec![PlannedItem { key: "w".into(), offsets: Some(vec![rank * 2, 0]) }];
      if rank == 0 {
        plan.push(PlannedItem { key: "step".into(), offsets: None });
      }
      let name = save.file_name(rank as usize);
      md.storage.extend(write_rank_data(dir, &name, &root, Layout::Torch24, &plan, false).unwrap());
      chunks.push(Chunk { offsets: vec![rank * 2, 0], sizes: vec![2, 2] });
    }
    let props = TensorProperties {
      dtype: DType::Float32,
      requires_grad: false,
      pin_memory: false,
      module: SHARD_METADATA.into(),
    };
    md.items = vec![
      ("w".into(), ItemMetadata::Tensor(TensorMetadata { properties: props, size: vec![4, 2], chunks })),
      ("step".into(), ItemMetadata::Bytes),
    ];
    md.planner_data = vec![
      ("w".into(), vec![PathElem::Key("w".into())]),
      ("step".into(), vec![PathElem::Key("step".into())]),
    ];
    save.commit(&md, false).unwrap();
    save
  }

  fn whole(dir: &Path) -> Vec<f32> {
    let ck = Checkpoint::open(dir, None).unwrap();
    ck.read_tensor("w").unwrap().chunks(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
  }

  #[test]
  fn ranks_write_one_checkpoint_and_replace_it() {
    let dir = tmpdir("two");
    drop(two_ranks(&dir, 0.0));
    assert_eq!(listing(&dir), [".metadata", "__0_0.distcp", "__1_0.distcp"]);
    assert_eq!(whole(&dir), [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]);
    let save = two_ranks(&dir, 10.0);
    assert!(save.replacing);
    drop(save);
    assert_eq!(listing(&dir), [".metadata", "__0_0.distcp", "__1_0.distcp"]);
    assert_eq!(whole(&dir)[7], 17.0);
    fs::remove_dir_all(&dir).unwrap();
  }

  #[test]
  fn an_aborted_save_keeps_the_old_checkpoint_and_its_lock_is_held() {
    let dir = tmpdir("abort");
    drop(two_ranks(&dir, 0.0));
    let save = RanksSave::begin(&dir, 2).unwrap();
    assert_eq!(RanksSave::begin(&dir, 2).err().map(|e| e.code()), Some("ERR_DISTCP_LOCKED"));
    let name = save.file_name(1);
    assert!(name.starts_with("__1_0.distcp.") && name.ends_with(".tmp"), "{name}");
    fs::write(dir.join(&name), b"half").unwrap();
    save.abort();
    drop(save);
    assert_eq!(listing(&dir), [".metadata", "__0_0.distcp", "__1_0.distcp"]);
    assert_eq!(whole(&dir)[7], 7.0);
    fs::remove_dir_all(&dir).unwrap();
  }

  #[test]
  fn a_plan_naming_a_missing_key_is_refused() {
    let dir = tmpdir("missing");
    fs::create_dir_all(&dir).unwrap();
    let root = SaveValue::Dict(vec![(SaveValue::Str("a".into()), SaveValue::Int(1))]);
    let plan = [PlannedItem { key: "b".into(), offsets: None }];
    let e = write_rank_data(&dir, "__0_0.distcp", &root, Layout::Torch24, &plan, false).unwrap_err();
    assert_eq!(e.code(), "ERR_DISTCP_INVALID_INPUT");
    let e = write_rank_data(&dir, "../x", &root, Layout::Torch24, &plan, false).unwrap_err();
    assert_eq!(e.code(), "ERR_DISTCP_INVALID_INPUT");
    fs::remove_dir_all(&dir).unwrap();
  }

  /// Rank `rank` saves its half of `w` (rows) and `step` without collectives; returns the save, committed.
  fn local_rank(dir: &Path, rank: u64, base: f32) -> RankLocalSave {
    let save = RankLocalSave::begin(dir, rank as usize).unwrap();
    let vals: Vec<u8> = (0..4).flat_map(|i| (base + (rank * 4 + i) as f32).to_le_bytes()).collect();
    let s = |x: &str| SaveValue::Str(x.into());
    let root = SaveValue::Dict(vec![
      (s("w"), SaveValue::Tensor(TensorRef { dtype: DType::Float32, shape: vec![2, 2], data: &vals })),
      (s("step"), SaveValue::Int(7)),
    ]);
    let plan = [
      PlannedItem { key: "w".into(), offsets: Some(vec![rank * 2, 0]) },
      PlannedItem { key: "step".into(), offsets: None },
    ];
    let storage = write_rank_data(dir, &save.file_name(), &root, Layout::Torch24, &plan, false).unwrap();
    let props = TensorProperties {
      dtype: DType::Float32,
      requires_grad: false,
      pin_memory: false,
      module: SHARD_METADATA.into(),
    };
    let chunks = vec![Chunk { offsets: vec![rank * 2, 0], sizes: vec![2, 2] }];
    let md = RanksMetadata {
      items: vec![
        ("w".into(), ItemMetadata::Tensor(TensorMetadata { properties: props, size: vec![4, 2], chunks })),
        ("step".into(), ItemMetadata::Bytes),
      ],
      planner_data: vec![
        ("w".into(), vec![PathElem::Key("w".into())]),
        ("step".into(), vec![PathElem::Key("step".into())]),
      ],
      storage,
      version: Some("1.0.0".into()),
    };
    save.commit(&md, false).unwrap();
    save
  }

  fn rank_rows(dir: &Path, rank: u32) -> Vec<f32> {
    let ck = Checkpoint::open(dir, Some(rank)).unwrap();
    let mut out = vec![0u8; 16];
    let region = crate::plan::Region { offsets: vec![u64::from(rank) * 2, 0], sizes: vec![2, 2] };
    ck.read_into("w", &region, &mut out).unwrap();
    out.chunks(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
  }

  #[test]
  fn ranks_save_beside_each_other_without_collectives_and_replace_only_their_own_files() {
    let dir = tmpdir("local");
    let a = local_rank(&dir, 0, 0.0);
    // rank 1 saves while rank 0 still holds its locks: the folder lock is shared
    let b = local_rank(&dir, 1, 0.0);
    // a save of the whole folder, and a second job's save of the same rank, are refused meanwhile
    assert_eq!(RanksSave::begin(&dir, 2).err().map(|e| e.code()), Some("ERR_DISTCP_LOCKED"));
    assert_eq!(RankLocalSave::begin(&dir, 1).err().map(|e| e.code()), Some("ERR_DISTCP_LOCKED"));
    drop((a, b));
    let files = ["__0.metadata", "__0_0.distcp", "__1.metadata", "__1_0.distcp"];
    assert_eq!(listing(&dir), files);
    assert_eq!(rank_rows(&dir, 0), [0.0, 1.0, 2.0, 3.0]);
    assert_eq!(rank_rows(&dir, 1), [4.0, 5.0, 6.0, 7.0]);
    // rank 0's metadata holds only its rows: rank 1's are refused, not read as zeros
    let ck = Checkpoint::open(&dir, Some(0)).unwrap();
    let e = ck.read_tensor("w").unwrap_err();
    assert_eq!(e.code(), "ERR_DISTCP_BAD_REQUEST");
    assert!(e.to_string().contains("__0.metadata"), "{e}");
    let rank0 = (fs::read(dir.join(files[0])).unwrap(), fs::read(dir.join(files[1])).unwrap());

    // a dead save of rank 1 left a temporary file: the next save of rank 1 removes it, rank 0's stay
    fs::write(dir.join("__1_0.distcp.dead.tmp"), b"half").unwrap();
    fs::write(dir.join("__0_0.distcp.dead.tmp"), b"half").unwrap();
    let again = local_rank(&dir, 1, 10.0);
    assert!(again.replacing);
    drop(again);
    assert_eq!(listing(&dir), [files[0], files[1], "__0_0.distcp.dead.tmp", files[2], files[3]]);
    assert_eq!(rank_rows(&dir, 1), [14.0, 15.0, 16.0, 17.0]);
    assert_eq!((fs::read(dir.join(files[0])).unwrap(), fs::read(dir.join(files[1])).unwrap()), rank0);

    // an aborted save keeps the rank's previous files
    let save = RankLocalSave::begin(&dir, 1).unwrap();
    fs::write(dir.join(save.file_name()), b"half").unwrap();
    save.abort();
    drop(save);
    assert_eq!(rank_rows(&dir, 1), [14.0, 15.0, 16.0, 17.0]);
    fs::remove_dir_all(&dir).unwrap();
  }

  #[test]
  fn a_save_without_collectives_refuses_a_folder_with_a_global_metadata_and_a_whole_save_replaces_it() {
    let dir = tmpdir("local-global");
    drop(two_ranks(&dir, 0.0));
    let before = listing(&dir);
    assert_eq!(RankLocalSave::begin(&dir, 0).err().map(|e| e.code()), Some("ERR_DISTCP_GLOBAL_METADATA"));
    assert_eq!(listing(&dir), before);
    let held = RanksSave::begin(&dir, 2).unwrap();
    assert_eq!(RankLocalSave::begin(&dir, 0).err().map(|e| e.code()), Some("ERR_DISTCP_LOCKED"));
    drop(held);
    fs::remove_dir_all(&dir).unwrap();

    // the other way round: a save with collectives replaces the rank-local files
    let dir = tmpdir("global-local");
    drop((local_rank(&dir, 0, 0.0), local_rank(&dir, 1, 0.0)));
    drop(two_ranks(&dir, 10.0));
    assert_eq!(listing(&dir), [".metadata", "__0_0.distcp", "__1_0.distcp"]);
    assert_eq!(whole(&dir)[0], 10.0);
    fs::remove_dir_all(&dir).unwrap();
  }
}
