//! Rewrites only a checkpoint's metadata files so that an older torch loads it (`distcp retarget`). torch 2.15
//! pickles `TensorProperties` as 6 values (it added `strides`), and torch ≤ 2.14 fails on those with "too many
//! values to unpack (expected 5)"; `StorageMeta` (torch ≥ 2.4) does not exist before 2.4. The data files never
//! change: each new metadata file is distcp's writer's (the form every torch from 2.0 on loads), checked to describe
//! exactly the same items and storage before it replaces the old one atomically (temp file, fsync, rename, fsync the
//! folder), the original kept as `<name>.orig` unless told otherwise.
//!
//! The metadata files are `.metadata` and the rank-local `__{rank}.metadata` that torch's `FileSystemWriter`
//! writes instead when it saves without rank coordination (`dcp.save(..., use_collectives=False)`; `dcp.load` reads
//! `.metadata` first and falls back to `__{rank}.metadata`). Every one of them that needs a newer torch than the
//! target is rewritten: torch's loader may read any of them. All are parsed, rewritten and checked, and their
//! replacements written to temp files, before the first one is renamed into place; a failure before that point
//! leaves the folder as it was. Each rename is atomic on its own, and a killed run leaves every file either old or
//! new (both load on a new torch); running it again finishes the rest.

use crate::checkpoint::read_metadata_file;
use crate::commit::{sync_dir, temp_name, DirLock};
use crate::error::{Error, Result};
use crate::metadata::Metadata;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The oldest torch distcp's `.metadata` writer targets (its pickles load on every torch from this one on).
pub const OLDEST_TARGET: (u32, u32) = (2, 0);

/// What [`retarget`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retargeted {
  /// The oldest torch that loaded every metadata file before, and after.
  pub before: (u32, u32),
  pub after: (u32, u32),
  /// `false` when the checkpoint already loads on the target torch (nothing was written).
  pub rewritten: bool,
  /// Where the original `.metadata` (or, without one, the first rewritten rank-local file) was kept.
  pub original: Option<PathBuf>,
  /// Every metadata file that was rewritten, in name order (`.metadata` first, then `__0.metadata`, ...).
  pub files: Vec<PathBuf>,
  /// Where each of their originals was kept (empty when the originals were not kept).
  pub originals: Vec<PathBuf>,
}

/// Parses "2.13", "2.13.1" or "v2.13" into (major, minor).
pub fn parse_torch_version(s: &str) -> Option<(u32, u32)> {
  let mut it = s.trim().trim_start_matches('v').split('.');
  let major = it.next()?.parse().ok()?;
  let minor = it.next()?.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()?;
  Some((major, minor))
}

/// The rank of a rank-local metadata file name (`__3.metadata` → 3), as torch's `_get_metadata_path(rank)` names it.
fn rank_local(name: &str) -> Option<u64> {
  let digits = name.strip_prefix("__")?.strip_suffix(".metadata")?;
  if digits.is_empty()
    || !digits.bytes().all(|b| b.is_ascii_digit())
    || (digits.len() > 1 && digits.starts_with('0'))
  {
    return None;
  }
  digits.parse().ok()
}

/// `.metadata` (if present) then every `__{rank}.metadata`, by rank. Anything by those names counts (a folder named
/// `.metadata` is refused when it is read, not skipped).
fn metadata_files(root: &Path) -> Result<Vec<PathBuf>> {
  let mut ranks: Vec<(u64, PathBuf)> = Vec::new();
  for entry in std::fs::read_dir(root).map_err(|e| Error::io(root, e))? {
    let entry = entry.map_err(|e| Error::io(root, e))?;
    if let Some(rank) = entry.file_name().to_str().and_then(rank_local) {
      ranks.push((rank, entry.path()));
    }
  }
  ranks.sort();
  let global = root.join(".metadata");
  let mut out: Vec<PathBuf> = global.symlink_metadata().is_ok().then_some(global).into_iter().collect();
  out.extend(ranks.into_iter().map(|(_, p)| p));
  Ok(out)
}

/// One metadata file that needs rewriting: its replacement sits in `tmp` (written and synced).
struct Pending {
  path: PathBuf,
  tmp: PathBuf,
  orig: PathBuf,
  /// `orig` already is a hard link to `path`: a killed run of ours made it and did not get to the rename.
  linked: bool,
}

/// Whether `a` and `b` are the same file (hard links of one inode).
fn same_file(a: &Path, b: &Path) -> bool {
  #[cfg(unix)]
  {
    use std::os::unix::fs::MetadataExt;
    match (a.symlink_metadata(), b.symlink_metadata()) {
      (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
      _ => false,
    }
  }
  #[cfg(not(unix))]
  {
    let _ = (a, b);
    false
  }
}

/// One metadata file read: the oldest torch that loads it before and after, and its replacement if it needs one.
struct Prepared {
  before: (u32, u32),
  after: (u32, u32),
  pending: Option<Pending>,
}

fn orig_name(path: &Path) -> PathBuf {
  let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
  name.push(".orig");
  path.with_file_name(name)
}

/// Rewrites the metadata files of `root` (see the module docs) so torch `target` (major, minor) loads the
/// checkpoint.
pub fn retarget(root: &Path, target: (u32, u32), keep_original: bool) -> Result<Retargeted> {
  if target < OLDEST_TARGET {
    return Err(Error::BadRequest {
      checkpoint: root.to_path_buf(),
      key: String::new(),
      reason: format!("torch {}.{} is older than any torch distcp writes for (2.0)", target.0, target.1),
    });
  }
  let no_checkpoint = || Error::NoCheckpoint {
    path: root.to_path_buf(),
    rank_hint: " or __{rank}.metadata (retarget rewrites those only)".into(),
  };
  if !root.is_dir() {
    return Err(no_checkpoint());
  }
  let _lock = DirLock::acquire(root)?;
  let files = metadata_files(root)?;
  if files.is_empty() {
    return Err(no_checkpoint());
  }
  let mut pending: Vec<Pending> = Vec::new();
  let (mut before, mut after) = ((0, 0), (0, 0));
  let cleanup = |pending: &[Pending]| {
    for p in pending {
      let _ = std::fs::remove_file(&p.tmp);
    }
  };
  for path in files {
    match prepare(root, &path, target, keep_original) {
      Ok(p) => {
        before = before.max(p.before);
        after = after.max(p.after);
        pending.extend(p.pending);
      }
      Err(e) => {
        cleanup(&pending);
        return Err(e);
      }
    }
  }
  if pending.is_empty() {
    return Ok(Retargeted {
      before,
      after: before,
      rewritten: false,
      original: None,
      files: vec![],
      originals: vec![],
    });
  }
  // from here on the folder changes: originals first (a hard link never replaces an existing .orig), then renames
  let mut originals = Vec::new();
  let mut made: Vec<&Path> = Vec::new();
  if keep_original {
    for p in &pending {
      if p.linked {
        originals.push(p.orig.clone());
        continue;
      }
      if let Err(e) = std::fs::hard_link(&p.path, &p.orig) {
        for o in made {
          let _ = std::fs::remove_file(o);
        }
        cleanup(&pending);
        return Err(Error::io(&p.orig, e));
      }
      made.push(&p.orig);
      originals.push(p.orig.clone());
    }
  }
  for (i, p) in pending.iter().enumerate() {
    if let Err(e) = std::fs::rename(&p.tmp, &p.path) {
      cleanup(&pending[i..]);
      return Err(Error::io(&p.path, e));
    }
  }
  sync_dir(root)?;
  Ok(Retargeted {
    before,
    after,
    rewritten: true,
    original: originals.first().cloned(),
    files: pending.into_iter().map(|p| p.path).collect(),
    originals,
  })
}

/// Reads and checks one metadata file; when the target cannot load it, writes its replacement to a synced temp
/// file beside it. Returns the oldest torch that loads it before and after.
fn prepare(root: &Path, path: &Path, target: (u32, u32), keep_original: bool) -> Result<Prepared> {
  let bytes = read_metadata_file(path)?;
  let md = Metadata::parse(&bytes, path)?;
  drop(bytes);
  md.validate(path)?;
  let before = md.oldest_torch();
  if before <= target {
    return Ok(Prepared { before, after: before, pending: None });
  }
  let orig = orig_name(path);
  let linked = keep_original && same_file(path, &orig);
  if keep_original && !linked && orig.symlink_metadata().is_ok() {
    return Err(Error::io(
      &orig,
      std::io::Error::new(
        std::io::ErrorKind::AlreadyExists,
        "the original would be kept here: move it away first",
      ),
    ));
  }
  let new = md.to_pickle(path)?;
  // the rewritten file must say the same thing, and be what the target loads
  let back = Metadata::parse(&new, path)?;
  let same =
    same_items(&back, &md) && back.storage_data == md.storage_data && back.planner_data == md.planner_data;
  let after = back.oldest_torch();
  if !same || after > target {
    return Err(Error::Unsupported {
      checkpoint: root.to_path_buf(),
      key: String::new(),
      reason: format!(
        "the rewritten {} would {} (nothing was changed)",
        path.display(),
        if same {
          format!("still need torch {}.{}", after.0, after.1)
        } else {
          "describe the checkpoint differently".into()
        }
      ),
    });
  }
  let tmp = root.join(temp_name(".metadata.distcp-tmp-"));
  let write = || -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).open(&tmp)?;
    f.write_all(&new)?;
    f.sync_all()
  };
  if let Err(e) = write() {
    let _ = std::fs::remove_file(&tmp);
    return Err(Error::io(&tmp, e));
  }
  Ok(Prepared { before, after, pending: Some(Pending { path: path.to_path_buf(), tmp, orig, linked }) })
}

/// Same keys, kinds, dtypes, flags, sizes and chunks (the class path of `TensorProperties` may differ: that is
/// what a retarget changes).
fn same_items(a: &Metadata, b: &Metadata) -> bool {
  use crate::metadata::ItemMetadata::{Bytes, Tensor};
  a.items.len() == b.items.len()
    && a.items.iter().zip(&b.items).all(|((ka, ia), (kb, ib))| {
      ka == kb
        && match (ia, ib) {
          (Bytes, Bytes) => true,
          (Tensor(x), Tensor(y)) => {
            x.size == y.size
              && x.chunks == y.chunks
              && x.properties.dtype == y.properties.dtype
              && x.properties.requires_grad == y.properties.requires_grad
              && x.properties.pin_memory == y.properties.pin_memory
          }
          _ => false,
        }
    })
}

#[cfg(test)]
mod tests {
  use super::*;

  #[test]
  fn versions_parse() {
    assert_eq!(parse_torch_version("2.13"), Some((2, 13)));
    assert_eq!(parse_torch_version("2.14.1"), Some((2, 14)));
    assert_eq!(parse_torch_version("v2.4.0+cu121"), Some((2, 4)));
    assert_eq!(parse_torch_version("2"), None);
    assert_eq!(parse_torch_version("x.y"), None);
  }

  #[test]
  fn a_torch_2_15_checkpoint_is_rewritten_for_2_13_keeping_the_original() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/torch-2.15.0/dtensor-2rank/ckpt");
    let dir = std::env::temp_dir().join(format!("distcp-retarget-{}", temp_name("")));
    std::fs::create_dir_all(&dir).unwrap();
    for e in std::fs::read_dir(&src).unwrap().flatten() {
      std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
    }
    let old = std::fs::read(dir.join(".metadata")).unwrap();
    let before = Metadata::parse(&old, Path::new(".metadata")).unwrap();
    assert_eq!(before.oldest_torch(), (2, 15));
    let r = retarget(&dir, (2, 13), true).unwrap();
    assert_eq!((r.before, r.rewritten), ((2, 15), true));
    assert!(r.after <= (2, 13), "{r:?}");
    assert_eq!(std::fs::read(dir.join(".metadata.orig")).unwrap(), old);
    let ck = crate::Checkpoint::open(&dir, None).unwrap();
    assert!(same_items(&ck.metadata, &before));
    // a second run has nothing to do and writes nothing
    let again = retarget(&dir, (2, 13), true).unwrap();
    assert!(!again.rewritten);
    let mut names: Vec<String> = std::fs::read_dir(&dir)
      .unwrap()
      .flatten()
      .map(|e| e.file_name().to_string_lossy().into_owned())
      .collect();
    names.sort();
    assert_eq!(names, [".metadata", ".metadata.orig", "__0_0.distcp", "__1_0.distcp"]);
    std::fs::remove_dir_all(&dir).unwrap();
  }

  fn copy_of(fixture: &str) -> PathBuf {
    let src =
      Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/torch-2.15.0").join(fixture).join("ckpt");
    let dir = std::env::temp_dir().join(format!("distcp-retarget-{}", temp_name("")));
    std::fs::create_dir_all(&dir).unwrap();
    for e in std::fs::read_dir(&src).unwrap().flatten() {
      std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
    }
    dir
  }

  fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
      .unwrap()
      .flatten()
      .map(|e| e.file_name().to_string_lossy().into_owned())
      .collect();
    names.sort();
    names
  }

  #[test]
  fn rank_local_names() {
    assert_eq!(rank_local("__0.metadata"), Some(0));
    assert_eq!(rank_local("__17.metadata"), Some(17));
    for bad in
      ["__.metadata", "__01.metadata", "__1.metadata.orig", "_1.metadata", "__1_0.distcp", "__x.metadata"]
    {
      assert_eq!(rank_local(bad), None, "{bad}");
    }
  }

  #[test]
  fn a_rank_local_metadata_torch_wrote_is_rewritten_too() {
    // torch 2.15's dcp.save(use_collectives=False) wrote only __0.metadata
    let dir = copy_of("rank-local");
    let old = std::fs::read(dir.join("__0.metadata")).unwrap();
    let before = Metadata::parse(&old, Path::new("__0.metadata")).unwrap();
    assert_eq!(before.oldest_torch(), (2, 15));
    let r = retarget(&dir, (2, 13), true).unwrap();
    assert_eq!((r.before, r.rewritten), ((2, 15), true));
    assert!(r.after <= (2, 13), "{r:?}");
    assert_eq!(r.files, [dir.join("__0.metadata")]);
    assert_eq!(r.originals, [dir.join("__0.metadata.orig")]);
    assert_eq!(r.original.as_deref(), Some(dir.join("__0.metadata.orig").as_path()));
    assert_eq!(std::fs::read(dir.join("__0.metadata.orig")).unwrap(), old);
    let new = std::fs::read(dir.join("__0.metadata")).unwrap();
    let after = Metadata::parse(&new, Path::new("__0.metadata")).unwrap();
    assert!(same_items(&after, &before) && after.storage_data == before.storage_data);
    assert!(after.oldest_torch() <= (2, 13));
    let ck = crate::Checkpoint::open(&dir, Some(0)).unwrap();
    assert_eq!(ck.metadata_path, dir.join("__0.metadata"));
    assert!(!retarget(&dir, (2, 13), true).unwrap().rewritten);
    assert_eq!(listing(&dir), ["__0.metadata", "__0.metadata.orig", "__0_0.distcp"]);
    std::fs::remove_dir_all(&dir).unwrap();
  }

  #[test]
  fn every_metadata_file_is_rewritten_and_a_bad_one_changes_nothing() {
    // .metadata beside rank-local files of two ranks (names as torch's _get_metadata_path gives them; the bytes
    // are torch 2.15's)
    let dir = copy_of("dtensor-2rank");
    let md = std::fs::read(dir.join(".metadata")).unwrap();
    for name in ["__0.metadata", "__1.metadata"] {
      std::fs::write(dir.join(name), &md).unwrap();
    }
    // one of them cannot be read: nothing is written, no temp file is left
    std::fs::write(dir.join("__1.metadata"), b"not a pickle").unwrap();
    let e = retarget(&dir, (2, 13), true).unwrap_err();
    assert_eq!(e.code(), "ERR_DISTCP_PICKLE", "{e}");
    assert!(e.to_string().contains("__1.metadata"), "{e}");
    assert_eq!(listing(&dir), [".metadata", "__0.metadata", "__0_0.distcp", "__1.metadata", "__1_0.distcp"]);
    assert_eq!(std::fs::read(dir.join(".metadata")).unwrap(), md);
    std::fs::write(dir.join("__1.metadata"), &md).unwrap();
    // an existing original of any of them: refused before anything changes
    std::fs::write(dir.join("__1.metadata.orig"), b"mine").unwrap();
    assert_eq!(retarget(&dir, (2, 13), true).unwrap_err().code(), "ERR_DISTCP_IO");
    assert_eq!(std::fs::read(dir.join(".metadata")).unwrap(), md);
    assert_eq!(std::fs::read(dir.join("__1.metadata.orig")).unwrap(), b"mine");
    std::fs::remove_file(dir.join("__1.metadata.orig")).unwrap();
    let r = retarget(&dir, (2, 13), true).unwrap();
    assert_eq!(r.files, [dir.join(".metadata"), dir.join("__0.metadata"), dir.join("__1.metadata")]);
    assert_eq!(r.original.as_deref(), Some(dir.join(".metadata.orig").as_path()));
    let new = std::fs::read(dir.join(".metadata")).unwrap();
    for name in [".metadata", "__0.metadata", "__1.metadata"] {
      assert_eq!(std::fs::read(dir.join(name)).unwrap(), new, "{name}");
      assert_eq!(std::fs::read(dir.join(format!("{name}.orig"))).unwrap(), md, "{name}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
  }

  #[test]
  fn a_run_killed_between_keeping_the_original_and_the_rename_is_finished_by_the_next() {
    let dir = copy_of("dtensor-2rank");
    let md = std::fs::read(dir.join(".metadata")).unwrap();
    // what a run killed after its hard link and before its rename leaves
    std::fs::hard_link(dir.join(".metadata"), dir.join(".metadata.orig")).unwrap();
    let r = retarget(&dir, (2, 13), true).unwrap();
    assert!(r.rewritten && r.after <= (2, 13), "{r:?}");
    assert_eq!(std::fs::read(dir.join(".metadata.orig")).unwrap(), md);
    assert_ne!(std::fs::read(dir.join(".metadata")).unwrap(), md);
    std::fs::remove_dir_all(&dir).unwrap();
  }

  #[test]
  fn without_metadata_files_nothing_is_retargeted() {
    let dir = copy_of("layout-hf-sharded-1rank");
    assert_eq!(retarget(&dir, (2, 13), true).unwrap_err().code(), "ERR_DISTCP_NO_CHECKPOINT");
    std::fs::remove_dir_all(&dir).unwrap();
  }
}
