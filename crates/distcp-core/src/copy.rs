//! The host executor: runs the [`Copy2D`]s that [`crate::exec::lower`] makes of a [`ChunkRead`], from memory or
//! from a data file with positional reads into the destination (large rows) or through bounded scratch (small or
//! strided rows).

use crate::exec::{lower, source_extent, Copy2D, LowerError, StoredLayout};
use crate::limits::STRIDED_SCRATCH_BYTES;
use crate::plan::ChunkRead;
#[cfg(unix)]
use crate::source::MAX_IOVECS;
use crate::source::{DataFile, Fixup, ReadFail, ResolvedChunk, Source};

/// Rows at least this long are read with one `pread` each, straight into the destination; shorter ones come
/// from scratch filled by large reads.
const PREAD_MIN: u64 = 64 * 1024;

/// Scratch window for rows visited in file order: large enough that a read costs little per byte (one `pread`
/// per MiB) and re-reads little of a row cut by its end (rows this short are under [`PREAD_MIN`], ≤ 1/16 of it),
/// small enough to stay in the core's cache between the `pread` that fills it and the copies out of it. Column
/// boxes of a `Shard(1)` checkpoint (`bench/read/reshard.mjs`, 2.11 GB, warm) read in 0.42–0.46 s with 1 MiB,
/// 0.44–0.48 s with 128–256 KiB and 0.59–0.68 s with the 8 MiB this was before (session 10, AMD EPYC host).
const WINDOW: u64 = 1 << 20;

std::thread_local! {
  /// Scratch kept between copies on a thread: a slab conversion makes thousands of windowed reads, and a fresh
  /// window each time costs its page faults and zero-fill again.
  static SCRATCH: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
}

fn take_scratch() -> Vec<u8> {
  SCRATCH.with(std::cell::Cell::take)
}

/// Scratch up to this size is kept for the thread's next copy: a window, or the whole-extent scratch of a small
/// transposed chunk read slab after slab (8 MiB, the window's size before session 10, so those keep theirs too).
const KEPT_SCRATCH: u64 = 8 << 20;

/// Keeps `v` for the thread's next copy when it is no larger than [`KEPT_SCRATCH`] (whole-extent scratch for a
/// transposed chunk can be much larger; that is freed).
fn keep_scratch(v: Vec<u8>) {
  if v.capacity() as u64 <= KEPT_SCRATCH {
    SCRATCH.with(|s| s.set(v));
  }
}

/// Anonymous memory for `len` bytes that a read or a staging copy is about to fill, with every page faulted in
/// up front by the kernel in one pass (`MAP_POPULATE`). A fresh mapping takes one page fault per 4 KiB during the
/// copy, which costs more than the copy (bench/read, bench/save-load). No huge-page advice, here or on a caller's
/// buffer: fresh 2 MiB pages cost anything from nothing to seconds. Measured on the 2-core VM this was tuned on
/// (`examples/fresh_memory.rs`, 0.54 GB from the page cache, best / median of 7, `cat`-like read 0.17 / 0.27 s):
/// populated 0.57 / 0.73 s, plain 0.53 / 0.69 s, `MADV_HUGEPAGE` 1.35 / 1.46 s, `MADV_HUGEPAGE` + populated
/// 0.44 / 0.59 s (worst 1.6 s), populated on 2 threads 0.47 / 0.81 s; through `read` (1.08 GB, 8 interleaved
/// rounds) new buffers populated 0.86–2.3 s, with `MADV_HUGEPAGE` 3.4–6.0 s. The kernel there pays ~2 µs per 4 KiB
/// fault, and fresh huge pages may first be faulted in by the host (free-page reporting) or compacted
/// (`defrag=madvise`); only a mapping of the file itself beats `cat` (0.06 s), and a mapping handed to JS would
/// turn a truncated file into SIGBUS.
pub fn alloc_host(len: usize) -> std::io::Result<memmap2::MmapMut> {
  let mut o = memmap2::MmapOptions::new();
  o.len(len);
  #[cfg(target_os = "linux")]
  o.populate();
  o.map_anon()
}

/// Why a copy failed.
#[derive(Debug)]
pub enum CopyError {
  Lower(LowerError),
  Read(ReadFail),
  /// A copy would read or write outside its source or destination (the caller's checks missed it).
  Bounds(String),
  /// Scratch memory of this many bytes could not be reserved.
  Alloc(u64),
}

impl From<LowerError> for CopyError {
  fn from(e: LowerError) -> Self {
    CopyError::Lower(e)
  }
}

fn dst_row(dst: &mut [u8], at: u64, width: u64) -> Result<&mut [u8], CopyError> {
  let len = dst.len();
  let range = usize::try_from(at).ok().and_then(|a| Some(a..a.checked_add(usize::try_from(width).ok()?)?));
  match range {
    Some(r) if r.end <= len => Ok(&mut dst[r]),
    _ => {
      Err(CopyError::Bounds(format!("destination row at byte {at} (+{width}) is outside its {len} bytes")))
    }
  }
}

fn rows(c: Copy2D) -> impl Iterator<Item = (u64, u64)> {
  (0..c.height).map(move |r| (c.src + r * c.src_pitch, c.dst + r * c.dst_pitch))
}

/// Copies `read` out of `storage` (a chunk's whole storage, laid out as `layout`) into `dst`, a row-major buffer
/// of `dst_sizes`, fixing each row up as `fixup` says.
pub fn copy_chunk(
  storage: &[u8],
  layout: &StoredLayout,
  fixup: Option<&Fixup>,
  read: &ChunkRead,
  dst: &mut [u8],
  dst_sizes: &[u64],
) -> Result<(), CopyError> {
  let copies = lower(layout, read, dst_sizes)?;
  if let Some((_, end)) = source_extent(&copies) {
    if end > storage.len() as u64 {
      return Err(CopyError::Bounds(format!("reads up to byte {end} of a {}-byte storage", storage.len())));
    }
  }
  for c in copies {
    for (s, t) in rows(c) {
      let out = dst_row(dst, t, c.width)?;
      // in bounds: the extent check above covers every row
      out.copy_from_slice(&storage[s as usize..(s + c.width) as usize]);
      if let Some(f) = fixup {
        f.apply(out);
      }
    }
  }
  Ok(())
}

/// Copies `read` of a resolved chunk into `dst`, a row-major buffer of `dst_sizes`.
pub fn copy_resolved(
  chunk: &ResolvedChunk,
  read: &ChunkRead,
  dst: &mut [u8],
  dst_sizes: &[u64],
) -> Result<(), CopyError> {
  match &chunk.source {
    Source::Memory(bytes) => copy_chunk(bytes, &chunk.layout, chunk.fixup.as_ref(), read, dst, dst_sizes),
    Source::File { file, offset, len } => {
      copy_from_file(file, *offset, *len, &chunk.layout, chunk.fixup.as_ref(), read, dst, dst_sizes)
    }
  }
}

/// Asks the kernel to start reading what [`copy_resolved`] of `read` will read from `chunk`'s file: the byte
/// extent the box spans, not the whole chunk (a one-row box of a 64 MiB chunk asks for one row, and asking for
/// all of it cost 0.3 ms per box). Advice only: a read the lowering refuses is reported by the copy itself.
pub fn will_need(chunk: &ResolvedChunk, read: &ChunkRead, dst_sizes: &[u64]) {
  let Source::File { file, offset, len } = &chunk.source else { return };
  let Ok(copies) = lower(&chunk.layout, read, dst_sizes) else { return };
  if let Some((first, end)) = source_extent(&copies).filter(|&(_, end)| end <= *len) {
    file.will_need(offset.saturating_add(first), end - first);
  }
}

/// [`copy_chunk`] from storage at byte `base` of `file` (`storage_len` bytes), with positional reads.
#[allow(clippy::too_many_arguments)]
pub fn copy_from_file(
  file: &DataFile,
  base: u64,
  storage_len: u64,
  layout: &StoredLayout,
  fixup: Option<&Fixup>,
  read: &ChunkRead,
  dst: &mut [u8],
  dst_sizes: &[u64],
) -> Result<(), CopyError> {
  let copies = lower(layout, read, dst_sizes)?;
  let Some((first, end)) = source_extent(&copies) else { return Ok(()) };
  if end > storage_len {
    return Err(CopyError::Bounds(format!("reads up to byte {end} of a {storage_len}-byte storage")));
  }
  let at = |s: u64| base.checked_add(s).ok_or(CopyError::Lower(LowerError::Overflow));
  let shape = copies.shape();
  if shape.width >= PREAD_MIN {
    for c in copies {
      for (s, t) in rows(c) {
        let out = dst_row(dst, t, c.width)?;
        file.read_exact_at(out, at(s)?).map_err(CopyError::Read)?;
        if let Some(f) = fixup {
          f.apply(out);
        }
      }
    }
    return Ok(());
  }
  let ascending = copies.is_ascending();
  #[cfg(unix)]
  {
    // every byte of the source extent is copied (no gaps between rows): see `copy_rows_scattered`
    let dense = copies.copy_count().checked_mul(shape.height).and_then(|n| n.checked_mul(shape.width))
      == Some(end - first);
    if ascending && dense && copies.lands_ascending() {
      return copy_rows_scattered(file, at(first)?, copies, fixup, dst);
    }
  }
  // Small rows: read the source through scratch. Rows visited in file order need only a sliding window; others
  // (a transposed chunk) jump around, so their whole extent is read at once when it is not too large.
  let span = end - first;
  let window = if ascending { span.min(WINDOW) } else { span.min(STRIDED_SCRATCH_BYTES) };
  let cap = usize::try_from(window).map_err(|_| CopyError::Alloc(window))?;
  let mut scratch = take_scratch();
  if scratch.len() < cap {
    scratch.try_reserve_exact(cap - scratch.len()).map_err(|_| CopyError::Alloc(window))?;
    scratch.resize(cap, 0);
  }
  // the window holds storage bytes [w0, w0 + filled)
  let (mut w0, mut filled) = (0u64, 0u64);
  for c in copies {
    for (s, t) in rows(c) {
      if s < w0 || s + c.width > w0 + filled {
        // out of order, start the window as early as still covers this row, so it also covers earlier ones
        let r = if ascending { s } else { s.min(end - window).max(first) };
        let n = window.min(end - r);
        file.read_exact_at(&mut scratch[..n as usize], at(r)?).map_err(CopyError::Read)?;
        (w0, filled) = (r, n);
      }
      let out = dst_row(dst, t, c.width)?;
      let from = (s - w0) as usize;
      out.copy_from_slice(&scratch[from..from + c.width as usize]);
      if let Some(f) = fixup {
        f.apply(out);
      }
    }
  }
  keep_scratch(scratch);
  Ok(())
}

/// Small rows that fill a contiguous range of the file and land in increasing places of the destination (a
/// column-sharded chunk read whole: each of its rows is a slice of a tensor row): each `preadv` scatters up to
/// [`MAX_IOVECS`] rows straight from the page cache into place, one copy per byte, where reading a window into
/// scratch and copying each row out of it costs two (median 0.71 → 0.62 s for a `Shard(1)` checkpoint read whole,
/// `bench/read/reshard.mjs`). Rows with gaps between them stay on the window path: reading the gaps into scratch
/// as well was 5% slower than 8 MiB windows on session 9's host, and on session 10's slower than the 1 MiB windows
/// ([`WINDOW`]) that replaced them (0.50–0.53 s against 0.44–0.47 s for column boxes). `start` is the file offset
/// of the first row.
#[cfg(unix)]
fn copy_rows_scattered(
  file: &DataFile,
  start: u64,
  copies: crate::exec::Copies,
  fixup: Option<&Fixup>,
  dst: &mut [u8],
) -> Result<(), CopyError> {
  // (destination offset, width) of every row, in order; their sources follow each other from `start`
  let mut landing = copies.flat_map(|c| rows(c).map(move |(_, t)| (t, c.width))).peekable();
  // the destination not yet handed out, starting at byte `rest_at`
  let mut rest: &mut [u8] = dst;
  let mut rest_at = 0u64;
  let mut offset = start;
  while landing.peek().is_some() {
    let mut bufs: Vec<std::io::IoSliceMut<'_>> = Vec::with_capacity(MAX_IOVECS);
    let mut bytes = 0u64;
    for (t, width) in landing.by_ref().take(MAX_IOVECS) {
      let skip = t.checked_sub(rest_at).and_then(|k| usize::try_from(k).ok());
      let (skip, w) = match (skip, usize::try_from(width)) {
        (Some(k), Ok(w)) if k.checked_add(w).is_some_and(|e| e <= rest.len()) => (k, w),
        _ => {
          return Err(CopyError::Bounds(format!(
            "destination row at byte {t} (+{width}) is behind byte {rest_at} or past the end ({})",
            rest_at + rest.len() as u64
          )))
        }
      };
      let (_, tail) = std::mem::take(&mut rest).split_at_mut(skip);
      let (row, tail) = tail.split_at_mut(w);
      rest = tail;
      rest_at = t + width;
      bufs.push(std::io::IoSliceMut::new(row));
      bytes += width;
    }
    file.read_vectored_exact_at(&mut bufs, offset).map_err(CopyError::Read)?;
    if let Some(f) = fixup {
      for row in &mut bufs {
        f.apply(row);
      }
    }
    offset += bytes;
  }
  Ok(())
}

#[cfg(test)]
mod tests {
  use super::*;

  fn rec(_shape: &[u64], stride: &[u64], offset: u64, _storage_len: usize) -> StoredLayout {
    StoredLayout { stride: stride.to_vec(), storage_offset: offset, elem_size: 4 }
  }

  fn i32s(v: &[i32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
  }

  fn read_i32(b: &[u8]) -> Vec<i32> {
    b.chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
  }

  #[test]
  fn transposed_storage_reads_as_torch_shows_it() {
    // x = arange(6).reshape(2,3); y = x.t() → shape (3,2), stride (1,3), storage 0..6
    let storage = i32s(&[0, 1, 2, 3, 4, 5]);
    let r = rec(&[3, 2], &[1, 3], 0, 6);
    let read = ChunkRead { chunk: 0, src_start: vec![0, 0], dst_start: vec![0, 0], lengths: vec![3, 2] };
    let mut dst = vec![0u8; 24];
    copy_chunk(&storage[..], &r, None, &read, &mut dst, &[3, 2]).unwrap();
    assert_eq!(read_i32(&dst), vec![0, 3, 1, 4, 2, 5]);
  }

  #[test]
  fn sub_box_into_a_larger_destination() {
    // chunk 2x3 row-major copied into the right half of a 2x6 destination
    let storage = i32s(&[1, 2, 3, 4, 5, 6]);
    let r = rec(&[2, 3], &[3, 1], 0, 6);
    let read = ChunkRead { chunk: 0, src_start: vec![0, 1], dst_start: vec![0, 3], lengths: vec![2, 2] };
    let mut dst = vec![0u8; 48];
    copy_chunk(&storage[..], &r, None, &read, &mut dst, &[2, 6]).unwrap();
    assert_eq!(read_i32(&dst), vec![0, 0, 0, 2, 3, 0, 0, 0, 0, 5, 6, 0]);
  }

  #[test]
  fn storage_offset_and_zero_dim() {
    let storage = i32s(&[9, 8, 7]);
    let r = rec(&[], &[], 2, 3);
    let read = ChunkRead { chunk: 0, src_start: vec![], dst_start: vec![], lengths: vec![] };
    let mut dst = vec![0u8; 4];
    copy_chunk(&storage[..], &r, None, &read, &mut dst, &[]).unwrap();
    assert_eq!(read_i32(&dst), vec![7]);
  }

  #[test]
  fn big_endian_and_neg() {
    let storage: Vec<u8> = [5i32, -7].iter().flat_map(|x| x.to_be_bytes()).collect();
    let r = rec(&[2], &[1], 0, 2);
    let fix = Fixup::new(crate::dtype::DType::Int32, true, false, true);
    let read = ChunkRead { chunk: 0, src_start: vec![0], dst_start: vec![0], lengths: vec![2] };
    let mut dst = vec![0u8; 8];
    copy_chunk(&storage[..], &r, fix.as_ref(), &read, &mut dst, &[2]).unwrap();
    assert_eq!(read_i32(&dst), vec![-5, 7]);
  }

  /// Small rows read from a file give the same bytes as reads from memory: scattered by `preadv` where they fill
  /// the source (`copy_rows_scattered`, in batches of `MAX_IOVECS`), through windows where there are gaps between
  /// them (narrow and wide); with a fixup, and from a file shorter than its storage.
  #[test]
  fn scattered_file_reads_match_memory_reads() {
    let dir = std::env::temp_dir().join(format!("distcp-copy-scatter-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // (rows, cols of the chunk, the read, the destination's sizes)
    let cases: Vec<(u64, u64, ChunkRead, Vec<u64>)> = vec![
      // a column-sharded chunk read whole into its place in the tensor: rows contiguous in the file, 1 KiB apart
      // in the destination, 3000 rows (3 batches)
      (
        3000,
        171,
        ChunkRead { chunk: 0, src_start: vec![0, 0], dst_start: vec![0, 171], lengths: vec![3000, 171] },
        vec![3000, 513],
      ),
      // a box across the chunk's columns: a gap between every two rows
      (
        3000,
        171,
        ChunkRead { chunk: 0, src_start: vec![5, 40], dst_start: vec![0, 0], lengths: vec![2990, 100] },
        vec![2990, 100],
      ),
      // one column of 80 KB rows
      (
        40,
        20_000,
        ChunkRead { chunk: 0, src_start: vec![0, 3], dst_start: vec![0, 0], lengths: vec![40, 1] },
        vec![40, 1],
      ),
      // two columns of 16 KB rows
      (
        300,
        4_000,
        ChunkRead { chunk: 0, src_start: vec![0, 9], dst_start: vec![0, 0], lengths: vec![300, 2] },
        vec![300, 2],
      ),
    ];
    for (i, (rows, cols, read, dst_sizes)) in cases.into_iter().enumerate() {
      let storage: Vec<u8> = (0..rows * cols).flat_map(|i| (i as i32).to_be_bytes()).collect();
      let path = dir.join(format!("storage{i}.bin"));
      std::fs::write(&path, [&[7u8; 8][..], &storage].concat()).unwrap();
      let file = DataFile::open(path).unwrap();
      let layout = rec(&[rows, cols], &[cols, 1], 0, 0);
      let fix = Fixup::new(crate::dtype::DType::Int32, true, false, true);
      for fixup in [None, fix.as_ref()] {
        let n = (dst_sizes.iter().product::<u64>() * 4) as usize;
        let (mut a, mut b) = (vec![0u8; n], vec![0u8; n]);
        copy_chunk(&storage, &layout, fixup, &read, &mut a, &dst_sizes).unwrap();
        copy_from_file(&file, 8, storage.len() as u64, &layout, fixup, &read, &mut b, &dst_sizes).unwrap();
        assert!(a == b, "case {i}, fixup {}: {read:?}", fixup.is_some());
        assert!(a.iter().any(|&x| x != 0));
      }
      // the storage starts 10 rows later than the file holds it: the file ends before the last rows, a short read,
      // not a crash or a hang
      let short = copy_from_file(
        &file,
        8 + 4 * cols * 10,
        storage.len() as u64,
        &layout,
        None,
        &read,
        &mut vec![0u8; (dst_sizes.iter().product::<u64>() * 4) as usize],
        &dst_sizes,
      );
      assert!(matches!(short, Err(CopyError::Read(ReadFail::Short { .. }))), "case {i}: {short:?}");
    }
    std::fs::remove_dir_all(dir).unwrap();
  }

  /// Reads from a file (through windows and whole-extent scratch) give the same bytes as reads from memory.
  #[test]
  fn file_reads_match_memory_reads() {
    let (rows, cols) = (3000u64, 1500u64); // 18 MB: more than one window
    let storage: Vec<u8> = (0..rows * cols).flat_map(|i| (i as i32).to_le_bytes()).collect();
    let dir = std::env::temp_dir().join(format!("distcp-copy-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("storage.bin");
    // 8 bytes of something else first, so the storage starts at a non-zero file offset
    std::fs::write(&path, [&[7u8; 8][..], &storage].concat()).unwrap();
    let file = DataFile::open(path).unwrap();
    let cases = [
      // narrow columns of every row: small rows, ascending, several windows
      (
        rec(&[rows, cols], &[cols, 1], 0, 0),
        ChunkRead { chunk: 0, src_start: vec![0, 7], dst_start: vec![0, 0], lengths: vec![rows, 3] },
        vec![rows, 3],
      ),
      // transposed view (cols × rows, stride (1, cols)): rows jump around, whole extent read once
      (
        rec(&[cols, rows], &[1, cols], 0, 0),
        ChunkRead { chunk: 0, src_start: vec![1, 2], dst_start: vec![0, 0], lengths: vec![20, rows - 2] },
        vec![20, rows - 2],
      ),
      // whole rows: one large pread into the destination
      (
        rec(&[rows, cols], &[cols, 1], 0, 0),
        ChunkRead { chunk: 0, src_start: vec![10, 0], dst_start: vec![0, 0], lengths: vec![100, cols] },
        vec![100, cols],
      ),
    ];
    for (layout, read, dst_sizes) in cases {
      let n = (dst_sizes.iter().product::<u64>() * 4) as usize;
      let (mut a, mut b) = (vec![0u8; n], vec![1u8; n]);
      copy_chunk(&storage, &layout, None, &read, &mut a, &dst_sizes).unwrap();
      copy_from_file(&file, 8, storage.len() as u64, &layout, None, &read, &mut b, &dst_sizes).unwrap();
      assert!(a == b, "{read:?}");
    }
    // a storage that is shorter on disk than promised: a short read, not a crash
    let layout = rec(&[rows, cols], &[cols, 1], 0, 0);
    let read =
      ChunkRead { chunk: 0, src_start: vec![0, 0], dst_start: vec![0, 0], lengths: vec![rows, cols] };
    let mut dst = vec![0u8; storage.len()];
    let short =
      copy_from_file(&file, 16, storage.len() as u64, &layout, None, &read, &mut dst, &[rows, cols]);
    assert!(matches!(short, Err(CopyError::Read(ReadFail::Short { .. }))), "{short:?}");
    std::fs::remove_dir_all(dir).unwrap();
  }
}
