//! Property tests: random state dicts saved and read back are equal; random boxes of torch-written, sharded tensors
//! equal the numpy-style slice of the whole tensor (computed here element by element, independently of the
//! planner and of `exec::lower`).

use distcp_core::dtype::DType;
use distcp_core::plan::Region;
use distcp_core::write::{save, SaveOptions, SaveValue, TensorRef};
use distcp_core::Checkpoint;
use proptest::prelude::*;
use std::path::{Path, PathBuf};

const DTYPES: [DType; 6] =
  [DType::Float32, DType::BFloat16, DType::Int64, DType::UInt8, DType::Float64, DType::Int16];

#[derive(Debug, Clone)]
struct T {
  dtype: DType,
  shape: Vec<u64>,
  data: Vec<u8>,
}

fn tensor() -> impl Strategy<Value = T> {
  (0..DTYPES.len(), prop::collection::vec(0u64..5, 0..4)).prop_flat_map(|(d, shape)| {
    let dtype = DTYPES[d];
    let n = shape.iter().product::<u64>() as usize * dtype.size();
    prop::collection::vec(any::<u8>(), n).prop_map(move |data| T { dtype, shape: shape.clone(), data })
  })
}

fn tempdir(tag: &str) -> PathBuf {
  let d = std::env::temp_dir().join(format!("distcp-prop-{tag}-{}-{}", std::process::id(), rand_suffix()));
  std::fs::create_dir_all(&d).unwrap();
  d
}

fn rand_suffix() -> u64 {
  use std::sync::atomic::{AtomicU64, Ordering};
  static N: AtomicU64 = AtomicU64::new(0);
  N.fetch_add(1, Ordering::Relaxed)
}

proptest! {
  #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

  /// A nested state dict of random tensors and ints, saved, reads back equal key by key.
  #[test]
  fn saved_state_dicts_read_back_equal(tensors in prop::collection::vec(tensor(), 1..6), ints in prop::collection::vec(any::<i64>(), 0..4)) {
    let dir = tempdir("save");
    let layer: Vec<(SaveValue, SaveValue)> = tensors
      .iter()
      .enumerate()
      .map(|(i, t)| (SaveValue::Str(format!("w{i}")), SaveValue::Tensor(TensorRef { dtype: t.dtype, shape: t.shape.clone(), data: &t.data })))
      .collect();
    let steps: Vec<(SaveValue, SaveValue)> =
      ints.iter().enumerate().map(|(i, &x)| (SaveValue::Str(format!("s{i}")), SaveValue::Int(x))).collect();
    let root = SaveValue::Dict(vec![
      (SaveValue::Str("model".into()), SaveValue::Dict(vec![(SaveValue::Str("layer".into()), SaveValue::Dict(layer))])),
      (SaveValue::Str("step".into()), SaveValue::Dict(steps)),
    ]);
    save(&dir, &root, &SaveOptions { sync: false, ..SaveOptions::default() }).unwrap();
    let ck = Checkpoint::open(&dir, None).unwrap();
    for (i, t) in tensors.iter().enumerate() {
      let key = format!("model.layer.w{i}");
      prop_assert_eq!(ck.dtype(&key).unwrap(), t.dtype);
      prop_assert_eq!(&ck.tensor(&key).unwrap().size, &t.shape);
      prop_assert_eq!(ck.read_tensor(&key).unwrap(), t.data.clone());
    }
    for (i, &x) in ints.iter().enumerate() {
      let v = ck.read_object(&format!("step.s{i}")).unwrap();
      prop_assert_eq!(format!("{v:?}"), format!("{:?}", distcp_core::torch_save::PyObject::Int(x)));
    }
    drop(ck);
    std::fs::remove_dir_all(&dir).unwrap();
  }
}

/// The numpy-style slice `full[offsets : offsets + sizes]` of a row-major tensor, element by element.
fn slice(full: &[u8], shape: &[u64], es: usize, region: &Region) -> Vec<u8> {
  let n: u64 = region.sizes.iter().product();
  let mut out = Vec::with_capacity(n as usize * es);
  for flat in 0..n {
    // the box-local index of element `flat`, then its global row-major position
    let mut rem = flat;
    let mut pos = 0u64;
    let mut stride = 1u64;
    let mut idx = vec![0u64; shape.len()];
    for d in (0..shape.len()).rev() {
      idx[d] = rem % region.sizes[d];
      rem /= region.sizes[d];
    }
    for d in (0..shape.len()).rev() {
      pos += (idx[d] + region.offsets[d]) * stride;
      stride *= shape[d];
    }
    let p = pos as usize * es;
    out.extend_from_slice(&full[p..p + es]);
  }
  out
}

fn sharded_fixtures() -> Vec<PathBuf> {
  let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures");
  let mut out = Vec::new();
  for v in ["torch-2.3.1", "torch-2.7.1", "torch-2.15.0"] {
    for f in ["dtensor-2rank", "dtensor-4rank", "fsdp2-2rank", "dtypes", "zstd"] {
      let p = root.join(v).join(f).join("ckpt");
      if p.is_dir() {
        out.push(p);
      }
    }
  }
  assert!(out.len() >= 8, "torch fixtures missing: {out:?}");
  out
}

proptest! {
  #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

  /// Random boxes of every tensor of the torch-written fixtures (sharded on several ranks, zstd, every dtype) equal
  /// the slice of the whole tensor.
  #[test]
  fn boxes_equal_slices_of_the_whole_tensor(pick in any::<prop::sample::Index>(), key_pick in any::<prop::sample::Index>(), cuts in prop::collection::vec((any::<prop::sample::Index>(), any::<prop::sample::Index>()), 0..5)) {
    let fixtures = sharded_fixtures();
    let ck = Checkpoint::open(pick.get(&fixtures), None).unwrap();
    let tensors: Vec<String> = ck.keys().filter(|k| ck.tensor(k).is_ok()).map(str::to_owned).collect();
    prop_assume!(!tensors.is_empty());
    let key = key_pick.get(&tensors);
    let t = ck.tensor(key).unwrap().clone();
    let es = t.dtype().size();
    let full = ck.read_tensor(key).unwrap();
    let mut region = Region::whole(&t.size);
    for (d, &n) in t.size.iter().enumerate() {
      if n == 0 {
        continue;
      }
      let (a, b) = cuts.get(d).map(|(a, b)| (a.index(n as usize) as u64, b.index(n as usize + 1) as u64)).unwrap_or((0, n));
      let (lo, hi) = (a.min(b), a.max(b).max(a.min(b) + 1).min(n));
      region.offsets[d] = lo;
      region.sizes[d] = hi - lo;
    }
    let mut got = vec![0u8; region.sizes.iter().product::<u64>() as usize * es];
    ck.read_into(key, &region, &mut got).unwrap();
    let want = slice(&full, &t.size, es, &region);
    prop_assert_eq!(&got, &want, "{} box {:?}", key, region);
    // the same box paced by hand: planned once, copied on this thread only (what a conversion's slabs do)
    let read = ck.plan_read(key, &region).unwrap();
    prop_assert_eq!(read.bytes(), got.len() as u64);
    let mut here = vec![0u8; got.len()];
    read.copy_here(&mut here).unwrap();
    prop_assert_eq!(&here, &want, "{} box {:?} copied on one thread", key, region);
    // a destination one byte short is refused by both, naming the key, before anything is copied
    let mut short = vec![0u8; got.len().saturating_sub(1)];
    if !got.is_empty() {
      let e = read.copy_into(&mut short).unwrap_err().to_string();
      prop_assert!(e.contains(key.as_str()) && e.contains("the destination holds"), "{}", e);
      prop_assert!(read.copy_here(&mut short).is_err());
    }
  }
}
