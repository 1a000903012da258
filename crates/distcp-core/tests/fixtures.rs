//! The zip reader, record parser and metadata model against checkpoints real torch wrote (fixtures/).

use distcp_core::metadata::ItemMetadata;
use distcp_core::torch_save::{self, PyObject, RecordError};
use distcp_core::zip::{self, ZipError};
use distcp_core::Checkpoint;
use std::path::{Path, PathBuf};

fn fixture_checkpoints() -> Vec<PathBuf> {
  let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures");
  let mut out = Vec::new();
  for version in std::fs::read_dir(&root).expect("fixtures/ exists").flatten() {
    for fixture in std::fs::read_dir(version.path()).into_iter().flatten().flatten() {
      let ck = fixture.path().join("ckpt");
      // torch.save-record DCP only; the safetensors-based layouts have their own tests (tests/layouts.rs)
      if ck.is_dir() && !fixture.file_name().to_string_lossy().starts_with("layout-") {
        out.push(ck);
      }
    }
  }
  out.sort();
  assert!(out.len() >= 20, "expected the torch fixtures, found {}", out.len());
  out
}

/// Every stored record of a checkpoint, as (key, bytes).
fn records(ck: &Checkpoint) -> Vec<(String, Vec<u8>)> {
  let mut out = Vec::new();
  for (key, info) in &ck.metadata.storage_data {
    let blob = ck.blob(&key.fqn, info).expect("blob");
    out.push((key.fqn.clone(), blob.bytes().to_vec()));
  }
  out
}

#[test]
fn every_record_is_a_torch_save_archive_with_aligned_entries() {
  let mut archives = 0;
  for path in fixture_checkpoints() {
    let ck = Checkpoint::open(&path, None).expect("open");
    for (key, bytes) in records(&ck) {
      let a = zip::parse(&bytes).unwrap_or_else(|e| panic!("{path:?} {key}: {e:?}"));
      assert_eq!(a.prefix, "archive", "{path:?} {key}");
      for name in ["data.pkl", "version"] {
        assert!(a.get(name).is_some(), "{path:?} {key}: no {name}");
      }
      for e in &a.entries {
        // PyTorchStreamWriter aligns every entry's data to 64 bytes from the archive start
        assert_eq!(e.data.start % 64, 0, "{path:?} {key}: {} at {}", e.name, e.data.start);
      }
      archives += 1;
    }
  }
  assert!(archives > 100);
}

#[test]
fn every_item_parses_and_tensor_records_match_metadata() {
  for path in fixture_checkpoints() {
    let ck = Checkpoint::open(&path, None).expect("open");
    for (key, item) in &ck.metadata.items {
      match item {
        ItemMetadata::Tensor(t) => {
          for i in 0..t.chunks.len() {
            let (_, rec) = ck.chunk_record(key, i).unwrap_or_else(|e| panic!("{path:?} {key}: {e}"));
            assert_eq!(rec.shape, t.chunks[i].sizes);
            assert_eq!(rec.dtype, t.dtype());
          }
        }
        ItemMetadata::Bytes => {
          ck.read_object(key).unwrap_or_else(|e| panic!("{path:?} {key}: {e}"));
        }
      }
    }
  }
}

fn a_tensor_record() -> Vec<u8> {
  let path = fixture_checkpoints()
    .into_iter()
    .find(|p| p.to_string_lossy().contains("seed-model"))
    .expect("seed-model");
  let ck = Checkpoint::open(&path, None).expect("open");
  let (key, _) =
    ck.metadata.items.iter().find(|(_, i)| matches!(i, ItemMetadata::Tensor(_))).expect("a tensor");
  let info = ck.chunk_locations(key).expect("chunks")[0].info.clone();
  ck.blob(key, &info).expect("blob").bytes().to_vec()
}

#[test]
fn truncated_archives_are_errors_at_every_length() {
  let blob = a_tensor_record();
  assert!(matches!(torch_save::parse(&blob), Ok(PyObject::Record(_))));
  for len in (0..blob.len()).step_by(7) {
    assert!(torch_save::parse(&blob[..len]).is_err(), "a {len}-byte prefix parsed");
  }
}

#[test]
fn a_compressed_entry_is_reported_as_such() {
  let mut blob = a_tensor_record();
  // set the compression method of every central directory entry to deflate (8)
  let sig = [0x50, 0x4b, 0x01, 0x02];
  let mut n = 0;
  for i in 0..blob.len() - 4 {
    if blob[i..i + 4] == sig {
      blob[i + 10] = 8;
      n += 1;
    }
  }
  assert!(n >= 3);
  match zip::parse(&blob) {
    Err(ZipError::Compressed { entry, method }) => {
      assert!(entry.starts_with("archive/"));
      assert_eq!(method, 8);
    }
    other => panic!("expected a compressed-entry error, got {other:?}"),
  }
  assert!(matches!(torch_save::parse(&blob), Err(RecordError::Zip(ZipError::Compressed { .. }))));
}

#[test]
fn garbage_is_not_an_archive() {
  assert!(matches!(zip::parse(&b""[..]), Err(ZipError::Malformed(_))));
  assert!(matches!(zip::parse(&[0u8; 100][..]), Err(ZipError::Malformed(_))));
  let mut blob = a_tensor_record();
  // wipe the central directory's entry signatures
  for i in 0..blob.len() - 4 {
    if blob[i..i + 4] == [0x50, 0x4b, 0x01, 0x02] {
      blob[i] = 0;
    }
  }
  assert!(matches!(zip::parse(&blob), Err(ZipError::Malformed(m)) if m.contains("central directory")));
}

#[test]
fn metadata_of_every_version_parses_and_names_its_writer() {
  let mut modules = std::collections::BTreeSet::new();
  for path in fixture_checkpoints() {
    let ck = Checkpoint::open(&path, None).expect("open");
    assert!(ck.metadata.planner_data.is_some(), "{path:?}");
    if let Some(m) = ck.metadata.tensor_properties_module() {
      modules.insert(m.to_owned());
    }
    // a truncated copy of the same bytes is a clean error
    let bytes = std::fs::read(&ck.metadata_path).expect("read");
    for len in [0, 1, 2, bytes.len() / 3, bytes.len() - 1] {
      assert!(distcp_core::metadata::Metadata::parse(&bytes[..len], &ck.metadata_path).is_err());
    }
  }
  assert!(modules.contains("torch.distributed.checkpoint.metadata"), "{modules:?}");
}

/// Real `.metadata` files fit the unpickling memory budget on the per-byte factor alone, without the fixed
/// allowance (tests/unpickle_memory.rs measures the peak heap of whole parses: 16-24 bytes per byte).
#[test]
fn real_metadata_needs_a_fraction_of_the_unpickling_budget() {
  use distcp_core::limits::UNPICKLE_BYTES_PER_INPUT_BYTE;
  use distcp_core::pickle::unpickle_with_budget;
  for path in fixture_checkpoints() {
    let ck = Checkpoint::open(&path, None).expect("open");
    let bytes = std::fs::read(&ck.metadata_path).unwrap();
    let budget = bytes.len() * UNPICKLE_BYTES_PER_INPUT_BYTE;
    unpickle_with_budget(&bytes, &distcp_core::metadata::metadata_allows, budget)
      .unwrap_or_else(|e| panic!("{}: {e:?} within {budget} bytes", ck.metadata_path.display()));
  }
}

/// `convert::select` (the naming rules behind `convertDcpToHf`'s keyMap / include / exclude) on checkpoints torch
/// wrote: the seed's `{"model": state_dict}` is unwrapped, anything else keeps its keys, non-tensors are left out.
#[test]
fn conversion_names_come_from_the_planner_paths_torch_wrote() {
  use distcp_core::convert::{select, Selection};
  let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/torch-2.15.0");
  let model = Checkpoint::open(root.join("seed-model/ckpt"), None).unwrap();
  let all = select(&model, &Selection::default());
  assert!(all.skipped.is_empty(), "{:?}", all.skipped);
  assert_eq!(all.entries.len(), model.keys().count());
  for e in &all.entries {
    assert_eq!(Some(e.name.as_str()), e.key.strip_prefix("model."), "{e:?}");
  }
  let first = all.entries[0].name.clone();
  let sel = Selection {
    key_map: vec![("zzz".into(), "never".into()), (String::new(), "backbone.".into())],
    include: Some(vec![format!("backbone.{}", first), "*.bias".into()]),
    exclude: vec!["*.bias".into()],
  };
  let picked = select(&model, &sel);
  assert_eq!(picked.entries.len(), 1, "{:?}", picked.entries);
  assert_eq!(picked.entries[0].name, format!("backbone.{first}"));
  assert_eq!(picked.skipped.len(), all.entries.len() - 1);
  assert!(picked.skipped.iter().all(|s| s.reason == "not included" || s.reason == "excluded"));

  let mut optim =
    select(&Checkpoint::open(root.join("seed-optim/ckpt"), None).unwrap(), &Selection::default());
  assert!(optim.skipped.iter().any(|s| s.reason == "not a tensor"), "{:?}", optim.skipped);
  assert!(optim.entries.iter().all(|e| e.name == e.key && e.key.starts_with("optim.")));
  let name = optim.entries[0].name.clone();
  assert_eq!(optim.key_of(&name), Some(name.as_str()));
  assert!(optim.drop_name(&name, "tied"));
  assert!(!optim.drop_name(&name, "tied"));
  assert_eq!(
    optim.skipped.last().map(|s| (s.key.as_str(), s.reason.as_str())),
    Some((name.as_str(), "tied"))
  );
}
