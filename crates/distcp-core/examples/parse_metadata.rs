//! Parses a `.metadata` `n` times, printing the best time of each phase (profiling aid).
//!
//! ```text
//! cargo run --release -p distcp-core --example parse_metadata -- <.metadata> [n]
//! ```
use std::time::Instant;

fn main() {
  let args: Vec<String> = std::env::args().skip(1).collect();
  let path = std::path::PathBuf::from(&args[0]);
  let n: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(10);
  let bytes = std::fs::read(&path).unwrap();
  let (mut vm, mut parse, mut free) = (f64::MAX, f64::MAX, f64::MAX);
  for _ in 0..n {
    let t = Instant::now();
    let u = distcp_core::pickle::unpickle_view(&bytes, &distcp_core::metadata::metadata_allows).unwrap();
    vm = vm.min(t.elapsed().as_secs_f64() * 1e3);
    drop(u);
    let t = Instant::now();
    let md = distcp_core::metadata::Metadata::parse(&bytes, &path).unwrap();
    parse = parse.min(t.elapsed().as_secs_f64() * 1e3);
    let t = Instant::now();
    drop(md);
    free = free.min(t.elapsed().as_secs_f64() * 1e3);
  }
  println!("best of {n}: vm {vm:.1} ms, parse (vm + typed) {parse:.1} ms, drop {free:.1} ms");
}
