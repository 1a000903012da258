//! Executes a [`ConvertPlan`] one tensor at a time into a folder. Bytes that are already in their final layout
//! (a chunk covering whole rows, no cast) move with `copy_file_range` — the kernel copies, and some filesystems
//! share extents; everything else goes through bounded row slabs (gather → optional cast → `pwrite`).

use super::cast::{cast, cast_parallel};
use super::ConvertPlan;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::pio::FileExt;
use crate::plan::Region;
use crate::source::Source;
use crate::Checkpoint;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Bytes of source data gathered per slab: memory stays bounded whatever the tensor size, and a slab (with its
/// cast) stays close to the core's caches between the read that fills it and the write that drains it.
const SLAB_BYTES: u64 = 4 << 20;

/// Threads that move one tensor's slabs at once (each reads, casts and writes its own rows). Four keep two disks'
/// worth of reads in flight and bound the buffers at 4 × (slab + cast slab).
const MAX_SLAB_WORKERS: usize = 4;

/// What writing one tensor did, for progress reports.
#[derive(Debug, Clone, Copy, Default)]
pub struct TensorWritten {
  /// Bytes of the tensor written.
  pub bytes: u64,
  /// Bytes moved by `copy_file_range` (the rest went through memory).
  pub kernel_copied: u64,
}

/// A conversion in progress: writes its plan tensor by tensor, so the caller can report progress and stop.
pub struct ConvertJob {
  /// What the job writes.
  pub plan: ConvertPlan,
  dir: PathBuf,
  files: Vec<Option<File>>,
  cancel: Arc<AtomicBool>,
  /// One (slab, cast slab) pair per slab worker, kept from tensor to tensor.
  bufs: Vec<(Vec<u8>, Vec<u8>)>,
}

fn io_err(path: &Path, e: std::io::Error) -> Error {
  Error::io(path, e)
}

impl ConvertJob {
  /// `dir` must exist and be empty (the caller's temporary folder).
  pub fn new(plan: ConvertPlan, dir: impl Into<PathBuf>) -> ConvertJob {
    let n = plan.shards.len();
    ConvertJob {
      plan,
      dir: dir.into(),
      files: (0..n).map(|_| None).collect(),
      cancel: Arc::new(AtomicBool::new(false)),
      bufs: Vec::new(),
    }
  }

  /// Set it to stop the job at the next slab.
  pub fn cancel_flag(&self) -> Arc<AtomicBool> {
    self.cancel.clone()
  }

  fn check_cancel(&self) -> Result<()> {
    check_cancel(&self.cancel)
  }

  fn shard_file(&mut self, shard: usize) -> Result<&File> {
    if self.files[shard].is_none() {
      let s = &self.plan.shards[shard];
      let path = self.dir.join(&s.file);
      let mut f =
        OpenOptions::new().write(true).create_new(true).open(&path).map_err(|e| io_err(&path, e))?;
      f.write_all(&s.header).map_err(|e| io_err(&path, e))?;
      // reserve the whole file now: a full disk fails here, before any data moves
      f.set_len(s.size).map_err(|e| io_err(&path, e))?;
      allocate(&f, s.size).map_err(|e| io_err(&path, e))?;
      self.files[shard] = Some(f);
    }
    match &self.files[shard] {
      Some(f) => Ok(f),
      None => unreachable!("opened above"),
    }
  }

  /// Writes tensor `i` of the plan, then starts its write-back so the final fsync finds little left to do.
  pub fn write_tensor(&mut self, ck: &Checkpoint, i: usize) -> Result<TensorWritten> {
    // the disk reads the next tensor while this one is copied
    if let Some(next) = self.plan.tensors.get(i + 1) {
      ck.prefetch(&next.key)?;
    }
    let written = self.write_tensor_data(ck, i)?;
    let tp = &self.plan.tensors[i];
    if let Some(f) = &self.files[tp.shard] {
      start_writeback(f, tp.offset, tp.nbytes);
    }
    Ok(written)
  }

  fn write_tensor_data(&mut self, ck: &Checkpoint, i: usize) -> Result<TensorWritten> {
    self.check_cancel()?;
    let tp = self.plan.tensors[i].clone();
    let shard_path = self.dir.join(&self.plan.shards[tp.shard].file);
    self.shard_file(tp.shard)?;
    if tp.nbytes == 0 {
      return Ok(TensorWritten::default());
    }
    let t = ck.tensor(&tp.key)?.clone();
    let from = t.dtype();
    let to = DType::from_name(&tp.dtype).unwrap_or(from);
    // nbytes > 0, so every partial product of the (validated) shape fits
    let row_elems = crate::limits::checked_numel(t.size.get(1..).unwrap_or(&[])).unwrap_or(u64::MAX);
    let rows = t.size.first().copied().unwrap_or(1);

    // fast path: every chunk is whole rows, stored plainly, and no cast
    let whole_rows = |c: &crate::metadata::Chunk| c.sizes.iter().zip(&t.size).skip(1).all(|(a, b)| a == b);
    if from == to && t.chunks.iter().all(whole_rows) {
      let mut moved = TensorWritten::default();
      let mut all_plain = true;
      let mut sources = Vec::new();
      for (ci, c) in t.chunks.iter().enumerate() {
        if c.numel() == 0 {
          continue;
        }
        let chunk = ck.resolve_chunk(&tp.key, ci)?;
        match &chunk.source {
          Source::File { file, offset, .. } if chunk.is_plain() => {
            let first_row = c.offsets.first().copied().unwrap_or(0);
            let dst = tp.offset + first_row * row_elems * from.size() as u64;
            sources.push((file.clone(), *offset, dst, chunk.nbytes()));
          }
          _ => all_plain = false,
        }
      }
      let covered: u64 = sources.iter().map(|s| s.3).sum();
      if all_plain && covered == tp.nbytes {
        for (file, src_off, dst_off, len) in sources {
          self.check_cancel()?;
          let out = self.files[tp.shard]
            .as_ref()
            .ok_or_else(|| Error::io(&shard_path, std::io::ErrorKind::NotFound.into()))?;
          let k = copy_range(file.file(), src_off, out, dst_off, len).map_err(|e| io_err(&shard_path, e))?;
          moved.bytes += len;
          moved.kernel_copied += k;
        }
        return Ok(moved);
      }
    }

    // slab path: gather whole rows (from every chunk), cast if asked, write; slabs spread over a few threads
    let row_src = row_elems * from.size() as u64;
    let rows_per_slab = SLAB_BYTES.checked_div(row_src).map_or(rows, |r| r.max(1));
    // a 0-d tensor is one slab of one element
    let slabs = if t.size.is_empty() { 1 } else { rows.div_ceil(rows_per_slab.max(1)) };
    let workers = std::thread::available_parallelism()
      .map_or(1, |p| p.get())
      .min(MAX_SLAB_WORKERS)
      .min(usize::try_from(slabs).unwrap_or(usize::MAX))
      .max(1);
    let out = match &self.files[tp.shard] {
      Some(f) => f,
      None => return Err(Error::io(&shard_path, std::io::ErrorKind::NotFound.into())),
    };
    let mut bufs = std::mem::take(&mut self.bufs);
    bufs.resize_with(bufs.len().max(workers), Default::default);
    let slab = SlabCopy {
      ck,
      key: &tp.key,
      shape: &t.size,
      from,
      to,
      rows,
      rows_per_slab,
      row_elems,
      dst_base: tp.offset,
      out,
      shard_path: &shard_path,
      cancel: &self.cancel,
      // one worker: the cast itself may use every core
      cast_threads: workers == 1,
    };
    let result = if workers == 1 {
      let (buf, cast_buf) = &mut bufs[0];
      (0..slabs).try_for_each(|k| slab.run(k, buf, cast_buf))
    } else {
      let next = std::sync::atomic::AtomicU64::new(0);
      std::thread::scope(|s| {
        let handles: Vec<_> = bufs[..workers]
          .iter_mut()
          .map(|(buf, cast_buf)| {
            let (slab, next) = (&slab, &next);
            s.spawn(move || loop {
              let k = next.fetch_add(1, Ordering::Relaxed);
              if k >= slabs {
                return Ok(());
              }
              if let Err(e) = slab.run(k, buf, cast_buf) {
                // the others stop at their next slab
                next.store(slabs, Ordering::Relaxed);
                return Err(e);
              }
            })
          })
          .collect();
        handles.into_iter().try_for_each(|h| {
          h.join().unwrap_or_else(|_| {
            Err(Error::BadRequest {
              checkpoint: ck.root.clone(),
              key: tp.key.clone(),
              reason: "a conversion thread panicked".into(),
            })
          })
        })
      })
    };
    self.bufs = bufs;
    result?;
    Ok(TensorWritten { bytes: tp.nbytes, kernel_copied: 0 })
  }

  /// Writes the seed's artefact instead of safetensors: `pytorch_model.bin`, a `torch.save` of the `{name: tensor}`
  /// dict in state-dict order, loadable with `torch.load(weights_only=True)`. One tensor is in memory at a time.
  pub fn write_pytorch_model_bin(&mut self, ck: &Checkpoint) -> Result<u64> {
    use crate::write::record::pickle_tensor_dict;
    use crate::write::zip_writer::ArchiveWriter;
    let path = self.dir.join("pytorch_model.bin");
    let order: Vec<usize> = self.plan.entry_order.clone();
    let described: Vec<(String, DType, Vec<u64>)> = order
      .iter()
      .map(|&i| {
        let t = &self.plan.tensors[i];
        (t.name.clone(), DType::from_name(&t.dtype).unwrap_or(DType::Float32), t.shape.clone())
      })
      .collect();
    let file = OpenOptions::new().write(true).create_new(true).open(&path).map_err(|e| io_err(&path, e))?;
    // torch.save(obj, ".../pytorch_model.bin") names the archive folder after the file stem
    let mut archive = ArchiveWriter::with_name(std::io::BufWriter::new(file), "pytorch_model");
    let w = |r: std::io::Result<()>| r.map_err(|e| io_err(&path, e));
    w(archive.write_record("data.pkl", &pickle_tensor_dict(&described)))?;
    w(archive.write_record(".format_version", b"1"))?;
    w(archive.write_record(".storage_alignment", b"64"))?;
    w(archive.write_record("byteorder", b"little"))?;
    for (n, &i) in order.iter().enumerate() {
      self.check_cancel()?;
      let tp = self.plan.tensors[i].clone();
      let from = ck.dtype(&tp.key)?;
      let to = DType::from_name(&tp.dtype).unwrap_or(from);
      let raw = ck.read_tensor(&tp.key)?;
      let bytes = if from == to {
        raw
      } else {
        let mut out = vec![0u8; raw.len() / from.size() * to.size()];
        cast_parallel(&raw, from, &mut out, to);
        out
      };
      w(archive.write_record(&format!("data/{n}"), &bytes))?;
    }
    let (buf, len) = archive.finish().map_err(|e| io_err(&path, e))?;
    let file = buf.into_inner().map_err(|e| io_err(&path, e.into_error()))?;
    file.sync_all().map_err(|e| io_err(&path, e))?;
    self.files.clear();
    Ok(len)
  }

  /// Creates shards that got no tensor, writes the index, and makes everything durable.
  pub fn finish(&mut self) -> Result<()> {
    for shard in 0..self.plan.shards.len() {
      self.shard_file(shard)?;
    }
    for (shard, f) in self.files.iter().enumerate() {
      if let Some(f) = f {
        let path = self.dir.join(&self.plan.shards[shard].file);
        f.sync_all().map_err(|e| io_err(&path, e))?;
      }
    }
    if let Some(index) = &self.plan.index_json {
      let path = self.dir.join("model.safetensors.index.json");
      let mut f =
        OpenOptions::new().write(true).create_new(true).open(&path).map_err(|e| io_err(&path, e))?;
      f.write_all(index.as_bytes()).map_err(|e| io_err(&path, e))?;
      f.sync_all().map_err(|e| io_err(&path, e))?;
    }
    self.files.clear();
    self.bufs = Vec::new();
    Ok(())
  }
}

fn check_cancel(cancel: &AtomicBool) -> Result<()> {
  if cancel.load(Ordering::Relaxed) {
    return Err(Error::Aborted { what: "the conversion".into() });
  }
  Ok(())
}

/// One tensor's slab path: slab `k` is rows `[k × rows_per_slab, …)` of every column, read from all the chunks
/// that hold them, cast if asked, and written at its place in the shard. Slabs are independent (disjoint rows,
/// disjoint output bytes), so any thread may take any slab.
struct SlabCopy<'a> {
  ck: &'a Checkpoint,
  key: &'a str,
  shape: &'a [u64],
  from: DType,
  to: DType,
  rows: u64,
  rows_per_slab: u64,
  row_elems: u64,
  dst_base: u64,
  out: &'a File,
  shard_path: &'a Path,
  cancel: &'a AtomicBool,
  cast_threads: bool,
}

impl SlabCopy<'_> {
  fn run(&self, k: u64, buf: &mut Vec<u8>, cast_buf: &mut Vec<u8>) -> Result<()> {
    check_cancel(self.cancel)?;
    let r0 = k * self.rows_per_slab;
    let n = self.rows_per_slab.min(self.rows - r0);
    let region = if self.shape.is_empty() {
      Region::whole(&[])
    } else {
      let mut offsets = vec![0; self.shape.len()];
      offsets[0] = r0;
      let mut sizes = self.shape.to_vec();
      sizes[0] = n;
      Region { offsets, sizes }
    };
    // a slab of a validated tensor: its byte size fits
    let src_len = crate::limits::checked_nbytes(&region.sizes, self.from.size()).unwrap_or(0) as usize;
    buf.resize(src_len, 0);
    self.ck.read_into(self.key, &region, &mut buf[..src_len])?;
    let dst_off = self.dst_base + r0 * self.row_elems * self.to.size() as u64;
    let bytes = if self.from == self.to {
      &buf[..src_len]
    } else {
      let dst_len = src_len / self.from.size() * self.to.size();
      cast_buf.resize(dst_len, 0);
      if self.cast_threads {
        cast_parallel(&buf[..src_len], self.from, &mut cast_buf[..dst_len], self.to);
      } else {
        cast(&buf[..src_len], self.from, &mut cast_buf[..dst_len], self.to);
      }
      &cast_buf[..dst_len]
    };
    self.out.write_all_at(bytes, dst_off).map_err(|e| io_err(self.shard_path, e))
  }
}

/// Asks the kernel to begin writing `len` bytes at `offset` to disk now, without waiting (Linux only; advice).
fn start_writeback(f: &File, offset: u64, len: u64) {
  #[cfg(target_os = "linux")]
  {
    use std::os::fd::AsRawFd;
    if let (Ok(off), Ok(n)) = (libc::off64_t::try_from(offset), libc::off64_t::try_from(len)) {
      // SAFETY: plain syscall on a descriptor we own; no memory is passed. Failure only loses the head start.
      unsafe { libc::sync_file_range(f.as_raw_fd(), off, n, libc::SYNC_FILE_RANGE_WRITE) };
    }
  }
  #[cfg(not(target_os = "linux"))]
  let _ = (f, offset, len);
}

/// Reserves the file's blocks so that ENOSPC shows up before any data is copied.
#[cfg(target_os = "linux")]
fn allocate(f: &File, len: u64) -> std::io::Result<()> {
  use std::os::fd::AsRawFd;
  let Ok(len) = libc::off_t::try_from(len) else { return Ok(()) };
  if len == 0 {
    return Ok(());
  }
  // SAFETY: plain syscall on a file descriptor we own; no memory is passed.
  let rc = unsafe { libc::posix_fallocate(f.as_raw_fd(), 0, len) };
  match rc {
    0 => Ok(()),
    // filesystems without fallocate: the writes will report a full disk instead
    libc::EOPNOTSUPP | libc::EINVAL => Ok(()),
    e => Err(std::io::Error::from_raw_os_error(e)),
  }
}

#[cfg(not(target_os = "linux"))]
fn allocate(_f: &File, _len: u64) -> std::io::Result<()> {
  Ok(())
}

/// Copies `len` bytes between files at the given offsets: `copy_file_range` where the kernel offers it, else
/// `pread`/`pwrite` through a bounded buffer. Returns the bytes the kernel copied itself.
fn copy_range(src: &File, src_off: u64, dst: &File, dst_off: u64, len: u64) -> std::io::Result<u64> {
  #[cfg(target_os = "linux")]
  {
    use std::os::fd::AsRawFd;
    let mut done = 0u64;
    while done < len {
      let (Ok(mut off_in), Ok(mut off_out)) =
        (libc::loff_t::try_from(src_off + done), libc::loff_t::try_from(dst_off + done))
      else {
        break;
      };
      let want = usize::try_from(len - done).unwrap_or(usize::MAX).min(1 << 30);
      // SAFETY: both descriptors are open files we hold; the offset pointers are valid locals for the call.
      let n = unsafe {
        libc::copy_file_range(src.as_raw_fd(), &mut off_in, dst.as_raw_fd(), &mut off_out, want, 0)
      };
      if n > 0 {
        done += n as u64;
        continue;
      }
      if n == 0 {
        return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "source file ended early"));
      }
      let err = std::io::Error::last_os_error();
      match err.raw_os_error() {
        Some(libc::EXDEV | libc::ENOSYS | libc::EINVAL | libc::EOPNOTSUPP | libc::EBADF) => break,
        _ => return Err(err),
      }
    }
    if done == len {
      return Ok(len);
    }
    copy_by_buffer(src, src_off + done, dst, dst_off + done, len - done)?;
    Ok(done)
  }
  #[cfg(not(target_os = "linux"))]
  {
    copy_by_buffer(src, src_off, dst, dst_off, len)?;
    Ok(0)
  }
}

fn copy_by_buffer(src: &File, src_off: u64, dst: &File, dst_off: u64, len: u64) -> std::io::Result<()> {
  let mut buf = vec![0u8; (8u64 << 20).min(len) as usize];
  let mut done = 0u64;
  while done < len {
    let n = (len - done).min(buf.len() as u64) as usize;
    src.read_exact_at(&mut buf[..n], src_off + done)?;
    dst.write_all_at(&buf[..n], dst_off + done)?;
    done += n as u64;
  }
  Ok(())
}
