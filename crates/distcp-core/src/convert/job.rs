//! Executes a [`ConvertPlan`] into a folder, all of it in one call ([`ConvertJob::write_all`], progress through
//! shared counters and abort through a flag) or one tensor at a time. Bytes that are already in their final layout
//! (a chunk covering whole rows, no cast) move with `copy_file_range` — the kernel copies, and some filesystems
//! share extents; small tensors are gathered into one buffer per run of neighbours in the output and written
//! with one `pwrite`; everything else goes through bounded row slabs (gather → optional cast → `pwrite`).

use super::cast::{cast, cast_parallel};
use super::ConvertPlan;
use crate::commit::start_writeback;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::pio::FileExt;
use crate::plan::Region;
use crate::source::Source;
use crate::Checkpoint;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};

/// Bytes of source data gathered per slab: memory stays bounded whatever the tensor size, and a slab (with its
/// cast) stays close to the core's caches between the read that fills it and the write that drains it.
const SLAB_BYTES: u64 = 4 << 20;

/// Threads that fill one tensor's slabs at once (each reads and casts its own rows); bounds the read buffers at
/// 4 slabs.
const MAX_SLAB_WORKERS: usize = 4;

/// Output slabs beyond one per filling thread that may wait for the writer thread: it always finds the next one
/// ready (also across tensors), and memory stays bounded at (fillers + this) output slabs.
const QUEUED_SLABS: usize = 3;

/// Tensors up to this size are gathered with their output neighbours into one buffer and written at once: a
/// syscall (and a write-back request) per tiny tensor would cost more than moving its bytes.
const SMALL_TENSOR_BYTES: u64 = 256 << 10;

/// Largest run of small tensors gathered before it is written.
const SMALL_BATCH_BYTES: u64 = 8 << 20;

/// Source bytes read and cast at a time within a slab: small enough to stay in a core's L2 cache between the
/// read that brings them and the cast that consumes them.
const CAST_PART_BYTES: u64 = 1 << 20;

/// How far ahead of the tensor being written [`ConvertJob::write_all`] asks the kernel to read.
const PREFETCH_AHEAD_BYTES: u64 = 64 << 20;

/// Progress of a job, updated as it writes and readable from any thread while it runs (a caller polls it at its
/// own interval instead of being called per tensor).
#[derive(Debug, Default)]
pub struct JobProgress {
  bytes: AtomicU64,
  tensors: AtomicU64,
}

impl JobProgress {
  /// Bytes of tensor data written so far.
  pub fn bytes(&self) -> u64 {
    self.bytes.load(Ordering::Relaxed)
  }

  /// Tensors written so far (plan order: the first `tensors()` of the plan are done).
  pub fn tensors(&self) -> u64 {
    self.tensors.load(Ordering::Relaxed)
  }

  fn add(&self, tensors: u64, bytes: u64) {
    self.bytes.fetch_add(bytes, Ordering::Relaxed);
    self.tensors.fetch_add(tensors, Ordering::Relaxed);
  }
}

/// Small tensors that sit next to each other in one shard, gathered for one write.
#[derive(Default)]
struct SmallBatch {
  shard: usize,
  /// Output offset of `buf[0]`.
  start: u64,
  /// The gathered bytes are `buf[..len]`; the buffer is zeroed once and kept at its size, so that gathering
  /// pays no zero-fill per tensor.
  buf: Vec<u8>,
  len: usize,
  /// Tensors in the batch, for progress once it is written.
  tensors: u64,
}

/// A conversion in progress: writes its plan (or one rank's shards of it) in one call, advancing [`JobProgress`]
/// as tensors land and checking its cancel flag between tensors and slabs.
pub struct ConvertJob {
  /// What the job writes.
  pub plan: ConvertPlan,
  dir: PathBuf,
  files: Vec<Option<Arc<File>>>,
  cancel: Arc<AtomicBool>,
  /// One (slab, output slab) pair per slab worker, kept from tensor to tensor (the output slab only where no
  /// thread can start; elsewhere output slabs circulate through `writer`).
  bufs: Vec<(Vec<u8>, OutBuf)>,
  /// Each shard opened a second time with `O_DIRECT` (None: not yet, or the filesystem refuses it): slab-path
  /// output goes to disk from the worker's buffer without a page-cache copy (see [`write_split`]).
  direct: Vec<Option<Option<Arc<File>>>>,
  /// The thread that writes filled slabs, started with the first slab (None where no thread can start).
  writer: Option<SlabWriter>,
  progress: Arc<JobProgress>,
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
      direct: (0..n).map(|_| None).collect(),
      cancel: Arc::new(AtomicBool::new(false)),
      bufs: Vec::new(),
      writer: None,
      progress: Arc::new(JobProgress::default()),
    }
  }

  /// The counters [`ConvertJob::write_all`] advances, to read from another thread while it runs.
  pub fn progress(&self) -> Arc<JobProgress> {
    self.progress.clone()
  }

  /// Writes every tensor of the plan, then [`ConvertJob::finish`]es: the whole conversion in one call. Progress
  /// goes to [`ConvertJob::progress`]; the cancel flag stops it between tensors (and between slabs of a large
  /// one) with `Error::Aborted`.
  pub fn write_all(&mut self, ck: &Checkpoint) -> Result<()> {
    let all: Vec<usize> = (0..self.plan.tensors.len()).collect();
    self.write_listed(ck, &all)?;
    self.finish()
  }

  /// Writes the tensors of `shards` (indices into the plan's shards): one rank's share of a multi-rank
  /// conversion, in one call as [`ConvertJob::write_all`]; the caller makes the files durable.
  pub fn write_shards(&mut self, ck: &Checkpoint, shards: &[usize]) -> Result<()> {
    self.check_shards(shards)?;
    let mut list: Vec<usize> =
      shards.iter().flat_map(|&s| self.plan.shards[s].tensors.iter().copied()).collect();
    // plan order: each source file is read front to back, and small tensors batch as in a whole conversion
    list.sort_unstable();
    list.dedup();
    self.write_listed(ck, &list)
  }

  fn check_shards(&self, shards: &[usize]) -> Result<()> {
    let n = self.plan.shards.len();
    match shards.iter().find(|&&s| s >= n) {
      Some(s) => Err(Error::BadRequest {
        checkpoint: self.dir.clone(),
        key: String::new(),
        reason: format!("shard {s} is not in the plan ({n} shards)"),
      }),
      None => Ok(()),
    }
  }

  /// Writes the plan's tensors `list` (ascending indices), resolving records ahead on a helper thread.
  fn write_listed(&mut self, ck: &Checkpoint, list: &[usize]) -> Result<()> {
    // (key, bytes) owned: the writer below borrows the job mutably while the helper reads these
    let tensors: Vec<(String, u64)> =
      list.iter().map(|&i| (self.plan.tensors[i].key.clone(), self.plan.tensors[i].nbytes)).collect();
    // a small tensor's records are only resolved ahead: asking the kernel to read each ahead would cost a syscall
    // per tensor, and the reads of a run of small ones are sequential (the kernel's own readahead follows them)
    let ahead = |j: usize| {
      let (key, nbytes) = &tensors[j];
      // an error here shows again, reported, when the writer reaches the tensor
      let _ = if *nbytes <= SMALL_TENSOR_BYTES { ck.resolve(key).map(drop) } else { ck.prefetch(key) };
    };
    // end[j]: bytes of the listed tensors [0, j]
    let end: Vec<u64> = tensors
      .iter()
      .scan(0u64, |acc, t| {
        *acc = acc.saturating_add(t.1);
        Some(*acc)
      })
      .collect();
    // the tensor being written (usize::MAX: done), and the next tensor whose records nobody has claimed yet
    let at = AtomicUsize::new(0);
    let next = AtomicUsize::new(0);
    let n = list.len();
    // resolving a record (its zip entry and pickle) costs more than moving a small tensor: both threads claim
    // tensors to resolve, each once, the helper up to a window ahead (starting the kernel's readahead on them)
    let claim = |j: usize| next.compare_exchange(j, j + 1, Ordering::Relaxed, Ordering::Relaxed).is_ok();
    // no helper where no thread can start: the writer resolves every record itself
    let helper = crate::threads::can_spawn();
    std::thread::scope(|s| {
      if helper {
        s.spawn(|| loop {
          let (i, j) = (at.load(Ordering::Relaxed), next.load(Ordering::Relaxed));
          if i == usize::MAX || j >= n {
            return;
          }
          let window = end[j].saturating_sub(end.get(i).copied().unwrap_or(0));
          if j > i + 1 && window > PREFETCH_AHEAD_BYTES {
            std::thread::sleep(std::time::Duration::from_millis(1));
            continue;
          }
          if claim(j) {
            ahead(j);
          }
        });
      }
      let resolve_up_to = |i: usize| loop {
        let j = next.load(Ordering::Relaxed);
        if j > i {
          return;
        }
        if claim(j) {
          ahead(j);
        }
      };
      // the helper stops when `at` says done: also if the writer unwinds (the scope waits for the helper first)
      struct Done<'a>(&'a AtomicUsize);
      impl Drop for Done<'_> {
        fn drop(&mut self) {
          self.0.store(usize::MAX, Ordering::Relaxed);
        }
      }
      let _done = Done(&at);
      self.write_in_order(ck, list, &at, &resolve_up_to)
    })
  }

  /// Writes the listed tensors in order; `at` and `resolve_up_to` count positions in `list`.
  fn write_in_order(
    &mut self,
    ck: &Checkpoint,
    list: &[usize],
    at: &AtomicUsize,
    resolve_up_to: &dyn Fn(usize),
  ) -> Result<()> {
    let mut batch = SmallBatch::default();
    for (j, &i) in list.iter().enumerate() {
      at.store(j, Ordering::Relaxed);
      resolve_up_to(j);
      self.check_cancel()?;
      let nbytes = self.plan.tensors[i].nbytes;
      if nbytes > 0 && nbytes <= SMALL_TENSOR_BYTES {
        self.add_small(ck, i, &mut batch)?;
        continue;
      }
      self.flush_small(&mut batch)?;
      let bytes = self.write_tensor_data(ck, i)?;
      let tp = &self.plan.tensors[i];
      if let Some(f) = &self.files[tp.shard] {
        start_writeback(f, tp.offset, tp.nbytes);
      }
      self.progress.add(1, bytes);
    }
    self.flush_small(&mut batch)
  }

  /// Gathers small tensor `i` into `batch` (written first if `i` does not continue it or it is full).
  fn add_small(&mut self, ck: &Checkpoint, i: usize, batch: &mut SmallBatch) -> Result<()> {
    let (shard, offset, nbytes) = {
      let tp = &self.plan.tensors[i];
      (tp.shard, tp.offset, tp.nbytes)
    };
    let continues = batch.shard == shard && batch.start + batch.len as u64 == offset;
    if batch.len > 0 && (!continues || batch.len as u64 + nbytes > SMALL_BATCH_BYTES) {
      self.flush_small(batch)?;
    }
    if batch.len == 0 {
      batch.shard = shard;
      batch.start = offset;
      batch.tensors = 0;
    }
    self.shard_file(shard)?;
    let at = batch.len;
    // nbytes ≤ SMALL_TENSOR_BYTES ≤ SMALL_BATCH_BYTES
    let end = at + nbytes as usize;
    if batch.buf.len() < end {
      // doubling up to a batch: a job with few small tensors zeroes little
      batch.buf.resize(end.max((2 * batch.buf.len()).min(SMALL_BATCH_BYTES as usize)), 0);
    }
    let mut scratch = std::mem::take(&mut self.bufs);
    scratch.resize_with(scratch.len().max(1), Default::default);
    let r = fill_small(ck, &self.plan.tensors[i], &mut batch.buf[at..end], &mut scratch[0].0);
    self.bufs = scratch;
    r?;
    batch.len = end;
    batch.tensors += 1;
    Ok(())
  }

  fn flush_small(&mut self, batch: &mut SmallBatch) -> Result<()> {
    if batch.len == 0 {
      return Ok(());
    }
    let path = self.dir.join(&self.plan.shards[batch.shard].file);
    let f = self.shard_file(batch.shard)?;
    f.write_all_at(&batch.buf[..batch.len], batch.start).map_err(|e| io_err(&path, e))?;
    start_writeback(f, batch.start, batch.len as u64);
    self.progress.add(batch.tensors, batch.len as u64);
    batch.len = 0;
    batch.tensors = 0;
    Ok(())
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
      self.files[shard] = Some(Arc::new(f));
    }
    match &self.files[shard] {
      Some(f) => Ok(f),
      None => unreachable!("opened above"),
    }
  }

  /// Writes tensor `i` of the plan; returns its bytes.
  fn write_tensor_data(&mut self, ck: &Checkpoint, i: usize) -> Result<u64> {
    self.check_cancel()?;
    let tp = self.plan.tensors[i].clone();
    let shard_path = self.dir.join(&self.plan.shards[tp.shard].file);
    self.shard_file(tp.shard)?;
    if tp.nbytes == 0 {
      return Ok(0);
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
          copy_range(file.file(), src_off, out, dst_off, len).map_err(|e| io_err(&shard_path, e))?;
        }
        return Ok(tp.nbytes);
      }
    }

    // slab path: gather whole rows (from every chunk), cast if asked, write; slabs spread over a few threads
    let row_src = row_elems * from.size() as u64;
    let rows_per_slab = SLAB_BYTES.checked_div(row_src).map_or(rows, |r| r.max(1));
    // a 0-d tensor is one slab of one element
    let slabs = if t.size.is_empty() { 1 } else { rows.div_ceil(rows_per_slab.max(1)) };
    // at least two: one casts while the other waits for its read or write; one where no thread can start
    let workers = if crate::threads::can_spawn() {
      crate::threads::cores()
        .clamp(2, MAX_SLAB_WORKERS)
        .min(usize::try_from(slabs).unwrap_or(usize::MAX))
        .max(1)
    } else {
      1
    };
    if self.direct[tp.shard].is_none() {
      self.direct[tp.shard] = Some(open_direct(&shard_path).map(Arc::new));
    }
    let direct = self.direct[tp.shard].as_ref().and_then(Option::as_ref);
    let out = match &self.files[tp.shard] {
      Some(f) => f,
      None => return Err(Error::io(&shard_path, std::io::ErrorKind::NotFound.into())),
    };
    let threaded = crate::threads::can_spawn();
    if threaded && self.writer.is_none() {
      // a thread that cannot start leaves the slabs to be written by their fillers, as where there are none
      self.writer = SlabWriter::start(MAX_SLAB_WORKERS + QUEUED_SLABS).ok();
    }
    let mut bufs = std::mem::take(&mut self.bufs);
    bufs.resize_with(bufs.len().max(workers), Default::default);
    let shard_path = Arc::new(shard_path);
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
      direct,
      shard_path: &shard_path,
      cancel: &self.cancel,
    };
    let panicked = || Error::BadRequest {
      checkpoint: ck.root.clone(),
      key: tp.key.clone(),
      reason: "a conversion thread panicked".into(),
    };
    let result = if let Some(writer) = &self.writer {
      // fillers read and cast, the writer thread writes: the disk takes one slab while the next are filled, and
      // the last slabs of this tensor are written while the next tensor's are filled
      let fill = |buf: &mut Vec<u8>, k: u64| -> Result<bool> {
        let Some(mut out_buf) = writer.take_buf() else { return Ok(false) };
        match slab.fill(k, buf, &mut out_buf) {
          Ok((lead, len, offset)) => {
            writer.push(WriteReq {
              buf: out_buf,
              lead,
              len,
              offset,
              out: out.clone(),
              direct: direct.cloned(),
              path: shard_path.clone(),
            });
            Ok(true)
          }
          Err(e) => {
            writer.give_back(out_buf);
            Err(e)
          }
        }
      };
      // Ok(false): the writer failed, and its error is reported by `check`
      run_slabs(&mut bufs[..workers], slabs, |(buf, _), k| fill(buf, k), panicked)
        .and_then(|()| writer.check())
    } else {
      run_slabs(
        &mut bufs[..workers],
        slabs,
        |(buf, out_buf), k| slab.run(k, buf, out_buf).map(|()| true),
        panicked,
      )
    };
    self.bufs = bufs;
    result?;
    Ok(tp.nbytes)
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

  /// Waits until every slab handed to the writer thread is written (a tensor counts as written once its slabs
  /// are queued), and reports the first write error. Whoever makes the shards durable calls this first:
  /// [`ConvertJob::finish`] does, and so must a caller that fsyncs shards itself (a rank's share).
  pub fn drain_writes(&mut self) -> Result<()> {
    match self.writer.take() {
      Some(writer) => writer.stop(),
      None => Ok(()),
    }
  }

  /// Makes `shards` durable once the queued slabs have landed (creating any that got no tensor: a plan of one
  /// shard may hold none), and with `index` writes the index too, when the plan has one: one rank's end of a
  /// multi-rank conversion, where each shard is one rank's ([`ConvertJob::finish`] is this for every shard).
  pub fn finish_shards(&mut self, shards: &[usize], index: bool) -> Result<()> {
    self.check_shards(shards)?;
    self.drain_writes()?;
    for &shard in shards {
      let path = self.dir.join(&self.plan.shards[shard].file);
      let f = self.shard_file(shard)?;
      f.sync_all().map_err(|e| io_err(&path, e))?;
    }
    if let (true, Some(text)) = (index, &self.plan.index_json) {
      let path = self.dir.join(super::INDEX_FILE);
      let mut f =
        OpenOptions::new().write(true).create_new(true).open(&path).map_err(|e| io_err(&path, e))?;
      f.write_all(text.as_bytes()).map_err(|e| io_err(&path, e))?;
      f.sync_all().map_err(|e| io_err(&path, e))?;
    }
    Ok(())
  }

  /// Creates shards that got no tensor, writes the index, and makes everything durable.
  pub fn finish(&mut self) -> Result<()> {
    let all: Vec<usize> = (0..self.plan.shards.len()).collect();
    self.finish_shards(&all, true)?;
    self.files.clear();
    self.direct.clear();
    self.bufs = Vec::new();
    Ok(())
  }
}

/// Fills `dst` (the tensor's output bytes) with small tensor `tp`: stored bytes read straight into place when every
/// chunk is whole rows stored plainly and nothing is cast, else the generic box read (and the cast) via `scratch`.
fn fill_small(ck: &Checkpoint, tp: &super::TensorPlan, dst: &mut [u8], scratch: &mut Vec<u8>) -> Result<()> {
  let t = ck.tensor(&tp.key)?;
  let from = t.dtype();
  let to = DType::from_name(&tp.dtype).unwrap_or(from);
  if from == to {
    let row_bytes = crate::limits::checked_numel(t.size.get(1..).unwrap_or(&[]))
      .and_then(|n| n.checked_mul(from.size() as u64))
      .unwrap_or(u64::MAX);
    let whole_rows = |c: &crate::metadata::Chunk| c.sizes.iter().zip(&t.size).skip(1).all(|(a, b)| a == b);
    if t.chunks.iter().all(whole_rows) {
      let mut plain = Vec::with_capacity(t.chunks.len());
      for (ci, c) in t.chunks.iter().enumerate() {
        if c.numel() == 0 {
          continue;
        }
        let chunk = ck.resolve_chunk(&tp.key, ci)?;
        match &chunk.source {
          Source::File { .. } if chunk.is_plain() => {
            let first_row = c.offsets.first().copied().unwrap_or(0);
            plain.push((chunk.clone(), first_row.saturating_mul(row_bytes)));
          }
          _ => break,
        }
      }
      let covered: u64 = plain.iter().map(|(c, _)| c.nbytes()).sum();
      if covered == dst.len() as u64 {
        for (chunk, at) in plain {
          if let Source::File { file, offset, .. } = &chunk.source {
            let place = usize::try_from(at)
              .ok()
              .zip(usize::try_from(chunk.nbytes()).ok())
              .and_then(|(at, len)| dst.get_mut(at..at.checked_add(len)?));
            // the chunks tile the tensor (validated at open), so every chunk has its place
            let Some(place) = place else {
              return Err(Error::BadRequest {
                checkpoint: ck.root.clone(),
                key: tp.key.clone(),
                reason: "a chunk lies outside its tensor".into(),
              });
            };
            file.read_exact_at(place, *offset).map_err(|e| e.into_error(&file.path, &tp.key))?;
          }
        }
        return Ok(());
      }
    }
    return ck.read_into(&tp.key, &Region::whole(&t.size), dst);
  }
  let src_len = dst.len() / to.size() * from.size();
  scratch.resize(src_len, 0);
  ck.read_into(&tp.key, &Region::whole(&t.size), &mut scratch[..src_len])?;
  cast(&scratch[..src_len], from, dst, to);
  Ok(())
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
  direct: Option<&'a Arc<File>>,
  shard_path: &'a Path,
  cancel: &'a AtomicBool,
}

impl SlabCopy<'_> {
  fn run(&self, k: u64, buf: &mut Vec<u8>, out_buf: &mut OutBuf) -> Result<()> {
    let (lead, len, offset) = self.fill(k, buf, out_buf)?;
    let place = out_buf.get(len).map_err(|e| io_err(self.shard_path, e))?;
    write_split(self.out, self.direct.map(|d| &**d), place, lead, offset)
      .map_err(|e| io_err(self.shard_path, e))
  }

  /// Reads (and casts) slab `k` into `out_buf`: its bytes are `out_buf[lead..len]`, to be written at `offset`.
  fn fill(&self, k: u64, buf: &mut Vec<u8>, out_buf: &mut OutBuf) -> Result<(usize, usize, u64)> {
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
    let dst_len = src_len / self.from.size() * self.to.size();
    let dst_off = self.dst_base + r0 * self.row_elems * self.to.size() as u64;
    // the output bytes sit in `out_buf` at the same offset within a page as in the file, so that the whole
    // pages among them can go to disk with O_DIRECT straight from it
    let lead = (dst_off % DIRECT_ALIGN) as usize;
    let place = out_buf.get(lead + dst_len).map_err(|e| io_err(self.shard_path, e))?;
    let dst = &mut place[lead..lead + dst_len];
    if self.from == self.to {
      self.read(&region, dst)?;
    } else if self.shape.is_empty() {
      buf.resize(src_len, 0);
      self.read(&region, &mut buf[..src_len])?;
      cast(&buf[..src_len], self.from, dst, self.to);
    } else {
      // a few rows at a time, so that what the read brings in is still in the core's cache when the cast takes it
      let row_src = self.row_elems * self.from.size() as u64;
      let rows_per_part = CAST_PART_BYTES.checked_div(row_src).map_or(n, |r| r.clamp(1, n));
      let row_dst = (self.row_elems * self.to.size() as u64) as usize;
      let mut sub = region.clone();
      let mut at = 0u64;
      while at < n {
        let m = rows_per_part.min(n - at);
        sub.offsets[0] = r0 + at;
        sub.sizes[0] = m;
        let len = (m * row_src) as usize;
        buf.resize(buf.len().max(len), 0);
        self.read(&sub, &mut buf[..len])?;
        let d0 = at as usize * row_dst;
        cast(&buf[..len], self.from, &mut dst[d0..d0 + m as usize * row_dst], self.to);
        at += m;
      }
    }
    Ok((lead, lead + dst_len, dst_off))
  }

  /// `region` (rows of the tensor) into `dst`, paced as one slab of many (the job asks for readahead per tensor).
  fn read(&self, region: &Region, dst: &mut [u8]) -> Result<()> {
    self.ck.plan_read(self.key, region)?.copy_here(dst)
  }
}

/// Runs `work(slot, k)` for every slab `k` in `0..slabs`, spread over one thread per slot of `slots` (this thread
/// alone when there is one slot): each thread takes the next slab not yet taken. `Ok(false)` stops that thread
/// (the caller reports why); an error stops the others at their next slab and is returned; a panic becomes
/// `panicked()`.
fn run_slabs<S: Send>(
  slots: &mut [S],
  slabs: u64,
  work: impl Fn(&mut S, u64) -> Result<bool> + Sync,
  panicked: impl Fn() -> Error,
) -> Result<()> {
  if let [slot] = slots {
    for k in 0..slabs {
      if !work(slot, k)? {
        break;
      }
    }
    return Ok(());
  }
  let next = AtomicU64::new(0);
  std::thread::scope(|s| {
    let handles: Vec<_> = slots
      .iter_mut()
      .map(|slot| {
        let (work, next) = (&work, &next);
        s.spawn(move || loop {
          let k = next.fetch_add(1, Ordering::Relaxed);
          if k >= slabs {
            return Ok(());
          }
          match work(slot, k) {
            Ok(true) => {}
            Ok(false) => return Ok(()),
            Err(e) => {
              // the others stop at their next slab
              next.store(slabs, Ordering::Relaxed);
              return Err(e);
            }
          }
        })
      })
      .collect();
    handles.into_iter().try_for_each(|h| h.join().unwrap_or_else(|_| Err(panicked())))
  })
}

/// A filled output slab for the writer thread: `buf[lead..len]` goes to `offset` of the shard.
struct WriteReq {
  buf: OutBuf,
  lead: usize,
  len: usize,
  offset: u64,
  out: Arc<File>,
  direct: Option<Arc<File>>,
  path: Arc<PathBuf>,
}

/// What the fillers and the writer thread share: the output slabs not in use, and the first write error.
struct WriterShared {
  free: Mutex<Vec<OutBuf>>,
  returned: Condvar,
  error: Mutex<Option<Error>>,
  failed: AtomicBool,
}

/// One thread that writes filled slabs in the order they come, while the fillers (the job's threads) read and
/// cast the next ones. `O_DIRECT` writes wait for the disk and ext4 serialises them per file (an unwritten
/// extent is converted under the inode lock), so one writer loses nothing and frees the cores for the fillers.
/// A fixed set of output slabs circulates between them, which bounds the memory and holds fillers back when the
/// disk falls behind.
struct SlabWriter {
  shared: Arc<WriterShared>,
  bufs: usize,
  queue: Option<std::sync::mpsc::Sender<WriteReq>>,
  thread: Option<std::thread::JoinHandle<()>>,
}

impl SlabWriter {
  fn start(bufs: usize) -> std::io::Result<SlabWriter> {
    let shared = Arc::new(WriterShared {
      free: Mutex::new((0..bufs).map(|_| OutBuf::default()).collect()),
      returned: Condvar::new(),
      error: Mutex::new(None),
      failed: AtomicBool::new(false),
    });
    let (queue, requests) = std::sync::mpsc::channel::<WriteReq>();
    let mine = shared.clone();
    let thread = std::thread::Builder::new().name("distcp-slab-writer".into()).spawn(move || {
      for mut req in requests {
        if !mine.failed.load(Ordering::Relaxed) {
          let written = req
            .buf
            .get(req.len)
            .and_then(|place| write_split(&req.out, req.direct.as_deref(), place, req.lead, req.offset));
          if let Err(e) = written {
            let mut error = mine.error.lock().unwrap_or_else(|p| p.into_inner());
            error.get_or_insert(io_err(&req.path, e));
            mine.failed.store(true, Ordering::Relaxed);
          }
        }
        mine.give_back(req.buf);
      }
    })?;
    Ok(SlabWriter { shared, bufs, queue: Some(queue), thread: Some(thread) })
  }

  /// A free output slab, once the writer has returned one; None when a write failed.
  fn take_buf(&self) -> Option<OutBuf> {
    let mut free = self.shared.free.lock().unwrap_or_else(|p| p.into_inner());
    loop {
      if self.shared.failed.load(Ordering::Relaxed) {
        return None;
      }
      if let Some(b) = free.pop() {
        return Some(b);
      }
      free = self.shared.returned.wait(free).unwrap_or_else(|p| p.into_inner());
    }
  }

  fn give_back(&self, buf: OutBuf) {
    self.shared.give_back(buf);
  }

  fn push(&self, req: WriteReq) {
    let unsent = match &self.queue {
      Some(q) => q.send(req).err().map(|e| e.0),
      None => Some(req),
    };
    // the writer thread is gone (it cannot panic on its own; only if it was killed): the slab is lost, say so
    if let Some(req) = unsent {
      let mut error = self.shared.error.lock().unwrap_or_else(|p| p.into_inner());
      error.get_or_insert(io_err(&req.path, std::io::Error::other("the slab writer thread stopped")));
      self.shared.failed.store(true, Ordering::Relaxed);
      self.give_back(req.buf);
    }
  }

  /// The first write error, if any (reported once; later checks report that an earlier write failed).
  fn check(&self) -> Result<()> {
    if !self.shared.failed.load(Ordering::Relaxed) {
      return Ok(());
    }
    let taken = self.shared.error.lock().unwrap_or_else(|p| p.into_inner()).take();
    Err(
      taken
        .unwrap_or_else(|| Error::Aborted { what: "the conversion (an earlier slab write failed)".into() }),
    )
  }

  /// Waits until every queued slab is on disk (or failed), ends the thread, and reports the first error.
  fn stop(mut self) -> Result<()> {
    self.queue = None;
    if let Some(t) = self.thread.take() {
      let _ = t.join();
    }
    let all_back = self.shared.free.lock().unwrap_or_else(|p| p.into_inner()).len() == self.bufs;
    if !all_back && !self.shared.failed.load(Ordering::Relaxed) {
      return Err(Error::Aborted { what: "the conversion (the slab writer thread stopped early)".into() });
    }
    self.check()
  }
}

impl WriterShared {
  fn give_back(&self, buf: OutBuf) {
    self.free.lock().unwrap_or_else(|p| p.into_inner()).push(buf);
    self.returned.notify_one();
  }
}

impl Drop for SlabWriter {
  fn drop(&mut self) {
    // closing the queue ends the thread after the slabs already queued (nothing else writes them)
    self.queue = None;
    if let Some(t) = self.thread.take() {
      let _ = t.join();
    }
  }
}

/// Writes `buf[lead..]` at `offset` (`offset % DIRECT_ALIGN == lead`, `buf` page-aligned): the whole pages with
/// `O_DIRECT` through `direct` when there is one, the partial pages at either end through the page cache with
/// `out` (neighbouring tensors or slabs write the rest of those pages; no direct write ever covers them). Direct
/// writes skip the copy into the page cache that buffered writes pay, and leave no dirty pages for the final fsync.
fn write_split(
  out: &File,
  direct: Option<&File>,
  buf: &[u8],
  lead: usize,
  offset: u64,
) -> std::io::Result<()> {
  let end = offset + (buf.len() - lead) as u64;
  let a = offset.next_multiple_of(DIRECT_ALIGN);
  let b = end - end % DIRECT_ALIGN;
  let buffered = |from: u64, to: u64| -> std::io::Result<()> {
    let (i, j) = ((from - offset) as usize + lead, (to - offset) as usize + lead);
    out.write_all_at(&buf[i..j], from)
  };
  let Some(direct) = direct.filter(|_| b > a) else { return buffered(offset, end) };
  buffered(offset, a)?;
  let mut at = a;
  while at < b {
    let i = (at - offset) as usize + lead;
    let j = (b - offset) as usize + lead;
    match direct.write_at(&buf[i..j], at) {
      Ok(0) => break,
      // whole blocks are written or none; whatever is left finishes through the page cache below
      Ok(n) => at += n as u64,
      Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
      Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => break,
      Err(e) => return Err(e),
    }
  }
  buffered(at, end)
}

/// Alignment of `O_DIRECT` writes: a page, which covers every logical block size Linux filesystems use.
const DIRECT_ALIGN: u64 = 4096;

/// A page-aligned output buffer (anonymous memory), kept by a slab worker from slab to slab. Where anonymous maps
/// are unsupported (wasm32-wasip1) it is heap memory: alignment only matters to `O_DIRECT`, which is absent there
/// (and an unaligned direct write falls back to the page cache, see `write_split`).
#[derive(Default)]
struct OutBuf(Option<OutMem>);

enum OutMem {
  Map(memmap2::MmapMut),
  Heap(Vec<u8>),
}

impl OutBuf {
  fn get(&mut self, len: usize) -> std::io::Result<&mut [u8]> {
    let have = match &self.0 {
      Some(OutMem::Map(m)) => m.len(),
      Some(OutMem::Heap(v)) => v.len(),
      None => 0,
    };
    if self.0.is_none() || have < len {
      self.0 = None;
      self.0 = Some(match crate::copy::alloc_host(len.max(1)) {
        Ok(m) => OutMem::Map(m),
        Err(e) if e.kind() == std::io::ErrorKind::Unsupported => OutMem::Heap(vec![0; len.max(1)]),
        Err(e) => return Err(e),
      });
    }
    Ok(match &mut self.0 {
      Some(OutMem::Map(m)) => &mut m[..len],
      Some(OutMem::Heap(v)) => &mut v[..len],
      None => &mut [],
    })
  }
}

/// The shard opened for `O_DIRECT` writes; None where the filesystem does not offer them (tmpfs, some FUSE).
fn open_direct(path: &Path) -> Option<File> {
  #[cfg(target_os = "linux")]
  {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new().write(true).custom_flags(libc::O_DIRECT).open(path).ok()
  }
  #[cfg(not(target_os = "linux"))]
  {
    let _ = path;
    None
  }
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

#[cfg(test)]
mod tests {
  use super::*;

  /// A rank's end of a multi-rank conversion: a shard index outside the plan is a coded error (nothing written),
  /// and a shard that got no tensor is still created, with its header, and made durable.
  #[test]
  fn finish_shards_refuses_unknown_shards_and_creates_empty_ones() {
    let dir = std::env::temp_dir().join(format!("distcp-finish-shards-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let header = crate::safetensors::encode_header(&[]).unwrap();
    let shard = crate::convert::ShardPlan {
      file: "model.safetensors".into(),
      size: header.len() as u64,
      header_len: header.len() as u64 - crate::safetensors::HEADER_LEN_BYTES,
      header: header.clone(),
      tensors: Vec::new(),
    };
    let plan = ConvertPlan {
      shards: vec![shard],
      tensors: Vec::new(),
      total_size: 0,
      index_json: None,
      entry_order: Vec::new(),
    };
    let mut job = ConvertJob::new(plan, &dir);
    let e = job.finish_shards(&[1], true).unwrap_err();
    assert_eq!(e.code(), "ERR_DISTCP_BAD_REQUEST", "{e}");
    assert!(e.to_string().contains("shard 1 is not in the plan (1 shards)"), "{e}");
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
    job.finish_shards(&[0], true).unwrap();
    assert_eq!(std::fs::read(dir.join("model.safetensors")).unwrap(), header);
    std::fs::remove_dir_all(&dir).unwrap();
  }

  /// Pieces written with `write_split` (direct whole pages, buffered edges) at unaligned offsets, interleaved with
  /// plain buffered writes of their neighbours, read back as one file equal to the bytes meant.
  #[test]
  fn split_writes_at_any_offset_land_exactly() {
    let dir = std::env::temp_dir().join(format!("distcp-split-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("shard.bin");
    let total = 3 * 1024 * 1024 + 777;
    let want: Vec<u8> = (0..total).map(|i| (i * 7 + i / 4096) as u8).collect();
    let out = OpenOptions::new().read(true).write(true).create_new(true).open(&path).unwrap();
    out.set_len(total as u64).unwrap();
    // where the filesystem refuses O_DIRECT (tmpfs) this checks the buffered fallback instead
    let direct = open_direct(&path);
    eprintln!("O_DIRECT available: {}", direct.is_some());
    // piece boundaries: inside a page, on a page, a piece within one page, pieces spanning many pages
    let cuts = [0usize, 5, 100, 4096, 4097, 8191, 70_000, 70_001, 1_000_000, 2_500_000, total - 3, total];
    let mut buf = OutBuf::default();
    for (n, w) in cuts.windows(2).enumerate() {
      let (from, to) = (w[0], w[1]);
      if n % 3 == 2 {
        // a neighbour written the ordinary way (copy_file_range / small batches do this)
        out.write_all_at(&want[from..to], from as u64).unwrap();
        continue;
      }
      let lead = from % DIRECT_ALIGN as usize;
      let place = buf.get(lead + to - from).unwrap();
      place[lead..].copy_from_slice(&want[from..to]);
      write_split(&out, direct.as_ref(), &place[..lead + to - from], lead, from as u64).unwrap();
    }
    out.sync_all().unwrap();
    drop(out);
    let got = std::fs::read(&path).unwrap();
    assert!(got == want, "the file differs from the bytes written");
    std::fs::remove_dir_all(dir).unwrap();
  }
}
