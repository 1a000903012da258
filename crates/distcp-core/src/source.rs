//! Resolved sources: where a chunk's storage bytes are, once its record (zip central directory, `data.pkl`,
//! strides, zstd) has been read. A [`ResolvedChunk`] is a plain value every executor consumes: the host copy in
//! [`crate::copy`], and the CUDA executor, which needs exactly the file handle and byte offset of the storage (or
//! the in-memory bytes), its [`StoredLayout`] and whether a [`Fixup`] must follow the copy.
//!
//! Data files are read with positional reads (`pread`), never through a mapping: a file truncated or rewritten
//! under an open checkpoint then gives a short read (a coded error) instead of SIGBUS.

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::exec::StoredLayout;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Positional reads of a byte range: a data file region, or memory.
pub trait ReadAt {
  /// Bytes addressable from offset 0.
  fn size(&self) -> u64;
  /// Fills `buf` from `offset`; an `UnexpectedEof` error when fewer bytes are there.
  fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()>;
}

impl ReadAt for [u8] {
  fn size(&self) -> u64 {
    self.len() as u64
  }

  fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
    let start = usize::try_from(offset).ok();
    match start.and_then(|s| Some(s..s.checked_add(buf.len())?)).and_then(|r| self.get(r)) {
      Some(src) => {
        buf.copy_from_slice(src);
        Ok(())
      }
      None => Err(std::io::ErrorKind::UnexpectedEof.into()),
    }
  }
}

impl ReadAt for Vec<u8> {
  fn size(&self) -> u64 {
    self.as_slice().size()
  }

  fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
    self.as_slice().read_at(offset, buf)
  }
}

/// What kind of file `meta` describes, for messages about files that are not regular.
fn file_kind(meta: &std::fs::Metadata) -> &'static str {
  let t = meta.file_type();
  if t.is_dir() {
    return "folder";
  }
  #[cfg(unix)]
  {
    use std::os::unix::fs::FileTypeExt;
    if t.is_fifo() {
      return "FIFO";
    } else if t.is_socket() {
      return "socket";
    } else if t.is_block_device() || t.is_char_device() {
      return "device";
    }
  }
  "special file"
}

/// Opens `path` for reading without ever blocking on it (a FIFO would block `open` and then every `read`
/// forever, starving the thread pool) and refuses anything that is not a regular file. Returns the file and its
/// length at open.
pub fn open_regular(path: &Path) -> Result<(File, u64)> {
  let mut options = std::fs::OpenOptions::new();
  options.read(true);
  #[cfg(unix)]
  {
    use std::os::unix::fs::OpenOptionsExt;
    options.custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC);
  }
  let file = options.open(path).map_err(|e| Error::io(path, e))?;
  let meta = file.metadata().map_err(|e| Error::io(path, e))?;
  if !meta.is_file() {
    return Err(Error::NotARegularFile { path: path.to_path_buf(), kind: file_kind(&meta) });
  }
  Ok((file, meta.len()))
}

/// Why a positional read came back incomplete.
#[derive(Debug)]
pub enum ReadFail {
  /// The file ended `got` bytes into a read of `expected` at `offset`.
  Short {
    offset: u64,
    expected: u64,
    got: u64,
  },
  Io(std::io::Error),
}

impl ReadFail {
  /// The coded error for a failed read of `path` on behalf of `key`.
  pub fn into_error(self, path: &Path, key: &str) -> Error {
    match self {
      ReadFail::Short { offset, expected, got } => {
        Error::ShortRead { path: path.to_path_buf(), key: key.to_owned(), offset, expected, got }
      }
      ReadFail::Io(e) => Error::io(path, e),
    }
  }
}

/// Bytes of one readahead request in [`DataFile::will_need`]: no larger than the smallest window the kernel
/// honours in one request (128 KiB, the default `read_ahead_kb`).
pub const WILL_NEED_STEP_BYTES: u64 = 128 << 10;

/// Buffers per `preadv` in [`DataFile::read_vectored_exact_at`]: Linux's `IOV_MAX`.
pub const MAX_IOVECS: usize = 1024;

/// The most one [`DataFile::will_need`] asks the kernel to read ahead: a head start for a copy about to follow,
/// not a way to pull gigabytes into the page cache before the first is consumed (the kernel's own sequential
/// readahead follows the copy past it).
pub const WILL_NEED_MAX_BYTES: u64 = 512 << 20;

/// A data file of an open checkpoint, opened once and shared by every read.
#[derive(Debug)]
pub struct DataFile {
  pub path: PathBuf,
  file: File,
  /// Length when opened; records are bounds-checked against it.
  len: u64,
}

impl DataFile {
  /// Opens a regular file (see [`open_regular`]).
  pub fn open(path: PathBuf) -> Result<DataFile> {
    let (file, len) = open_regular(&path)?;
    Ok(DataFile { path, file, len })
  }

  /// The open file, for executors that read it themselves (`copy_file_range`, GPU direct storage).
  pub fn file(&self) -> &File {
    &self.file
  }

  /// Length of the file when it was opened.
  pub fn len(&self) -> u64 {
    self.len
  }

  pub fn is_empty(&self) -> bool {
    self.len == 0
  }

  /// Fills `buf` from byte `offset` of the file.
  pub fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::result::Result<(), ReadFail> {
    use crate::pio::FileExt;
    let mut done = 0usize;
    while done < buf.len() {
      match self.file.read_at(&mut buf[done..], offset + done as u64) {
        Ok(0) => return Err(ReadFail::Short { offset, expected: buf.len() as u64, got: done as u64 }),
        Ok(n) => done += n,
        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
        Err(e) => return Err(ReadFail::Io(e)),
      }
    }
    Ok(())
  }

  /// Fills `bufs`, in order, from byte `offset` of the file: the file's bytes scattered into many places with one
  /// `preadv` per [`MAX_IOVECS`] buffers (one read each elsewhere).
  pub fn read_vectored_exact_at(
    &self,
    bufs: &mut [std::io::IoSliceMut<'_>],
    offset: u64,
  ) -> std::result::Result<(), ReadFail> {
    let expected: u64 = bufs.iter().map(|b| b.len() as u64).sum();
    let mut done = 0u64;
    #[cfg(unix)]
    {
      use std::os::fd::AsRawFd;
      let mut bufs = bufs;
      while !bufs.is_empty() {
        let count = libc::c_int::try_from(bufs.len().min(MAX_IOVECS)).unwrap_or(1);
        let at = offset.checked_add(done).and_then(|a| libc::off_t::try_from(a).ok());
        let Some(at) = at else {
          return Err(ReadFail::Io(std::io::Error::other(format!(
            "offset {offset} + {done} is past what preadv takes"
          ))));
        };
        // SAFETY: `IoSliceMut` is ABI-compatible with `iovec` on unix, and each of the first `count` buffers is
        // memory this call holds exclusively (`&mut`) for its whole length.
        let n = unsafe { libc::preadv(self.file.as_raw_fd(), bufs.as_ptr().cast(), count, at) };
        match n {
          0 => return Err(ReadFail::Short { offset, expected, got: done }),
          n if n < 0 => {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
              return Err(ReadFail::Io(e));
            }
          }
          n => {
            // the kernel never returns more than the buffers hold
            let n = n.unsigned_abs();
            done += n as u64;
            std::io::IoSliceMut::advance_slices(&mut bufs, n);
          }
        }
      }
    }
    #[cfg(not(unix))]
    for b in bufs.iter_mut() {
      self.read_exact_at(b, offset + done).map_err(|e| match e {
        ReadFail::Short { got, .. } => ReadFail::Short { offset, expected, got: done + got },
        e => e,
      })?;
      done += b.len() as u64;
    }
    Ok(())
  }

  /// Asks the kernel to start reading `len` bytes at `offset` now (asynchronous readahead; advice only), at
  /// most [`WILL_NEED_MAX_BYTES`] of them.
  ///
  /// Linux reads only `max(read_ahead_kb, max_sectors_kb)` of one `POSIX_FADV_WILLNEED` (often 128 KiB, 8 MiB on
  /// the VM this was measured on) and drops the rest without a word, so the range is asked for in
  /// [`WILL_NEED_STEP_BYTES`] steps: one call for 256 MiB brought 6 MiB into the page cache there, 32 calls of
  /// 8 MiB all of it. The steps cost about 5 ms per GB when the bytes are already cached.
  pub fn will_need(&self, offset: u64, len: u64) {
    #[cfg(target_os = "linux")]
    {
      use std::os::fd::AsRawFd;
      let end = offset.saturating_add(len.min(WILL_NEED_MAX_BYTES));
      let mut at = offset;
      while at < end {
        let n = (end - at).min(WILL_NEED_STEP_BYTES);
        let (Ok(off), Ok(len)) = (libc::off_t::try_from(at), libc::off_t::try_from(n)) else { return };
        // SAFETY: plain syscall on a descriptor we own; no memory is passed. An error only loses the head start.
        unsafe { libc::posix_fadvise(self.file.as_raw_fd(), off, len, libc::POSIX_FADV_WILLNEED) };
        at += n;
      }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (offset, len);
  }
}

/// A byte range of a data file, read positionally (zip structures and `data.pkl` of a record).
pub struct FileRegion<'a> {
  pub file: &'a DataFile,
  pub offset: u64,
  pub len: u64,
}

impl ReadAt for FileRegion<'_> {
  fn size(&self) -> u64 {
    self.len
  }

  fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
    let end = offset.checked_add(buf.len() as u64);
    if end.is_none_or(|e| e > self.len) {
      return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    self.file.read_exact_at(buf, self.offset + offset).map_err(|f| match f {
      ReadFail::Short { .. } => std::io::ErrorKind::UnexpectedEof.into(),
      ReadFail::Io(e) => e,
    })
  }
}

/// Where a chunk's storage bytes are.
#[derive(Debug, Clone)]
pub enum Source {
  /// `len` bytes at byte `offset` of `file`: the storage (element 0 of the storage, not of the view) as stored.
  File { file: Arc<DataFile>, offset: u64, len: u64 },
  /// The storage's bytes in memory (a zstd-compressed record, decompressed once).
  Memory(Arc<[u8]>),
}

impl Source {
  /// Bytes of storage.
  pub fn len(&self) -> u64 {
    match self {
      Source::File { len, .. } => *len,
      Source::Memory(b) => b.len() as u64,
    }
  }

  pub fn is_empty(&self) -> bool {
    self.len() == 0
  }

  /// The file this source reads, for messages (`None` for memory).
  pub fn path(&self) -> Option<&Path> {
    match self {
      Source::File { file, .. } => Some(&file.path),
      Source::Memory(_) => None,
    }
  }
}

/// What must happen to copied bytes to give the values torch would show: byte order, lazy conj/neg bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fixup {
  pub dtype: DType,
  /// Stored big-endian: reverse the bytes of each element (each half of a complex element).
  pub byteswap: bool,
  /// Lazily conjugated complex tensor: negate the imaginary parts.
  pub conj: bool,
  /// Lazily negated tensor: negate the values.
  pub neg: bool,
}

impl Fixup {
  /// `None` when the stored bytes are already what torch shows.
  pub fn new(dtype: DType, byteswap: bool, conj: bool, neg: bool) -> Option<Fixup> {
    (byteswap || conj || neg).then_some(Fixup { dtype, byteswap, conj, neg })
  }

  /// Applies the fixup in place to whole elements.
  pub fn apply(&self, bytes: &mut [u8]) {
    if self.byteswap {
      let unit = self.dtype.swap_unit();
      if unit > 1 {
        for u in bytes.chunks_exact_mut(unit) {
          u.reverse();
        }
      }
    }
    if !(self.neg || self.conj) {
      return;
    }
    let es = self.dtype.size();
    // negation flips a sign bit in floating and complex dtypes (integers are two's complement)
    let is_float = self.dtype.is_floating_point() || self.dtype.is_complex();
    for e in bytes.chunks_exact_mut(es) {
      if self.dtype.is_complex() {
        let half = es / 2;
        if self.neg {
          e[half - 1] ^= 0x80;
        }
        if self.neg != self.conj {
          e[es - 1] ^= 0x80;
        }
      } else if self.neg && is_float {
        e[es - 1] ^= 0x80;
      } else if self.neg {
        negate_int(e);
      }
    }
  }
}

fn negate_int(e: &mut [u8]) {
  // two's complement: invert and add one, little-endian
  let mut carry = true;
  for b in e.iter_mut() {
    *b = !*b;
    if carry {
      let (v, c) = b.overflowing_add(1);
      *b = v;
      carry = c;
    }
  }
}

/// One chunk of a tensor with its record resolved: everything an executor needs to copy any box of it.
/// Obtained from [`crate::Checkpoint::resolve`]; resolved once per open checkpoint and shared.
#[derive(Debug, Clone)]
pub struct ResolvedChunk {
  /// Index of the chunk in the tensor's `.metadata` chunk list (what [`crate::plan::ChunkRead::chunk`] names).
  pub index: usize,
  /// The chunk's box in global coordinates.
  pub offsets: Vec<u64>,
  pub sizes: Vec<u64>,
  pub dtype: DType,
  /// The storage bytes; [`StoredLayout`] offsets are relative to its start.
  pub source: Source,
  pub layout: StoredLayout,
  /// `Some` when copied bytes must be fixed up (byte order, lazy neg/conj) before they are torch's values.
  pub fixup: Option<Fixup>,
}

impl ResolvedChunk {
  /// Row-major from element 0 with no fixup: the storage's first `numel × element size` bytes are the chunk.
  pub fn is_plain(&self) -> bool {
    if self.fixup.is_some() || self.layout.storage_offset != 0 {
      return false;
    }
    let mut expected = 1u64;
    for (&size, &stride) in self.sizes.iter().zip(&self.layout.stride).rev() {
      if size != 1 && stride != expected {
        return false;
      }
      expected = expected.saturating_mul(size);
    }
    true
  }

  /// Bytes of the chunk (numel × element size); fits, since `.metadata` was validated.
  pub fn nbytes(&self) -> u64 {
    crate::limits::checked_nbytes(&self.sizes, self.dtype.size()).unwrap_or(u64::MAX)
  }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
  use super::*;
  use std::io::Write;
  use std::os::fd::AsRawFd;
  use std::time::{Duration, Instant};

  /// Pages of `f` (whose length is `len`) that are in the page cache.
  fn cached_pages(f: &File, len: usize) -> usize {
    // SAFETY: a read-only shared mapping of a file this test wrote and nobody truncates; it is only passed to
    // mincore, never read.
    let map = unsafe { memmap2::Mmap::map(f) }.expect("map");
    // SAFETY: sysconf has no preconditions.
    let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).expect("page size");
    let mut v = vec![0u8; len.div_ceil(page)];
    // SAFETY: `map` is `len` bytes, page-aligned; `v` has one byte per page of it.
    let rc = unsafe { libc::mincore(map.as_ptr() as *mut libc::c_void, len, v.as_mut_ptr()) };
    assert_eq!(rc, 0, "mincore: {}", std::io::Error::last_os_error());
    v.iter().filter(|b| **b & 1 == 1).count()
  }

  #[test]
  fn will_need_starts_the_whole_range_not_only_the_kernels_window_for_one_request() {
    let path = std::env::temp_dir().join(format!("distcp-will-need-{}", std::process::id()));
    let len = 64usize << 20;
    {
      let mut f = File::create(&path).expect("create");
      f.write_all(&vec![7u8; len]).expect("write");
      f.sync_all().expect("fsync");
    }
    let df = DataFile::open(path.clone()).expect("open");
    // SAFETY: plain syscall on a descriptor the DataFile owns.
    unsafe { libc::posix_fadvise(df.file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    let before = cached_pages(&df.file, len);
    // SAFETY: sysconf has no preconditions.
    let total = len / usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).expect("page size");
    if before == total {
      std::fs::remove_file(&path).ok();
      eprintln!(
        "skipped: the file stayed cached after POSIX_FADV_DONTNEED (tmpfs?), so readahead cannot show"
      );
      return;
    }
    df.will_need(0, len as u64);
    let started = Instant::now();
    let mut now = cached_pages(&df.file, len);
    while now < total && started.elapsed() < Duration::from_secs(20) {
      std::thread::sleep(Duration::from_millis(20));
      now = cached_pages(&df.file, len);
    }
    std::fs::remove_file(&path).ok();
    // one POSIX_FADV_WILLNEED for the whole range left 6 MiB of 256 cached on an 8 MiB-readahead disk
    assert_eq!(now, total, "{now} of {total} pages cached after will_need ({before} before)");
  }
}
