//! The safetensors-based layouts torch 2.15 wrote (fixtures/torch-2.15.0/layout-*, made by
//! interop/make_layout_fixtures.py): detected, and every tensor read bit for bit equal to what torch's reader
//! returned (expected.safetensors: each tensor's bytes as a uint8 tensor).

use distcp_core::layout::LayoutKind;
use distcp_core::Checkpoint;
use std::path::{Path, PathBuf};

fn layout_fixtures() -> Vec<PathBuf> {
  let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/torch-2.15.0");
  let mut out: Vec<PathBuf> = std::fs::read_dir(&root)
    .expect("fixtures/torch-2.15.0 exists")
    .flatten()
    .map(|e| e.path())
    .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("layout-")))
    .collect();
  out.sort();
  assert!(out.len() >= 9, "expected the layout fixtures, found {}", out.len());
  out
}

fn expected_kind(name: &str) -> LayoutKind {
  if name.starts_with("layout-dcp-st") {
    LayoutKind::DcpSafetensors
  } else if name.starts_with("layout-hf-sharded") {
    LayoutKind::HfStorageSharded
  } else {
    LayoutKind::HfSafetensors
  }
}

#[test]
fn every_layout_fixture_reads_bit_for_bit_as_torch_read_it() {
  for dir in layout_fixtures() {
    let name = dir.file_name().unwrap().to_string_lossy().into_owned();
    let ck = Checkpoint::open(dir.join("ckpt"), None).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(ck.layout.kind, expected_kind(&name), "{name}");
    // expected.safetensors is itself a folder-less safetensors file: read it through the same reader
    let tmp = std::env::temp_dir().join(format!("distcp-layouts-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    std::fs::copy(dir.join("expected.safetensors"), tmp.join("model.safetensors")).unwrap();
    let want = Checkpoint::open(&tmp, None).unwrap();
    let mut n = 0;
    for key in want.keys() {
      let got = ck.read_tensor(key).unwrap_or_else(|e| panic!("{name} {key}: {e}"));
      assert_eq!(got, want.read_tensor(key).unwrap(), "{name} {key}");
      n += 1;
    }
    assert_eq!(n, 5, "{name}");
    if name.contains("3rank") {
      assert_eq!(ck.summary().ranks, 3, "{name}");
    }
    std::fs::remove_dir_all(&tmp).unwrap();
  }
}
