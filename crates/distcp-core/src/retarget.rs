//! Rewrites only a checkpoint's `.metadata` so that an older torch loads it (`distcp retarget`). torch 2.15 pickles
//! `TensorProperties` as 6 values (it added `strides`), and torch ≤ 2.14 fails on those with "too many values to
//! unpack (expected 5)"; `StorageMeta` (torch ≥ 2.4) does not exist before 2.4. The data files never change: the
//! new `.metadata` is distcp's writer's (the form every torch from 2.0 on loads), checked to describe exactly the
//! same items and storage before it replaces the old one atomically (temp file, fsync, rename, fsync the folder),
//! the original kept as `.metadata.orig` unless told otherwise.

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
  /// The oldest torch that loaded the `.metadata` before, and after.
  pub before: (u32, u32),
  pub after: (u32, u32),
  /// `false` when the checkpoint already loads on the target torch (nothing was written).
  pub rewritten: bool,
  /// Where the original `.metadata` was kept.
  pub original: Option<PathBuf>,
}

/// Parses "2.13", "2.13.1" or "v2.13" into (major, minor).
pub fn parse_torch_version(s: &str) -> Option<(u32, u32)> {
  let mut it = s.trim().trim_start_matches('v').split('.');
  let major = it.next()?.parse().ok()?;
  let minor = it.next()?.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()?;
  Some((major, minor))
}

/// Rewrites `root/.metadata` so torch `target` (major, minor) loads the checkpoint; see the module docs.
pub fn retarget(root: &Path, target: (u32, u32), keep_original: bool) -> Result<Retargeted> {
  let path = root.join(".metadata");
  if target < OLDEST_TARGET {
    return Err(Error::BadRequest {
      checkpoint: root.to_path_buf(),
      key: String::new(),
      reason: format!("torch {}.{} is older than any torch distcp writes for (2.0)", target.0, target.1),
    });
  }
  if path.symlink_metadata().is_err() {
    return Err(Error::NoCheckpoint {
      path: root.to_path_buf(),
      rank_hint: " (retarget rewrites .metadata only)".into(),
    });
  }
  let _lock = DirLock::acquire(root)?;
  let bytes = read_metadata_file(&path)?;
  let md = Metadata::parse(&bytes, &path)?;
  md.validate(&path)?;
  let before = md.oldest_torch();
  if before <= target {
    return Ok(Retargeted { before, after: before, rewritten: false, original: None });
  }
  let new = md.to_pickle(&path)?;
  // the rewritten file must say the same thing, and be what the target loads
  let back = Metadata::parse(&new, &path)?;
  let same =
    same_items(&back, &md) && back.storage_data == md.storage_data && back.planner_data == md.planner_data;
  let after = back.oldest_torch();
  if !same || after > target {
    return Err(Error::Unsupported {
      checkpoint: root.to_path_buf(),
      key: String::new(),
      reason: format!(
        "the rewritten .metadata would {} (nothing was changed)",
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
  let mut original = None;
  if keep_original {
    let orig = root.join(".metadata.orig");
    // a hard link: the original bytes stay where they are, and an existing .metadata.orig is never replaced
    if let Err(e) = std::fs::hard_link(&path, &orig) {
      let _ = std::fs::remove_file(&tmp);
      return Err(Error::io(&orig, e));
    }
    original = Some(orig);
  }
  if let Err(e) = std::fs::rename(&tmp, &path) {
    let _ = std::fs::remove_file(&tmp);
    return Err(Error::io(&path, e));
  }
  sync_dir(root)?;
  Ok(Retargeted { before, after, rewritten: true, original })
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
}
