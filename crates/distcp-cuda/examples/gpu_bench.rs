//! The GPU proof: `bench/gpu/run.sh` drives this on a machine with a GPU (no Node, no Rust there).
//!
//! ```text
//! gpu_bench info                                  cuda_info
//! gpu_bench smoke                                 cuda_info + a 1 GB pinned upload
//! gpu_bench ceiling [--gb G]                      pinned buffer → device, large copies (GB/s)
//! gpu_bench disk --ckpt DIR [--threads N]         parallel pread of the data files into host memory (GB/s)
//! gpu_bench load --ckpt DIR [--runs R] [--threads N] [--slot-mb M]
//!                                                 every tensor read to the GPU by distcp (GB/s, best of R)
//! gpu_bench verify --ckpt DIR [--sums FILE] [--boxes N]
//!                                                 GPU read == host read (bit for bit), sha256 == torch's, boxes
//! gpu_bench hostsums --ckpt DIR --sums FILE       distcp's host read == torch's sha256 (no GPU needed)
//! gpu_bench savecheck --ckpt DIR --out DIR        a save from device memory == a save of the host read (files)
//! gpu_bench castcheck --ckpt DIR --out DIR [--sums FILE]
//!                                                 every tensor read to the GPU as float32 (device widening) ==
//!                                                 host read + core cast == torch's CUDA `.to(float32)` sha256;
//!                                                 also all 65536 bf16 and fp16 bit patterns
//! ```
//! Machine-readable results are lines `RESULT <name> <value>`.

use distcp_core::metadata::ItemMetadata;
use distcp_core::plan::Region;
use distcp_core::Checkpoint;
use distcp_cuda::driver::{copy_to_host, measure_pinned_upload};
use distcp_cuda::{cuda_info, CudaReader, DeviceBuffer, ReaderOptions, Request};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::process::ExitCode;
use std::time::Instant;

type Res<T> = Result<T, String>;

struct Args {
  cmd: String,
  opts: HashMap<String, String>,
}

impl Args {
  fn parse() -> Args {
    let mut it = std::env::args().skip(1);
    let cmd = it.next().unwrap_or_else(|| "info".into());
    let mut opts = HashMap::new();
    while let Some(a) = it.next() {
      if let Some(name) = a.strip_prefix("--") {
        opts.insert(name.to_owned(), it.next().unwrap_or_default());
      }
    }
    Args { cmd, opts }
  }

  fn get(&self, name: &str) -> Option<&str> {
    self.opts.get(name).map(String::as_str)
  }

  fn num(&self, name: &str, default: f64) -> f64 {
    self.get(name).and_then(|v| v.parse().ok()).unwrap_or(default)
  }

  fn ckpt(&self) -> Res<Checkpoint> {
    let dir = self.get("ckpt").ok_or("--ckpt DIR is required")?;
    Checkpoint::open(dir, None).map_err(|e| e.to_string())
  }

  fn reader_options(&self) -> ReaderOptions {
    let d = ReaderOptions::default();
    ReaderOptions {
      threads: self.num("threads", d.threads as f64) as usize,
      slot_len: (self.num("slot-mb", (d.slot_len >> 20) as f64) * (1 << 20) as f64) as usize,
    }
  }
}

fn gb(bytes: u64) -> f64 {
  bytes as f64 / 1e9
}

fn info() -> bool {
  let i = cuda_info();
  println!("cuda_info: available={} driver={}", i.available, i.driver_version.as_deref().unwrap_or("-"));
  if let Some(r) = &i.reason {
    println!("cuda_info: reason: {r}");
  }
  for d in &i.devices {
    println!(
      "cuda_info: device {}: {} {:.1} GiB pci {}",
      d.index,
      d.name,
      d.total_memory as f64 / (1u64 << 30) as f64,
      d.pci_bus_id
    );
  }
  println!("RESULT cuda_available {}", i.available);
  i.available
}

fn ceiling(total_gb: f64) -> Res<()> {
  let dev = distcp_cuda::Device::open(0).map_err(|e| e.to_string())?;
  let (bytes, secs) =
    measure_pinned_upload(&dev, (total_gb * 1e9) as u64, 256 << 20).map_err(|e| e.to_string())?;
  println!("ceiling: {:.2} GB pinned → device in {secs:.3} s", gb(bytes));
  println!("RESULT ceiling_gbps {:.2}", gb(bytes) / secs);
  Ok(())
}

fn tensor_keys(ck: &Checkpoint) -> Vec<String> {
  let mut keys: Vec<String> = ck
    .metadata
    .items
    .iter()
    .filter(|(_, i)| matches!(i, ItemMetadata::Tensor(_)))
    .map(|(k, _)| k.clone())
    .collect();
  keys.sort();
  keys
}

fn disk(a: &Args) -> Res<()> {
  let ck = a.ckpt()?;
  let mut files: Vec<_> = ck.metadata.storage_data.values().map(|i| ck.root.join(&i.relative_path)).collect();
  files.sort();
  files.dedup();
  let threads = a.num("threads", 8.0) as usize;
  const BLOCK: u64 = 16 << 20;
  let mut blocks = Vec::new();
  for f in &files {
    let len = std::fs::metadata(f).map_err(|e| format!("{}: {e}", f.display()))?.len();
    let mut at = 0;
    while at < len {
      blocks.push((f.clone(), at, BLOCK.min(len - at)));
      at += BLOCK;
    }
  }
  let next = std::sync::atomic::AtomicUsize::new(0);
  let t = Instant::now();
  let total: u64 = std::thread::scope(|s| {
    let hs: Vec<_> = (0..threads)
      .map(|_| {
        s.spawn(|| {
          let mut buf = vec![0u8; BLOCK as usize];
          let mut opened: HashMap<std::path::PathBuf, std::fs::File> = HashMap::new();
          let mut n = 0u64;
          loop {
            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let Some((p, at, len)) = blocks.get(i) else { break };
            let f =
              opened.entry(p.clone()).or_insert_with(|| std::fs::File::open(p).expect("open data file"));
            f.read_exact_at(&mut buf[..*len as usize], *at).expect("read data file");
            n += len;
          }
          n
        })
      })
      .collect();
    hs.into_iter().map(|h| h.join().unwrap_or(0)).sum()
  });
  let secs = t.elapsed().as_secs_f64();
  println!("disk: {:.2} GB from {} files in {secs:.3} s ({threads} threads)", gb(total), files.len());
  println!("RESULT disk_gbps {:.2}", gb(total) / secs);
  Ok(())
}

fn load(a: &Args) -> Res<()> {
  let ck = a.ckpt()?;
  let opts = a.reader_options();
  let mut reader = CudaReader::new(0, opts).map_err(|e| e.to_string())?;
  let keys = tensor_keys(&ck);
  let mut bufs = Vec::new();
  let mut reqs = Vec::new();
  for k in &keys {
    let region = Region::whole(&ck.tensor(k).map_err(|e| e.to_string())?.size);
    let len = distcp_cuda::region_bytes(&ck, k, &region).map_err(|e| e.to_string())?;
    let buf = DeviceBuffer::alloc(reader.device(), len).map_err(|e| e.to_string())?;
    reqs.push(Request { key: k.clone(), region, dst: buf.ptr(), dst_len: len, dtype: None });
    bufs.push(buf);
  }
  let runs = a.num("runs", 1.0).max(1.0) as usize;
  let mut best = f64::MAX;
  let mut bytes = 0;
  for run in 0..runs {
    let t = Instant::now();
    let s = reader.read(&ck, &reqs).map_err(|e| e.to_string())?;
    let secs = t.elapsed().as_secs_f64();
    bytes = s.bytes;
    println!(
      "load run {run}: {:.2} GB ({} tensors, {} bands, {:.2} GB staged) in {secs:.3} s = {:.2} GB/s ({} threads × 2 × {} MiB)",
      gb(s.bytes),
      keys.len(),
      s.bands,
      gb(s.staged),
      gb(s.bytes) / secs,
      opts.threads,
      opts.slot_len >> 20
    );
    best = best.min(secs);
  }
  println!("RESULT load_gbps {:.2}", gb(bytes) / best);
  println!("RESULT load_bytes {bytes}");
  Ok(())
}

fn sha_hex(bytes: &[u8]) -> String {
  Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
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

fn device_read(reader: &mut CudaReader, ck: &Checkpoint, key: &str, region: &Region) -> Res<Vec<u8>> {
  let buf = reader.read_alloc(ck, key, region, None).map_err(|e| e.to_string())?;
  let mut out = vec![0u8; buf.len() as usize];
  copy_to_host(reader.device(), buf.ptr(), &mut out).map_err(|e| e.to_string())?;
  Ok(out)
}

fn host_read(ck: &Checkpoint, key: &str, region: &Region) -> Res<Vec<u8>> {
  let len = distcp_cuda::region_bytes(ck, key, region).map_err(|e| e.to_string())? as usize;
  let mut out = vec![0u8; len];
  ck.read_into(key, region, &mut out).map_err(|e| e.to_string())?;
  Ok(out)
}

#[derive(Default)]
struct Tally {
  tensors: usize,
  gpu_eq_host: usize,
  sha_checked: usize,
  sha_eq_torch: usize,
  boxes: usize,
  boxes_eq: usize,
  failures: Vec<String>,
}

fn verify_key(
  reader: &mut CudaReader,
  ck: &Checkpoint,
  key: &str,
  sums: &HashMap<String, String>,
  nboxes: usize,
  rng: &mut Rng,
  t: &mut Tally,
) -> Res<()> {
  let size = ck.tensor(key).map_err(|e| e.to_string())?.size.clone();
  let whole = Region::whole(&size);
  let host = host_read(ck, key, &whole)?;
  let dev = device_read(reader, ck, key, &whole)?;
  t.tensors += 1;
  if dev == host {
    t.gpu_eq_host += 1;
  } else {
    t.failures.push(format!("{key}: GPU read differs from the host read"));
  }
  if let Some(want) = sums.get(key) {
    t.sha_checked += 1;
    if sha_hex(&dev) == *want {
      t.sha_eq_torch += 1;
    } else {
      t.failures.push(format!("{key}: sha256 differs from torch dcp.load's"));
    }
  }
  if size.iter().all(|&n| n > 0) {
    for _ in 0..nboxes {
      let offsets: Vec<u64> = size.iter().map(|&n| rng.below(n)).collect();
      let sizes: Vec<u64> = size.iter().zip(&offsets).map(|(&n, &o)| 1 + rng.below(n - o)).collect();
      let region = Region { offsets, sizes };
      let h = host_read(ck, key, &region)?;
      let d = device_read(reader, ck, key, &region)?;
      t.boxes += 1;
      if h == d {
        t.boxes_eq += 1;
      } else {
        t.failures.push(format!("{key}: box {region:?} differs"));
      }
    }
  }
  Ok(())
}

fn verify(a: &Args) -> Res<bool> {
  let ck = a.ckpt()?;
  let sums = read_sums(a)?;
  let nboxes = a.num("boxes", 2.0) as usize;
  let workers = a.num("workers", 4.0).max(1.0) as usize;
  let keys = tensor_keys(&ck);
  let next = std::sync::atomic::AtomicUsize::new(0);
  let t0 = Instant::now();
  let tallies: Vec<Res<Tally>> = std::thread::scope(|s| {
    let hs: Vec<_> = (0..workers)
      .map(|w| {
        let (ck, keys, sums, next) = (&ck, &keys, &sums, &next);
        s.spawn(move || -> Res<Tally> {
          let opts = ReaderOptions { threads: 4, slot_len: 16 << 20 };
          let mut reader = CudaReader::new(0, opts).map_err(|e| e.to_string())?;
          let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (w as u64 + 1));
          let mut t = Tally::default();
          loop {
            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let Some(key) = keys.get(i) else { break };
            if let Err(e) = verify_key(&mut reader, ck, key, sums, nboxes, &mut rng, &mut t) {
              t.failures.push(format!("{key}: {e}"));
            }
          }
          Ok(t)
        })
      })
      .collect();
    hs.into_iter().map(|h| h.join().unwrap_or_else(|_| Err("a verify worker panicked".into()))).collect()
  });
  let mut t = Tally::default();
  for r in tallies {
    let x = r?;
    t.tensors += x.tensors;
    t.gpu_eq_host += x.gpu_eq_host;
    t.sha_checked += x.sha_checked;
    t.sha_eq_torch += x.sha_eq_torch;
    t.boxes += x.boxes;
    t.boxes_eq += x.boxes_eq;
    t.failures.extend(x.failures);
  }
  let missing = sums.keys().filter(|k| !keys.contains(k)).count();
  for f in t.failures.iter().take(20) {
    println!("verify: FAIL {f}");
  }
  println!(
    "verify: {} tensors, GPU == host {}/{}, sha256 == torch {}/{} ({} torch keys missing here), boxes {}/{} in {:.1} s",
    keys.len(),
    t.gpu_eq_host,
    t.tensors,
    t.sha_eq_torch,
    t.sha_checked,
    missing,
    t.boxes_eq,
    t.boxes,
    t0.elapsed().as_secs_f64()
  );
  println!("RESULT verify_gpu_eq_host {}/{}", t.gpu_eq_host, keys.len());
  println!("RESULT verify_sha_eq_torch {}/{}", t.sha_eq_torch, sums.len().max(t.sha_checked));
  println!("RESULT verify_boxes {}/{}", t.boxes_eq, t.boxes);
  Ok(t.failures.is_empty() && t.gpu_eq_host == keys.len() && t.sha_eq_torch == sums.len() && missing == 0)
}

fn read_sums(a: &Args) -> Res<HashMap<String, String>> {
  let Some(p) = a.get("sums") else { return Ok(HashMap::new()) };
  Ok(
    std::fs::read_to_string(p)
      .map_err(|e| format!("{p}: {e}"))?
      .lines()
      .filter_map(|l| {
        let mut f = l.split('\t');
        Some((f.next()?.to_owned(), f.next()?.to_owned()))
      })
      .collect(),
  )
}

/// distcp's host read against torch's checksums (no GPU needed): the reference the GPU rows stand on.
fn hostsums(a: &Args) -> Res<bool> {
  let ck = a.ckpt()?;
  let sums = read_sums(a)?;
  let keys = tensor_keys(&ck);
  let mut equal = 0;
  for k in &keys {
    let size = ck.tensor(k).map_err(|e| e.to_string())?.size.clone();
    let host = host_read(&ck, k, &Region::whole(&size))?;
    match sums.get(k) {
      Some(want) if *want == sha_hex(&host) => equal += 1,
      _ => println!("hostsums: FAIL {k}: sha256 differs from torch's (or torch has no such key)"),
    }
  }
  println!(
    "hostsums: distcp host read == torch dcp.load for {equal}/{} tensors ({} torch keys)",
    keys.len(),
    sums.len()
  );
  println!("RESULT host_sha_eq_torch {equal}/{}", sums.len());
  Ok(equal == keys.len() && keys.len() == sums.len())
}

/// A save from device memory (device → pinned staging → distcp's writer) equals a save of the host read, file for
/// file and byte for byte.
fn savecheck(a: &Args) -> Res<bool> {
  use distcp_core::write::save::{save, SaveOptions};
  use distcp_core::write::value::{SaveValue, TensorRef};
  let ck = a.ckpt()?;
  let out = std::path::PathBuf::from(a.get("out").ok_or("--out DIR is required")?);
  let mut reader = CudaReader::new(0, a.reader_options()).map_err(|e| e.to_string())?;
  let keys = tensor_keys(&ck);
  let mut from_dev = Vec::new();
  let mut from_host = Vec::new();
  let (mut bytes, mut secs) = (0u64, 0f64);
  for k in &keys {
    let t = ck.tensor(k).map_err(|e| e.to_string())?;
    let (dtype, shape) = (t.dtype(), t.size.clone());
    let whole = Region::whole(&shape);
    let buf = reader.read_alloc(&ck, k, &whole, None).map_err(|e| e.to_string())?;
    let mut host = vec![0u8; buf.len() as usize];
    let t0 = Instant::now();
    reader.download(buf.ptr(), &mut host).map_err(|e| e.to_string())?;
    secs += t0.elapsed().as_secs_f64();
    bytes += buf.len();
    from_dev.push((k.clone(), dtype, shape.clone(), host));
    from_host.push((k.clone(), dtype, shape.clone(), host_read(&ck, k, &whole)?));
  }
  let opts = SaveOptions { sync: false, ..SaveOptions::default() };
  let mut dirs = Vec::new();
  for (name, set) in [("from_device", &from_dev), ("from_host", &from_host)] {
    let items = set
      .iter()
      .map(|(k, dtype, shape, data)| {
        (
          SaveValue::Str(k.clone()),
          SaveValue::Tensor(TensorRef { dtype: *dtype, shape: shape.clone(), data }),
        )
      })
      .collect();
    let dir = out.join(name);
    let _ = std::fs::remove_dir_all(&dir);
    save(&dir, &SaveValue::Dict(items), &opts).map_err(|e| e.to_string())?;
    dirs.push(dir);
  }
  let list = |d: &std::path::Path| -> Res<Vec<String>> {
    let mut v: Vec<String> = std::fs::read_dir(d)
      .map_err(|e| e.to_string())?
      .flatten()
      .map(|e| e.file_name().to_string_lossy().into_owned())
      .collect();
    v.sort();
    Ok(v)
  };
  let (a_files, b_files) = (list(&dirs[0])?, list(&dirs[1])?);
  let mut same = a_files == b_files;
  for f in &a_files {
    let (x, y) = (std::fs::read(dirs[0].join(f)), std::fs::read(dirs[1].join(f)));
    same &= matches!((x, y), (Ok(x), Ok(y)) if x == y);
  }
  println!(
    "savecheck: {} tensors, {:.2} GB device -> pinned -> host at {:.2} GB/s; files {:?}: save from device {} host save",
    keys.len(),
    gb(bytes),
    gb(bytes) / secs.max(1e-9),
    a_files,
    if same { "==" } else { "!=" }
  );
  println!("RESULT save_device_eq_host {}", if same { "yes" } else { "NO" });
  println!("RESULT download_gbps {:.2}", gb(bytes) / secs.max(1e-9));
  Ok(same)
}

/// Keys of the all-bit-patterns tensors (torch_load.py --fp32-sums writes the same keys).
const PATTERN_KEYS: [(&str, distcp_core::DType); 2] = [
  ("__all_bf16_patterns__", distcp_core::DType::BFloat16),
  ("__all_f16_patterns__", distcp_core::DType::Float16),
];

/// Reads `key` whole to the GPU as float32, copies it back, and compares it with the host read cast by the core
/// (and with torch's sha256 of its CUDA `.to(torch.float32)` when `sums` has the key).
fn cast_one(
  reader: &mut CudaReader,
  ck: &Checkpoint,
  key: &str,
  sums: &HashMap<String, String>,
  eq_host: &mut usize,
  eq_torch: &mut usize,
) -> Res<()> {
  use distcp_core::DType;
  let t = ck.tensor(key).map_err(|e| e.to_string())?;
  let (from, whole) = (t.dtype(), Region::whole(&t.size));
  let buf = reader.read_alloc(ck, key, &whole, Some(DType::Float32)).map_err(|e| e.to_string())?;
  let mut dev = vec![0u8; buf.len() as usize];
  reader.download(buf.ptr(), &mut dev).map_err(|e| e.to_string())?;
  let stored = host_read(ck, key, &whole)?;
  let mut host = vec![0u8; stored.len() / from.size() * 4];
  distcp_core::convert::cast_parallel(&stored, from, &mut host, DType::Float32);
  if dev == host {
    *eq_host += 1;
  } else {
    // torch's own CPU and CUDA casts disagree on fp16 NaN payloads; the device path must match torch on CUDA (checked
    // below), the host path torch on the CPU. Any other difference is a failure.
    let differing: Vec<usize> =
      dev.chunks(4).zip(host.chunks(4)).enumerate().filter(|(_, (a, b))| a != b).map(|(i, _)| i).collect();
    let nan_only = from == DType::Float16
      && differing.iter().all(|&i| {
        let x = u16::from_le_bytes([stored[2 * i], stored[2 * i + 1]]);
        x & 0x7c00 == 0x7c00 && x & 0x03ff != 0
      });
    if nan_only {
      println!(
        "castcheck: {key}: {from} -> float32 on the GPU differs from the host cast on {} NaN inputs only (payload \
         handling: torch's CPU and CUDA casts differ there)",
        differing.len()
      );
    } else {
      println!(
        "castcheck: FAIL {key}: {from} -> float32 on the GPU differs from the host cast (element {})",
        differing[0]
      );
    }
  }
  match sums.get(key) {
    Some(want) if *want == sha_hex(&dev) => *eq_torch += 1,
    Some(_) => println!("castcheck: FAIL {key}: sha256 differs from torch's CUDA .to(torch.float32)"),
    None => println!("castcheck: {key}: no torch sha256"),
  }
  Ok(())
}

/// Device-side widening (bf16/fp16 → fp32) against the host cast and torch's CUDA cast.
fn castcheck(a: &Args) -> Res<bool> {
  use distcp_core::write::save::{save, SaveOptions};
  use distcp_core::write::value::{SaveValue, TensorRef};
  let ck = a.ckpt()?;
  let sums = read_sums(a)?;
  let out = std::path::PathBuf::from(a.get("out").ok_or("--out DIR is required")?).join("patterns");
  let mut reader = CudaReader::new(0, a.reader_options()).map_err(|e| e.to_string())?;
  let t0 = Instant::now();
  let keys = tensor_keys(&ck);
  let (mut eq_host, mut eq_torch) = (0, 0);
  for k in &keys {
    cast_one(&mut reader, &ck, k, &sums, &mut eq_host, &mut eq_torch)?;
  }
  // every bit pattern once, through distcp's own writer and the same GPU read
  let bits: Vec<u8> = (0..=u16::MAX).flat_map(u16::to_le_bytes).collect();
  let items = PATTERN_KEYS
    .iter()
    .map(|&(k, dtype)| {
      (SaveValue::Str(k.into()), SaveValue::Tensor(TensorRef { dtype, shape: vec![65536], data: &bits }))
    })
    .collect();
  let _ = std::fs::remove_dir_all(&out);
  save(&out, &SaveValue::Dict(items), &SaveOptions { sync: false, ..SaveOptions::default() })
    .map_err(|e| e.to_string())?;
  let pck = Checkpoint::open(&out, None).map_err(|e| e.to_string())?;
  let (mut p_host, mut p_torch) = (0, 0);
  for (k, _) in PATTERN_KEYS {
    cast_one(&mut reader, &pck, k, &sums, &mut p_host, &mut p_torch)?;
  }
  println!(
    "castcheck: {} tensors read to the GPU as float32 in {:.1} s: == host cast {eq_host}, sha256 == torch CUDA \
     .to(float32) {eq_torch}; all bit patterns (bf16, fp16): == host cast {p_host}/2, == torch {p_torch}/2",
    keys.len(),
    t0.elapsed().as_secs_f64()
  );
  println!("RESULT castcheck_eq_host {eq_host}/{}", keys.len());
  println!("RESULT castcheck_sha_eq_torch {eq_torch}/{}", keys.len());
  println!("RESULT castcheck_patterns {p_host}/2 host, {p_torch}/2 torch");
  // the contract: bit-identical to torch's `.to()` on CUDA everywhere; real tensors (no NaN payloads) also equal the
  // host cast
  Ok(eq_host == keys.len() && eq_torch == keys.len() && p_torch == 2)
}

fn main() -> ExitCode {
  let a = Args::parse();
  let r: Res<bool> = match a.cmd.as_str() {
    "info" => Ok(info()),
    "smoke" => {
      if info() {
        ceiling(1.0).map(|()| true)
      } else {
        Ok(false)
      }
    }
    "ceiling" => ceiling(a.num("gb", 8.0)).map(|()| true),
    "disk" => disk(&a).map(|()| true),
    "load" => load(&a).map(|()| true),
    "verify" => verify(&a),
    "hostsums" => hostsums(&a),
    "savecheck" => savecheck(&a),
    "castcheck" => castcheck(&a),
    other => Err(format!(
      "unknown command `{other}` (info, smoke, ceiling, disk, load, verify, hostsums, savecheck, castcheck)"
    )),
  };
  match r {
    Ok(true) => ExitCode::SUCCESS,
    Ok(false) => ExitCode::from(1),
    Err(e) => {
      println!("error: {e}");
      ExitCode::from(2)
    }
  }
}
