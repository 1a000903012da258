//! Peak heap memory of unpickling, measured with a counting allocator: real torch-written `.metadata` files and
//! hostile floods must stay within [`UNPICKLE_BYTES_PER_INPUT_BYTE`] bytes per byte of pickle (plus the fixed base).

use distcp_core::limits::{UNPICKLE_BASE_BYTES, UNPICKLE_BYTES_PER_INPUT_BYTE};
use distcp_core::pickle::unpickle;
use std::alloc::{GlobalAlloc, Layout, System};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
// tests in this file run one at a time so that the counters see one unpickling
static SERIAL: Mutex<()> = Mutex::new(());

// SAFETY: forwards to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
  unsafe fn alloc(&self, l: Layout) -> *mut u8 {
    let now = LIVE.fetch_add(l.size(), Ordering::Relaxed) + l.size();
    PEAK.fetch_max(now, Ordering::Relaxed);
    // SAFETY: the caller's contract is the system allocator's.
    unsafe { System.alloc(l) }
  }
  unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
    LIVE.fetch_sub(l.size(), Ordering::Relaxed);
    // SAFETY: as above.
    unsafe { System.dealloc(p, l) }
  }
  unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
    if new > l.size() {
      let now = LIVE.fetch_add(new - l.size(), Ordering::Relaxed) + new - l.size();
      PEAK.fetch_max(now, Ordering::Relaxed);
    } else {
      LIVE.fetch_sub(l.size() - new, Ordering::Relaxed);
    }
    // SAFETY: as above.
    unsafe { System.realloc(p, l, new) }
  }
}

#[global_allocator]
static A: Counting = Counting;

/// Peak heap bytes above what was live before, while `f` runs (its result dropped inside).
fn peak_of<T>(f: impl FnOnce() -> T) -> usize {
  let base = LIVE.load(Ordering::Relaxed);
  PEAK.store(base, Ordering::Relaxed);
  drop(f());
  PEAK.load(Ordering::Relaxed) - base
}

fn metadata_files() -> Vec<PathBuf> {
  let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures");
  let mut out = Vec::new();
  for version in std::fs::read_dir(&root).expect("fixtures/ exists").flatten() {
    for fixture in std::fs::read_dir(version.path()).into_iter().flatten().flatten() {
      let m = fixture.path().join("ckpt/.metadata");
      if m.is_file() {
        out.push(m);
      }
    }
  }
  // a large torch-written file when one was made (bench/lib/make_big_metadata.py; DISTCP_BIG_METADATA=path/.metadata)
  if let Ok(p) = std::env::var("DISTCP_BIG_METADATA") {
    out.push(PathBuf::from(p));
  }
  out.sort();
  out
}

#[test]
fn real_metadata_peak_memory_is_a_small_multiple_of_its_size() {
  let _g = SERIAL.lock();
  let mut worst = 0.0f64;
  for path in metadata_files() {
    let bytes = std::fs::read(&path).unwrap();
    let peak = peak_of(|| distcp_core::metadata::Metadata::parse(&bytes, &path).expect("parses"));
    let per_byte = peak as f64 / bytes.len() as f64;
    eprintln!("{}: {} bytes, peak {} ({per_byte:.1}/byte)", path.display(), bytes.len(), peak);
    assert!(
      peak <= bytes.len() * UNPICKLE_BYTES_PER_INPUT_BYTE + UNPICKLE_BASE_BYTES,
      "{}: {peak} bytes of heap for {} bytes of pickle",
      path.display(),
      bytes.len()
    );
    if bytes.len() > 64 << 10 {
      worst = worst.max(per_byte);
    }
  }
  eprintln!("worst per byte among files over 64 KiB: {worst:.1}");
}

fn flood(op: u8, n: usize) -> Vec<u8> {
  let mut bytes = vec![0x80, 2];
  bytes.extend(std::iter::repeat_n(op, n));
  bytes.push(b'.');
  bytes
}

#[test]
fn floods_stay_within_the_budget() {
  let _g = SERIAL.lock();
  let n = 8 << 20;
  // empty lists, empty dicts, empty tuples, small ints (`K\0`), one-byte strings, memo puts of one object
  let mut cases: Vec<(&str, Vec<u8>)> =
    vec![("]", flood(b']', n)), ("}", flood(b'}', n)), (")", flood(b')', n))];
  let mut ints = vec![0x80, 2];
  for _ in 0..n / 2 {
    ints.extend([b'K', 0]);
  }
  cases.push(("K0", ints));
  let mut strs = vec![0x80, 4];
  for _ in 0..n / 3 {
    strs.extend([0x8c, 1, b'a']);
  }
  cases.push(("short str", strs));
  let mut puts = vec![0x80, 4, b']'];
  puts.extend(std::iter::repeat_n(0x94, n));
  cases.push(("memoize", puts));
  // the same floods gathered into one list, so that the whole tree is materialised
  let mut list_of_lists = vec![0x80, 2, b'('];
  list_of_lists.extend(std::iter::repeat_n(b']', n));
  list_of_lists.extend([b'l', b'.']);
  cases.push(("list of empty lists", list_of_lists));
  let mut list_of_ints = vec![0x80, 2, b'('];
  for _ in 0..n / 2 {
    list_of_ints.extend([b'K', 0]);
  }
  list_of_ints.extend([b'l', b'.']);
  cases.push(("list of small ints", list_of_ints));
  for (name, bytes) in cases {
    let peak = peak_of(|| unpickle(&bytes, &|_: &str, _: &str| false));
    let per_byte = peak as f64 / bytes.len() as f64;
    eprintln!("{name} flood: peak {peak} ({per_byte:.1}/byte)");
    assert!(
      peak <= bytes.len() * UNPICKLE_BYTES_PER_INPUT_BYTE + UNPICKLE_BASE_BYTES,
      "{name}: {peak} bytes of heap for {} bytes of pickle",
      bytes.len()
    );
  }
}
