//! The writer's `torch.save` archives against the ones torch 2.15 wrote for the same values, byte for byte.
//!
//! The references in `tests/golden/torch_save/` are made by `interop/make_torch_save_golden.py` (run with the
//! pinned torch: `.venv/bin/python interop/make_torch_save_golden.py --zip64`); each case there is the tagged JSON
//! value the writer takes, decoded by the script into the Python value torch saved.

use distcp_core::write::from_tagged_json;
use distcp_core::write::record::write_value;
use std::io::{self, Write};
use std::path::PathBuf;

fn golden() -> PathBuf {
  PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden/torch_save")
}

/// `pattern(n, bool)` of the Python script.
fn pattern(n: usize, boolean: bool) -> Vec<u8> {
  (0..n).map(|i| if boolean { (i % 2) as u8 } else { ((i * 37 + 11) % 256) as u8 }).collect()
}

fn buffer(v: &serde_json::Value) -> Vec<u8> {
  match v {
    serde_json::Value::String(h) => {
      (0..h.len() / 2).map(|i| u8::from_str_radix(&h[2 * i..2 * i + 2], 16).unwrap()).collect()
    }
    other => pattern(other["pattern"].as_u64().unwrap() as usize, other["bool"].as_bool().unwrap()),
  }
}

#[test]
fn archives_equal_torch() {
  let manifest: serde_json::Value =
    serde_json::from_slice(&std::fs::read(golden().join("manifest.json")).unwrap()).unwrap();
  let cases = manifest["cases"].as_array().unwrap();
  assert!(cases.len() > 40);
  let mut failures = Vec::new();
  for case in cases {
    let name = case["name"].as_str().unwrap();
    let buffers: Vec<Vec<u8>> = case["buffers"].as_array().unwrap().iter().map(buffer).collect();
    let slices: Vec<&[u8]> = buffers.iter().map(Vec::as_slice).collect();
    let value = from_tagged_json(&case["value"], &slices).unwrap();
    let (ours, len) = write_value(Vec::new(), &value).unwrap();
    assert_eq!(len as usize, ours.len());
    let theirs = std::fs::read(golden().join(format!("{name}.bin"))).unwrap();
    if ours != theirs {
      let at = ours.iter().zip(&theirs).position(|(a, b)| a != b).unwrap_or(ours.len().min(theirs.len()));
      failures.push(format!(
        "{name}: {} vs torch's {} bytes, first difference at {at}",
        ours.len(),
        theirs.len()
      ));
    }
  }
  assert!(failures.is_empty(), "{} of {} differ:\n{}", failures.len(), cases.len(), failures.join("\n"));
}

/// Keeps everything written except the bytes at archive offsets `skip`.
struct Skip {
  kept: Vec<u8>,
  pos: u64,
  skip: std::ops::Range<u64>,
}

impl Write for Skip {
  fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
    for (i, &b) in buf.iter().enumerate() {
      let at = self.pos + i as u64;
      if !self.skip.contains(&at) {
        self.kept.push(b);
      } else if buf.len() - i > 1 && at + 1 < self.skip.end {
        // fast-forward over the skipped part of this write
        let rest = (buf.len() - i) as u64;
        let jump = rest.min(self.skip.end - at);
        let keep_from = i + jump as usize;
        self.kept.extend_from_slice(&buf[keep_from..]);
        self.pos += buf.len() as u64;
        return Ok(buf.len());
      }
    }
    self.pos += buf.len() as u64;
    Ok(buf.len())
  }
  fn flush(&mut self) -> io::Result<()> {
    Ok(())
  }
}

/// A 4 GiB tensor: ZIP64 sizes in `data/0`, ZIP64 offsets in the records after it, 24-byte descriptors.
#[test]
#[ignore = "pushes 4 GiB through CRC32; run with `cargo test --release -p distcp-core --test torch_save_golden -- --ignored`"]
fn zip64_archive_equals_torch() {
  let head = std::fs::read(golden().join("zip64_head.bin")).unwrap();
  let tail = std::fs::read(golden().join("zip64_tail.bin")).unwrap();
  let n: u64 = 1 << 32;
  // anonymous zero pages: nothing is allocated until written, and nothing is
  let zeros = memmap2::MmapMut::map_anon(n as usize).unwrap();
  let value = distcp_core::write::SaveValue::Tensor(distcp_core::write::TensorRef {
    dtype: distcp_core::DType::UInt8,
    shape: vec![n],
    data: &zeros,
  });
  let start = head.len() as u64;
  let sink = Skip { kept: Vec::new(), pos: 0, skip: start..start + n };
  let (sink, len) = write_value(sink, &value).unwrap();
  assert_eq!(len, head.len() as u64 + n + tail.len() as u64);
  let mut want = head;
  want.extend_from_slice(&tail);
  assert_eq!(sink.kept, want);
}
