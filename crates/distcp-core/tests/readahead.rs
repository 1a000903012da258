//! What a read asks the kernel to read ahead: the bytes its box needs, not every chunk it touches. Linux only
//! (`posix_fadvise`, `mincore`); skipped where evicting a file from the page cache does not work (tmpfs).
#![cfg(target_os = "linux")]

use distcp_core::dtype::DType;
use distcp_core::plan::Region;
use distcp_core::write::{save, SaveOptions, SaveValue, TensorRef};
use distcp_core::Checkpoint;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::Duration;

/// Bytes of `path` in the page cache, after evicting it first when `evict`.
fn cached_bytes(path: &Path, evict: bool) -> u64 {
  let f = File::open(path).expect("open");
  if evict {
    f.sync_all().expect("fsync");
    // SAFETY: plain syscall on a descriptor we own.
    unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
  }
  // SAFETY: a read-only mapping of a file this test wrote and nobody truncates, only passed to mincore.
  let map = unsafe { memmap2::Mmap::map(&f) }.expect("map");
  // SAFETY: sysconf has no preconditions.
  let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).expect("page size");
  let mut v = vec![0u8; map.len().div_ceil(page)];
  // SAFETY: `map` is page-aligned and `map.len()` bytes long; `v` has one byte per page of it.
  let rc = unsafe { libc::mincore(map.as_ptr() as *mut libc::c_void, map.len(), v.as_mut_ptr()) };
  assert_eq!(rc, 0, "mincore: {}", std::io::Error::last_os_error());
  (v.iter().filter(|b| **b & 1 == 1).count() * page) as u64
}

#[test]
fn a_one_row_box_asks_for_its_row_not_the_whole_chunk() {
  let dir = std::env::temp_dir().join(format!("distcp-readahead-{}", std::process::id()));
  let (rows, cols) = (4096u64, 16384u64); // 64 MiB of uint8
  let data: Vec<u8> = (0..rows * cols).map(|i| (i % 251) as u8).collect();
  let tensor = TensorRef { dtype: DType::UInt8, shape: vec![rows, cols], data: &data };
  let root = SaveValue::Dict(vec![(SaveValue::Str("w".into()), SaveValue::Tensor(tensor))]);
  save(&dir, &root, &SaveOptions::default()).expect("save");
  let file = dir.join("__0_0.distcp");
  let ck = Checkpoint::open(&dir, None).expect("open");
  if cached_bytes(&file, true) > 32 << 20 {
    std::fs::remove_dir_all(&dir).ok();
    eprintln!("skipped: the file stayed cached after POSIX_FADV_DONTNEED (tmpfs?)");
    return;
  }
  let mut row = vec![0u8; cols as usize];
  ck.read_into("w", &Region { offsets: vec![100, 0], sizes: vec![1, cols] }, &mut row).expect("read");
  assert!(row.iter().enumerate().all(|(j, &b)| b == ((100 * cols + j as u64) % 251) as u8));
  std::thread::sleep(Duration::from_millis(500)); // what was asked for arrives meanwhile
  let cached = cached_bytes(&file, false);
  std::fs::remove_dir_all(&dir).ok();
  // asking for the whole chunk brought all 64 MiB in; the row and the kernel's own readahead around it are far less
  assert!(cached < 16 << 20, "{cached} bytes of the 64 MiB chunk cached after reading one 16 KiB row");
}
