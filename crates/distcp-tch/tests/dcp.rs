//! tch models saved as DCP and loaded back, against torch itself: torch 2.13 (`.venv-tch`, the libtorch tch links)
//! loads what tch saved bit for bit, and checkpoints torch 2.13 and 2.15 wrote load into tch models.
//!
//! The Python side runs with `DISTCP_TCH_PYTHON`, else `<repo>/.venv-tch/bin/python` (the venv `npm test` makes).

use std::path::{Path, PathBuf};
use std::process::Command;

use distcp_core::write::{save, SaveOptions, SaveValue, TensorRef};
use distcp_core::DType;
use distcp_tch::{dtype_of_kind, flat_key, kind_of_dtype, load_var_store, save_var_store};
use tch::nn::{self, VarStore};
use tch::{Device, Kind, Tensor};

/// Every kind DCP stores (all but the quantized ones).
const KINDS: [Kind; 17] = [
  Kind::Uint8,
  Kind::Int8,
  Kind::Int16,
  Kind::Int,
  Kind::Int64,
  Kind::Half,
  Kind::Float,
  Kind::Double,
  Kind::ComplexHalf,
  Kind::ComplexFloat,
  Kind::ComplexDouble,
  Kind::Bool,
  Kind::BFloat16,
  Kind::Float8e5m2,
  Kind::Float8e4m3fn,
  Kind::Float8e5m2fnuz,
  Kind::Float8e4m3fnuz,
];

fn repo_root() -> PathBuf {
  Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn python() -> PathBuf {
  let p = std::env::var_os("DISTCP_TCH_PYTHON")
    .map(PathBuf::from)
    .unwrap_or_else(|| repo_root().join(".venv-tch/bin/python"));
  assert!(
    p.exists(),
    "{}: no Python with torch 2.13 (set DISTCP_TCH_PYTHON or run npm test once)",
    p.display()
  );
  p
}

fn run_python(args: &[&str]) -> String {
  let out = Command::new(python()).args(args).current_dir(repo_root()).output().expect("python runs");
  let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
  assert!(
    out.status.success(),
    "python {args:?} failed:\n{stdout}\n{}",
    String::from_utf8_lossy(&out.stderr)
  );
  stdout
}

/// A folder under the system temp dir, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
  fn new(name: &str) -> TempDir {
    let p = std::env::temp_dir().join(format!("distcp-tch-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    std::fs::create_dir_all(&p).expect("temp dir");
    TempDir(p)
  }
}

impl Drop for TempDir {
  fn drop(&mut self) {
    let _ = std::fs::remove_dir_all(&self.0);
  }
}

/// torch's `Sequential(Linear(4, 8), LayerNorm(8), ReLU(), Linear(8, 2))`, parameters named as torch names them.
fn seed_model(vs: &VarStore) -> nn::Sequential {
  let root = vs.root();
  nn::seq()
    .add(nn::linear(&root / "0", 4, 8, Default::default()))
    .add(nn::layer_norm(&root / "1", vec![8], Default::default()))
    .add_fn(|x| x.relu())
    .add(nn::linear(&root / "3", 8, 2, Default::default()))
}

/// The FSDP2 fixture's `Sequential(Linear(4, 6), ReLU(), Linear(6, 3))`.
fn fsdp_model(vs: &VarStore) -> nn::Sequential {
  let root = vs.root();
  nn::seq().add(nn::linear(&root / "0", 4, 6, Default::default())).add_fn(|x| x.relu()).add(nn::linear(
    &root / "2",
    6,
    3,
    Default::default(),
  ))
}

/// A tensor's logical values as bytes (row-major, host order), from any device.
fn raw(t: &Tensor) -> Vec<u8> {
  let mut out = vec![0u8; t.numel() * t.kind().elt_size_in_bytes()];
  if !out.is_empty() {
    t.copy_data_u8(&mut out, t.numel());
  }
  out
}

/// Deterministic bytes for a tensor of `kind` (every bit pattern, NaNs included; bools 0 or 1).
fn pattern(kind: Kind, numel: usize, seed: u64) -> Vec<u8> {
  let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
  (0..numel * kind.elt_size_in_bytes())
    .map(|_| {
      x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
      let b = (x >> 56) as u8;
      if kind == Kind::Bool {
        b & 1
      } else {
        b
      }
    })
    .collect()
}

fn kind_name(kind: Kind) -> &'static str {
  dtype_of_kind(kind).expect("a DCP kind").name()
}

/// A store with one variable per kind, plus a 0-dim, an empty and a non-contiguous (transposed) variable.
fn every_kind_store(device: Device, seed: u64) -> VarStore {
  let vs = VarStore::new(device);
  let root = vs.root();
  for (i, kind) in KINDS.into_iter().enumerate() {
    let t = Tensor::from_data_size(&pattern(kind, 6, seed + i as u64), &[2, 3], kind).to_device(device);
    let _ = root.add(kind_name(kind), t, false);
  }
  let scalar = Tensor::from_data_size(&pattern(Kind::Float, 1, seed + 100), &[], Kind::Float);
  let _ = root.add("scalar", scalar.to_device(device), false);
  let _ = root.add("empty", Tensor::zeros([0, 3], (Kind::Int64, device)), false);
  let wide =
    Tensor::from_data_size(&pattern(Kind::Double, 12, seed + 200), &[3, 4], Kind::Double).to_device(device);
  let t = wide.tr();
  assert!(!t.is_contiguous());
  let _ = (&root / "nested").add("transposed", t, false);
  vs
}

/// Writes the fixtures' `expected.json` (`tensors`) and `expected.safetensors` (raw bytes) for `vs`.
fn export_expected(vs: &VarStore, dir: &Path) {
  let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
  vars.sort_by(|a, b| a.0.cmp(&b.0));
  let mut tensors = serde_json::Map::new();
  let mut bytes = Vec::new();
  for (name, t) in &vars {
    let info = serde_json::json!({ "dtype": kind_name(t.kind()), "shape": t.size() });
    tensors.insert(flat_key(name), info);
    let b = raw(t);
    bytes.push((flat_key(name), Tensor::from_data_size(&b, &[b.len() as i64], Kind::Uint8)));
  }
  let json = serde_json::json!({ "tensors": tensors });
  std::fs::write(dir.join("expected.json"), serde_json::to_vec_pretty(&json).expect("json"))
    .expect("write json");
  Tensor::write_safetensors(&bytes, dir.join("expected.safetensors")).expect("write safetensors");
}

/// Asserts that every variable of `vs` holds the bytes `expected.safetensors` in `dir` has under its flat key.
fn assert_matches_expected(vs: &VarStore, dir: &Path) {
  let expected: std::collections::HashMap<String, Tensor> =
    Tensor::read_safetensors(dir.join("expected.safetensors"))
      .expect("read safetensors")
      .into_iter()
      .collect();
  let vars = vs.variables();
  assert!(!vars.is_empty());
  for (name, t) in vars {
    let want = expected.get(&flat_key(&name)).unwrap_or_else(|| panic!("{name}: not in {}", dir.display()));
    assert_eq!(raw(&t), raw(want), "{name}: loaded bytes differ from what torch saved");
  }
}

#[test]
fn kinds_and_dtypes_map_both_ways() {
  for kind in KINDS {
    let dtype = dtype_of_kind(kind).expect("a DCP dtype");
    assert_eq!(kind_of_dtype(dtype), Some(kind));
    assert_eq!(dtype.size(), kind.elt_size_in_bytes(), "{kind:?}");
  }
  for kind in [Kind::QInt8, Kind::QUInt8, Kind::QInt32] {
    assert_eq!(dtype_of_kind(kind), None);
  }
  for dtype in [DType::UInt16, DType::UInt32, DType::UInt64, DType::Float8E8M0Fnu] {
    assert_eq!(kind_of_dtype(dtype), None);
  }
}

#[test]
fn every_kind_round_trips_bit_for_bit() {
  let dir = TempDir::new("round-trip");
  let ckpt = dir.0.join("ckpt");
  let vs = every_kind_store(Device::Cpu, 1);
  let summary = save_var_store(&vs, &ckpt).expect("save");
  assert_eq!(summary.tensors, KINDS.len() + 3);
  assert!(summary.keys.iter().all(|k| k.starts_with("model.")), "{:?}", summary.keys);

  let mut back = every_kind_store(Device::Cpu, 1000);
  let loaded = load_var_store(&mut back, &ckpt).expect("load");
  assert_eq!(loaded.len(), KINDS.len() + 3);
  let before = vs.variables();
  for (name, t) in back.variables() {
    assert_eq!(raw(&t), raw(&before[&name]), "{name}");
    assert_eq!(t.size(), before[&name].size(), "{name}");
  }
}

#[test]
fn torch_2_13_loads_what_tch_saved_bit_for_bit() {
  let dir = TempDir::new("to-torch");
  let kinds = every_kind_store(Device::Cpu, 7);
  save_var_store(&kinds, dir.0.join("kinds")).expect("save");
  export_expected(&kinds, &dir.0);
  let out =
    run_python(&["interop/check_tch.py", &dir.0.join("kinds").to_string_lossy(), &dir.0.to_string_lossy()]);
  assert!(out.contains(&format!("check_tch: ok, {} tensors", KINDS.len() + 3)), "{out}");
  assert!(out.contains("(torch 2.13.0"), "{out}");

  tch::manual_seed(3);
  let vs = VarStore::new(Device::Cpu);
  let _net = seed_model(&vs);
  let seed_dir = TempDir::new("to-torch-seed");
  save_var_store(&vs, seed_dir.0.join("ckpt")).expect("save");
  export_expected(&vs, &seed_dir.0);
  let ckpt = seed_dir.0.join("ckpt");
  let out = run_python(&[
    "interop/check_tch.py",
    &ckpt.to_string_lossy(),
    &seed_dir.0.to_string_lossy(),
    "--seed-model",
  ]);
  assert!(out.contains("check_tch: ok, 12 tensors"), "{out}");
}

#[test]
fn torch_2_15_checkpoints_load_into_tch() {
  let fixtures = repo_root().join("fixtures/torch-2.15.0");
  let mut vs = VarStore::new(Device::Cpu);
  let _net = seed_model(&vs);
  load_var_store(&mut vs, fixtures.join("seed-model/ckpt")).expect("load seed-model");
  assert_matches_expected(&vs, &fixtures.join("seed-model"));

  // two ranks, uneven FSDP2 shards: the core assembles each tensor from both data files
  let mut vs = VarStore::new(Device::Cpu);
  let _net = fsdp_model(&vs);
  load_var_store(&mut vs, fixtures.join("fsdp2-2rank/ckpt")).expect("load fsdp2-2rank");
  assert_matches_expected(&vs, &fixtures.join("fsdp2-2rank"));
}

#[test]
fn torch_2_13_checkpoints_load_into_tch() {
  // the FSDP2 fixture is made by the newest torch only; sharded reads are covered by the 2.15 one above
  let dir = TempDir::new("from-torch");
  run_python(&["interop/make_fixtures.py", "--out", &dir.0.to_string_lossy(), "--only", "seed-model"]);
  let fixture = dir.0.join("seed-model");
  let expected = std::fs::read_to_string(fixture.join("expected.json")).expect("expected.json");
  assert!(expected.contains("\"torch_version\": \"2.13.0"), "not written by torch 2.13: {expected}");
  let mut vs = VarStore::new(Device::Cpu);
  let _net = seed_model(&vs);
  load_var_store(&mut vs, fixture.join("ckpt")).expect("load seed-model");
  assert_matches_expected(&vs, &fixture);
}

#[test]
fn mismatches_are_coded_errors_and_leave_the_store_unchanged() {
  let dir = TempDir::new("mismatch");
  let ckpt = dir.0.join("ckpt");
  let vs = VarStore::new(Device::Cpu);
  let _net = seed_model(&vs);
  save_var_store(&vs, &ckpt).expect("save");

  // same names, one shape transposed: nothing may be written, not even the variables that would fit
  let mut other = VarStore::new(Device::Cpu);
  let root = other.root();
  let _ = (&root / "0").add("bias", Tensor::zeros([8], (Kind::Float, Device::Cpu)), false);
  let _ = (&root / "0").add("weight", Tensor::zeros([4, 8], (Kind::Float, Device::Cpu)), false);
  let e = load_var_store(&mut other, &ckpt).expect_err("shape mismatch");
  assert_eq!(e.code(), "ERR_DISTCP_BAD_REQUEST", "{e}");
  assert!(e.to_string().contains("model.0.weight") && e.to_string().contains("[8, 4]"), "{e}");
  assert_eq!(raw(&other.variables()["0.bias"]), vec![0u8; 32], "a failed load wrote a variable");

  let mut other = VarStore::new(Device::Cpu);
  let _ = (&other.root() / "0").add("bias", Tensor::zeros([8], (Kind::Double, Device::Cpu)), false);
  let e = load_var_store(&mut other, &ckpt).expect_err("dtype mismatch");
  assert_eq!(e.code(), "ERR_DISTCP_BAD_REQUEST", "{e}");
  assert!(e.to_string().contains("float32"), "{e}");

  let mut other = VarStore::new(Device::Cpu);
  let _ = other.root().add("missing", Tensor::zeros([8], (Kind::Float, Device::Cpu)), false);
  let e = load_var_store(&mut other, &ckpt).expect_err("missing key");
  assert_eq!(e.code(), "ERR_DISTCP_NO_SUCH_KEY", "{e}");
  assert!(e.to_string().contains("model.missing"), "{e}");

  let e = load_var_store(&mut other, dir.0.join("nowhere")).expect_err("no checkpoint");
  assert_eq!(e.code(), "ERR_DISTCP_NO_CHECKPOINT", "{e}");
}

#[test]
fn kinds_dcp_and_tch_do_not_share_are_refused() {
  let dir = TempDir::new("unshared");
  let q = VarStore::new(Device::Cpu);
  let t = Tensor::ones([4], (Kind::Float, Device::Cpu)).quantize_per_tensor(0.5, 0, Kind::QInt8);
  let _ = q.root().add("q", t, false);
  let e = save_var_store(&q, dir.0.join("q")).expect_err("quantized");
  assert_eq!(e.code(), "ERR_DISTCP_INVALID_INPUT", "{e}");
  assert!(!dir.0.join("q").exists(), "a refused save touched the disk");

  // a uint16 tensor (which torch ≥ 2.3 saves) has no tch kind to load into
  let data = [1u8, 0, 2, 0];
  let root = SaveValue::Dict(vec![(
    SaveValue::Str("model".into()),
    SaveValue::Dict(vec![(
      SaveValue::Str("w".into()),
      SaveValue::Tensor(TensorRef { dtype: DType::UInt16, shape: vec![2], data: &data }),
    )]),
  )]);
  save(dir.0.join("u16"), &root, &SaveOptions { sync: false, ..Default::default() }).expect("core save");
  let mut vs = VarStore::new(Device::Cpu);
  let _ = vs.root().add("w", Tensor::zeros([2], (Kind::Int16, Device::Cpu)), false);
  let e = load_var_store(&mut vs, dir.0.join("u16")).expect_err("uint16");
  assert_eq!(e.code(), "ERR_DISTCP_BAD_REQUEST", "{e}");
  assert!(e.to_string().contains("uint16, which tch has no kind for"), "{e}");
}

/// Runs where libtorch sees a CUDA device (set DISTCP_TCH_REQUIRE_CUDA=1 to make its absence a failure).
#[test]
fn cuda_variables_go_through_host_memory() {
  if !tch::Cuda::is_available() {
    assert!(
      std::env::var_os("DISTCP_TCH_REQUIRE_CUDA").is_none(),
      "DISTCP_TCH_REQUIRE_CUDA is set, no CUDA device"
    );
    eprintln!("cuda_variables_go_through_host_memory: no CUDA device, CPU only");
    return;
  }
  let dir = TempDir::new("cuda");
  let ckpt = dir.0.join("ckpt");
  let gpu = every_kind_store(Device::Cuda(0), 5);
  save_var_store(&gpu, &ckpt).expect("save from CUDA");
  let mut cpu = every_kind_store(Device::Cpu, 50);
  load_var_store(&mut cpu, &ckpt).expect("load to CPU");
  let mut gpu2 = every_kind_store(Device::Cuda(0), 500);
  load_var_store(&mut gpu2, &ckpt).expect("load to CUDA");
  let saved = gpu.variables();
  for (name, t) in gpu2.variables() {
    assert_eq!(t.device(), Device::Cuda(0), "{name}");
    assert_eq!(raw(&t), raw(&saved[&name]), "{name}: CUDA → DCP → CUDA");
    assert_eq!(raw(&cpu.variables()[&name]), raw(&saved[&name]), "{name}: CUDA → DCP → CPU");
  }
}

/// Adds `tensor` under a dotted name (`Path::add` refuses dots: each element is a sub-path).
fn add_dotted(vs: &VarStore, name: &str, tensor: Tensor) {
  let mut parts: Vec<&str> = name.split('.').collect();
  let last = parts.pop().expect("a name");
  let path = parts.into_iter().fold(vs.root(), |p, part| p.sub(part));
  let _ = path.add(last, tensor, false);
}

/// A tch model saved as DCP converts with `distcp convert` and loads in transformers with torch's exact logits.
/// Needs `npm run build` (done by `npm test` first) and the main venv with torch + transformers (`DISTCP_PYTHON`,
/// else `<repo>/.venv/bin/python`).
#[test]
fn tch_checkpoint_converts_to_hugging_face() {
  let main_python = std::env::var_os("DISTCP_PYTHON")
    .map(PathBuf::from)
    .unwrap_or_else(|| repo_root().join(".venv/bin/python"));
  let cli = repo_root().join("bin/distcp.js");
  assert!(repo_root().join("dist/cli.js").exists(), "no build: run `npm run build` first");
  let dir = TempDir::new("to-hf");
  let case = dir.0.join("case");
  let status = Command::new(&main_python)
    .args(["interop/make_hf_case.py", &case.to_string_lossy(), "--tied", "--ranks", "1", "--seed", "11"])
    .current_dir(repo_root())
    .output()
    .expect("make_hf_case.py runs");
  assert!(status.status.success(), "make_hf_case.py: {}", String::from_utf8_lossy(&status.stderr));

  // a tch store with the variables of torch's Llama checkpoint, loaded from it, then saved by tch
  let torch_dcp = distcp_core::Checkpoint::open(case.join("dcp"), None).expect("open the torch checkpoint");
  let vs = VarStore::new(Device::Cpu);
  for key in torch_dcp.keys() {
    let t = torch_dcp.tensor(key).expect("a tensor");
    let kind = kind_of_dtype(t.dtype()).expect("a tch kind");
    let shape: Vec<i64> = t.size.iter().map(|&d| d as i64).collect();
    add_dotted(
      &vs,
      key.strip_prefix("model.").expect("under model."),
      Tensor::zeros(&shape, (kind, Device::Cpu)),
    );
  }
  let mut vs = vs;
  load_var_store(&mut vs, case.join("dcp")).expect("load the torch checkpoint");
  let tch_dcp = dir.0.join("tch-dcp");
  save_var_store(&vs, &tch_dcp).expect("save");

  let hf = dir.0.join("hf");
  let out = Command::new("node")
    .arg(&cli)
    .args(["convert", &tch_dcp.to_string_lossy(), &hf.to_string_lossy()])
    .args([
      "--config",
      &case.join("model").to_string_lossy(),
      "--tokenizer",
      &case.join("tokenizer").to_string_lossy(),
    ])
    .current_dir(repo_root())
    .output()
    .expect("node runs");
  assert!(
    out.status.success(),
    "distcp convert: {}\n{}",
    String::from_utf8_lossy(&out.stdout),
    String::from_utf8_lossy(&out.stderr)
  );

  let out = Command::new(&main_python)
    .args(["interop/check_hf_output.py", &hf.to_string_lossy(), &case.to_string_lossy()])
    .current_dir(repo_root())
    .output()
    .expect("check_hf_output.py runs");
  let report = String::from_utf8_lossy(&out.stdout);
  assert!(out.status.success(), "check_hf_output.py: {report}\n{}", String::from_utf8_lossy(&out.stderr));
  let report: serde_json::Value = serde_json::from_str(&report).expect("a JSON report");
  assert_eq!(report["errors"], serde_json::json!([]), "{report}");
}
