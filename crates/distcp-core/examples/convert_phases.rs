//! Times the phases of a conversion in-process (no Node): open, select + plan, write (with fsync), drop; and, on
//! a second open of the checkpoint, resolving every chunk's record alone (zip directory, data.pkl, rebuilt tensor:
//! the per-tensor work a many-tensor conversion pays). For profiling per-tensor costs (bench/convert --moe).
//!
//! ```text
//! cargo run --release -p distcp-core --example convert_phases -- <checkpoint-dir> <out-dir> [dtype] [reps]
//! ```

use distcp_core::convert::{self, ConvertJob, Selection};
use distcp_core::{Checkpoint, DType};
use std::time::Instant;

fn ms(t: Instant) -> f64 {
  t.elapsed().as_secs_f64() * 1e3
}

/// CPU time (user + system) of the process so far, in ms: on a loaded machine it says more than the wall clock.
fn cpu_ms() -> f64 {
  // SAFETY: getrusage fills the struct we pass; a zeroed rusage is a valid value to start from.
  let mut u: libc::rusage = unsafe { std::mem::zeroed() };
  // SAFETY: `u` is a valid, writable rusage.
  unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
  let tv = |t: libc::timeval| t.tv_sec as f64 * 1e3 + t.tv_usec as f64 / 1e3;
  tv(u.ru_utime) + tv(u.ru_stime)
}

fn main() {
  let args: Vec<String> = std::env::args().skip(1).collect();
  let dir = &args[0];
  let out = std::path::PathBuf::from(&args[1]);
  let dtype = args.get(2).filter(|s| !s.is_empty()).and_then(|s| DType::from_name(s));
  let reps: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(3);
  for _ in 0..reps {
    let t0 = Instant::now();
    let c0 = cpu_ms();
    let ck = Checkpoint::open(dir, None).unwrap();
    let open = ms(t0);
    let t = Instant::now();
    let selected = convert::select(&ck, &Selection::default());
    let plan = convert::plan(&ck, &selected.entries, dtype, 50_000_000_000).unwrap();
    let plan_ms = ms(t);
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).unwrap();
    let c_open_plan = cpu_ms() - c0;
    let t = Instant::now();
    let c1 = cpu_ms();
    let mut job = ConvertJob::new(plan, &out);
    job.write_all(&ck).unwrap();
    let write = ms(t);
    let c_write = cpu_ms() - c1;
    let t = Instant::now();
    drop(job);
    drop(ck);
    let drop_ck = ms(t);
    let total = ms(t0);
    let ck = Checkpoint::open(dir, None).unwrap();
    let keys: Vec<String> = selected.entries.iter().map(|e| e.key.clone()).collect();
    let t = Instant::now();
    let chunks: usize = keys.iter().map(|k| ck.resolve(k).unwrap().len()).sum();
    let resolve = ms(t);
    println!(
      "open {open:.1} select+plan {plan_ms:.1} write+fsync {write:.1} drop {drop_ck:.1} | total {total:.1} ms | cpu: open+plan {c_open_plan:.1} write {c_write:.1} | resolving {chunks} chunks alone {resolve:.1} ms ({:.2} µs each)",
      resolve * 1e3 / chunks.max(1) as f64
    );
  }
}
