//! The staged pipeline on the fake device reproduces every host read bit for bit: every tensor of every
//! torch-written fixture, random boxes, Shard(1) chunks, with slots small enough to force banding and large
//! enough to take whole chunks.

use distcp_core::metadata::ItemMetadata;
use distcp_core::plan::Region;
use distcp_core::{Checkpoint, DType};
use distcp_cuda::fake::{FakeDevice, FakeExecutor};
use distcp_cuda::pipeline::{run, Request};
use std::path::{Path, PathBuf};

fn fixture_checkpoints() -> Vec<PathBuf> {
  let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures");
  let mut out = Vec::new();
  for version in std::fs::read_dir(&root).expect("fixtures/ exists").flatten() {
    for fixture in std::fs::read_dir(version.path()).into_iter().flatten().flatten() {
      let ck = fixture.path().join("ckpt");
      if ck.is_dir() {
        out.push(ck);
      }
    }
  }
  out.sort();
  assert!(out.len() >= 20, "expected the torch fixtures, found {}", out.len());
  out
}

fn tensor_keys(ck: &Checkpoint) -> Vec<String> {
  ck.metadata
    .items
    .iter()
    .filter(|(_, i)| matches!(i, ItemMetadata::Tensor(_)))
    .map(|(k, _)| k.clone())
    .collect()
}

const PAD: u64 = 64;
const FILL: u8 = 0x5A;

/// Reads `reqs` (boxes, dst assigned here) onto a fresh fake device; returns each box's bytes.
fn fake_read(ck: &Checkpoint, boxes: &[(String, Region)], slot_len: usize, threads: usize) -> Vec<Vec<u8>> {
  fake_read_as(ck, boxes, slot_len, threads, None)
}

/// [`fake_read`] with every box read as `dtype`.
fn fake_read_as(
  ck: &Checkpoint,
  boxes: &[(String, Region)],
  slot_len: usize,
  threads: usize,
  dtype: Option<DType>,
) -> Vec<Vec<u8>> {
  let sizes: Vec<u64> = boxes.iter().map(|(k, r)| distcp_cuda::box_bytes(ck, k, r, dtype).unwrap()).collect();
  let total: u64 = sizes.iter().map(|s| s + PAD).sum::<u64>() + PAD;
  let dev = FakeDevice::new(total as usize, FILL);
  let mut at = PAD;
  let mut reqs = Vec::new();
  for ((key, region), &len) in boxes.iter().zip(&sizes) {
    reqs.push(Request { key: key.clone(), region: region.clone(), dst: dev.addr(at), dst_len: len, dtype });
    at += len + PAD;
  }
  let mut execs: Vec<_> = (0..threads).map(|_| FakeExecutor::new(&dev, slot_len)).collect();
  let stats = run(&mut execs, ck, &reqs).unwrap_or_else(|e| panic!("{}: {e}", ck.root.display()));
  assert_eq!(stats.bytes, sizes.iter().sum::<u64>(), "{}", ck.root.display());
  // the padding around every destination is untouched
  let mut at = 0;
  for &len in &sizes {
    assert!(
      dev.read(dev.addr(at), PAD as usize).iter().all(|&b| b == FILL),
      "{}: a copy spilled",
      ck.root.display()
    );
    at += PAD + len;
  }
  reqs.iter().map(|r| dev.read(r.dst, r.dst_len as usize)).collect()
}

fn host_read(ck: &Checkpoint, key: &str, region: &Region) -> Vec<u8> {
  let len = distcp_cuda::region_bytes(ck, key, region).unwrap() as usize;
  let mut out = vec![0u8; len];
  ck.read_into(key, region, &mut out).unwrap();
  out
}

#[test]
fn every_fixture_tensor_on_the_fake_device_equals_the_host_read() {
  let mut tensors = 0;
  let mut shard1 = 0;
  for path in fixture_checkpoints() {
    let ck = Checkpoint::open(&path, None).expect("open");
    let keys = tensor_keys(&ck);
    let boxes: Vec<(String, Region)> =
      keys.iter().map(|k| (k.clone(), Region::whole(&ck.tensor(k).unwrap().size))).collect();
    for k in &keys {
      let t = ck.tensor(k).unwrap();
      if t.chunks.iter().any(|c| c.offsets.get(1).is_some_and(|&o| o > 0)) {
        shard1 += 1;
      }
    }
    let want: Vec<Vec<u8>> = boxes.iter().map(|(k, r)| host_read(&ck, k, r)).collect();
    // tiny slots force bands along every dimension; 1 MiB slots take whole chunks; one and several threads
    for (slot, threads) in [(64, 1), (96, 3), (4096, 2), (1 << 20, 4)] {
      let got = fake_read(&ck, &boxes, slot, threads);
      for (((k, _), g), w) in boxes.iter().zip(&got).zip(&want) {
        assert!(g == w, "{}: `{k}` differs with {slot}-byte slots, {threads} threads", path.display());
      }
    }
    tensors += keys.len();
  }
  assert!(tensors > 100, "{tensors}");
  assert!(shard1 >= 3, "expected Shard(1) tensors among the fixtures, found {shard1}");
}

/// xorshift64*: deterministic boxes without a dependency.
struct Rng(u64);

impl Rng {
  fn below(&mut self, n: u64) -> u64 {
    self.0 ^= self.0 >> 12;
    self.0 ^= self.0 << 25;
    self.0 ^= self.0 >> 27;
    self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n.max(1)
  }
}

#[test]
fn random_boxes_on_the_fake_device_equal_the_host_read() {
  let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
  let mut boxes_checked = 0;
  for path in fixture_checkpoints() {
    let ck = Checkpoint::open(&path, None).expect("open");
    let mut boxes = Vec::new();
    for k in tensor_keys(&ck) {
      let size = ck.tensor(&k).unwrap().size.clone();
      if size.contains(&0) {
        continue;
      }
      for _ in 0..3 {
        let offsets: Vec<u64> = size.iter().map(|&n| rng.below(n)).collect();
        let sizes: Vec<u64> = size.iter().zip(&offsets).map(|(&n, &o)| 1 + rng.below(n - o)).collect();
        boxes.push((k.clone(), Region { offsets, sizes }));
      }
    }
    let want: Vec<Vec<u8>> = boxes.iter().map(|(k, r)| host_read(&ck, k, r)).collect();
    for (slot, threads) in [(64, 2), (1 << 16, 3)] {
      let got = fake_read(&ck, &boxes, slot, threads);
      for (((k, r), g), w) in boxes.iter().zip(&got).zip(&want) {
        assert!(g == w, "{}: `{k}` box {r:?} differs with {slot}-byte slots", path.display());
      }
    }
    boxes_checked += boxes.len();
  }
  assert!(boxes_checked > 300, "{boxes_checked}");
}

#[test]
fn a_destination_of_the_wrong_size_is_refused_before_any_copy() {
  let path =
    fixture_checkpoints().into_iter().find(|p| p.to_string_lossy().contains("dtensor-2rank")).unwrap();
  let ck = Checkpoint::open(&path, None).unwrap();
  let key = "shard1";
  let region = Region::whole(&ck.tensor(key).unwrap().size);
  let len = distcp_cuda::region_bytes(&ck, key, &region).unwrap();
  let dev = FakeDevice::new(len as usize * 2, FILL);
  let mut execs = vec![FakeExecutor::new(&dev, 4096)];
  let req = Request { key: key.into(), region, dst: dev.addr(0), dst_len: len - 1, dtype: None };
  let e = run(&mut execs, &ck, &[req]).unwrap_err();
  assert_eq!(e.code(), "ERR_DISTCP_BAD_REQUEST", "{e}");
  assert!(dev.read(dev.addr(0), len as usize * 2).iter().all(|&b| b == FILL));
}

const FLOATS: [DType; 4] = [DType::Float64, DType::Float32, DType::Float16, DType::BFloat16];

/// The host read followed by the core's host cast: what a device read as `to` must land.
fn host_read_as(ck: &Checkpoint, key: &str, region: &Region, to: DType) -> Vec<u8> {
  let stored = host_read(ck, key, region);
  let from = ck.tensor(key).unwrap().dtype();
  let mut out = vec![0u8; stored.len() / from.size() * to.size()];
  distcp_core::convert::cast(&stored, from, &mut out, to);
  out
}

#[test]
fn every_float_fixture_tensor_read_as_every_float_dtype_equals_the_host_cast() {
  let mut rng = Rng(0x2545_f491_4f6c_dd1d);
  let (mut checked, mut device_widened, mut host_cast, mut shard1) = (0, 0, 0, 0);
  for path in fixture_checkpoints() {
    let ck = Checkpoint::open(&path, None).expect("open");
    let mut boxes = Vec::new();
    for k in tensor_keys(&ck) {
      let t = ck.tensor(&k).unwrap();
      if !FLOATS.contains(&t.dtype()) {
        continue;
      }
      if t.chunks.iter().any(|c| c.offsets.get(1).is_some_and(|&o| o > 0)) {
        shard1 += 1;
      }
      boxes.push((k.clone(), Region::whole(&t.size)));
      if !t.size.contains(&0) {
        let offsets: Vec<u64> = t.size.iter().map(|&n| rng.below(n)).collect();
        let sizes: Vec<u64> = t.size.iter().zip(&offsets).map(|(&n, &o)| 1 + rng.below(n - o)).collect();
        boxes.push((k.clone(), Region { offsets, sizes }));
      }
    }
    for to in FLOATS {
      // the boxes are grouped by stored dtype so that each run exercises one cast path
      for from in FLOATS {
        let group: Vec<_> =
          boxes.iter().filter(|(k, _)| ck.tensor(k).unwrap().dtype() == from).cloned().collect();
        if group.is_empty() {
          continue;
        }
        let want: Vec<Vec<u8>> = group.iter().map(|(k, r)| host_read_as(&ck, k, r, to)).collect();
        for (slot, threads) in [(64, 1), (96, 3), (1 << 20, 2)] {
          let got = fake_read_as(&ck, &group, slot, threads, Some(to));
          for (((k, r), g), w) in group.iter().zip(&got).zip(&want) {
            assert!(
              g == w,
              "{}: `{k}` {r:?} {from} as {to} differs with {slot}-byte slots, {threads} threads",
              path.display()
            );
          }
        }
        match distcp_cuda::cast::choose(from, to).unwrap() {
          distcp_cuda::cast::CastMode::Device { .. } => device_widened += group.len(),
          distcp_cuda::cast::CastMode::Host { .. } => host_cast += group.len(),
          distcp_cuda::cast::CastMode::None => {}
        }
        checked += group.len();
      }
    }
  }
  assert!(checked > 200, "{checked}");
  assert!(device_widened > 5 && host_cast > 50, "device {device_widened}, host {host_cast}");
  assert!(shard1 >= 3, "{shard1}");
}

#[test]
fn the_fake_device_widening_equals_the_core_host_cast_on_every_bit_pattern() {
  for from in [DType::BFloat16, DType::Float16] {
    let src: Vec<u8> = (0..=u16::MAX).flat_map(u16::to_le_bytes).collect();
    let mut host = vec![0u8; src.len() * 2];
    distcp_core::convert::cast(&src, from, &mut host, DType::Float32);
    let mut dev = vec![0u8; src.len() * 2];
    distcp_cuda::cast::widen_slice(from, &src, &mut dev);
    for (i, (h, d)) in host.chunks_exact(4).zip(dev.chunks_exact(4)).enumerate() {
      assert_eq!(h, d, "{from} {i:#06x}");
    }
  }
}

#[test]
fn casts_between_non_float_dtypes_are_refused() {
  let e = distcp_cuda::cast::choose(DType::Int64, DType::Float32).unwrap_err();
  assert_eq!(e.code(), "ERR_DISTCP_BAD_REQUEST", "{e}");
  assert!(distcp_cuda::cast::choose(DType::Float32, DType::Int8).is_err());
  assert_eq!(distcp_cuda::cast::choose(DType::Int8, DType::Int8).unwrap(), distcp_cuda::cast::CastMode::None);
}
