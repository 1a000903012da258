//! The staged read pipeline: planned chunk reads → bands that fit one staging slot → bytes into the slot (`pread`
//! for plain file chunks, the host executor for the rest) → the slot's lowered 2-D copies queued on the executor.
//! Reader threads each own one executor (two slots): while one slot's copies run, the next band is read into the
//! other. Host memory is bounded by threads × slots × slot size, whatever the checkpoint size.

use crate::cast::{choose, CastMode};
use crate::error::{CudaError, Result};
use crate::source::{chunk_source, ChunkSource};
use distcp_core::copy::copy_resolved;
use distcp_core::exec::{lower, row_major_strides, source_extent, Copy2D, StagedExecutor, StoredLayout};
use distcp_core::plan::{check_region, plan_region, ChunkRead, Region};
use distcp_core::{Checkpoint, DType, Error};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// The smallest slot the pipeline accepts: the largest element (16 bytes, complex128) must fit with room to spare.
pub const MIN_SLOT: usize = 64;

/// One box of one tensor to land at a destination address.
#[derive(Debug, Clone)]
pub struct Request {
  pub key: String,
  pub region: Region,
  /// Address of the destination's first byte (device pointer, or fake-device address).
  pub dst: u64,
  /// Bytes the destination holds; must equal the box's bytes (in the wanted dtype).
  pub dst_len: u64,
  /// The dtype to land the elements in (`None`: as stored). See [`crate::cast`] for where the cast runs.
  pub dtype: Option<DType>,
}

/// An executor that can also widen bfloat16/float16 to float32 on its device ([`CastMode::Device`]).
pub trait WidenExecutor: StagedExecutor<Error = CudaError> {
  /// Queues: the first `staged` bytes of slot `slot` (elements of `from`) to device scratch, widened there to
  /// float32, then `copies` (in float32 bytes, sources relative to the widened scratch) to `dst_base`. Like
  /// [`StagedExecutor::upload`], the slot is not lent again until its bytes have been read.
  fn upload_widened(
    &mut self,
    slot: usize,
    staged: usize,
    from: DType,
    dst_base: u64,
    copies: &[Copy2D],
  ) -> Result<()>;
}

/// What a run moved.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
  /// Bytes landed in destinations.
  pub bytes: u64,
  /// Bytes that went through staging (≥ `bytes` when a box reads past what it keeps).
  pub staged: u64,
  /// Slot fills.
  pub bands: u64,
}

struct Band {
  req: usize,
  mode: CastMode,
  src: usize,
  read: ChunkRead,
}

fn with_range(read: &ChunkRead, d: usize, start: u64, len: u64) -> ChunkRead {
  let mut r = read.clone();
  r.src_start[d] += start;
  r.dst_start[d] += start;
  r.lengths[d] = len;
  r
}

/// Splits `read` into pieces whose `measure` (bytes a slot must hold for them) is at most `cap`: along the first
/// dimension that can be split, in runs of as many indices as fit, and into the next dimension when one index
/// alone does not fit. `measure` is affine in the length of any one dimension (extent or element count).
fn split(
  read: ChunkRead,
  from_dim: usize,
  measure: &dyn Fn(&ChunkRead) -> Result<u64>,
  cap: u64,
  out: &mut Vec<ChunkRead>,
) -> Result<()> {
  if measure(&read)? <= cap {
    out.push(read);
    return Ok(());
  }
  let Some(d) = (from_dim..read.lengths.len()).find(|&d| read.lengths[d] > 1) else {
    return Err(CudaError::BadRequest(format!("one element does not fit a {cap}-byte staging slot")));
  };
  let len = read.lengths[d];
  let one = measure(&with_range(&read, d, 0, 1))?;
  if one > cap {
    for i in 0..len {
      split(with_range(&read, d, i, 1), d + 1, measure, cap, out)?;
    }
    return Ok(());
  }
  let step = measure(&with_range(&read, d, 0, 2))?.saturating_sub(one);
  let k = (cap - one).checked_div(step).map_or(len, |n| (n + 1).clamp(1, len));
  let mut start = 0;
  while start < len {
    let n = k.min(len - start);
    out.push(with_range(&read, d, start, n));
    start += n;
  }
  Ok(())
}

fn lower_err(ck: &Checkpoint, key: &str, e: distcp_core::exec::LowerError) -> CudaError {
  CudaError::Core(Error::BadRequest {
    checkpoint: ck.root.clone(),
    key: key.to_owned(),
    reason: e.to_string(),
  })
}

/// Checks every request and cuts it into bands of at most `slot_len` staged bytes.
fn plan(ck: &Checkpoint, reqs: &[Request], slot_len: u64) -> Result<(Vec<ChunkSource>, Vec<Band>)> {
  let mut sources = Vec::new();
  let mut bands = Vec::new();
  for (ri, req) in reqs.iter().enumerate() {
    let key = req.key.as_str();
    let bad = |reason: String| Error::BadRequest { checkpoint: ck.root.clone(), key: key.to_owned(), reason };
    let t = ck.tensor(key)?;
    check_region(&t.size, &req.region).map_err(bad)?;
    let es = t.dtype().size() as u64;
    let wanted = req.dtype.unwrap_or(t.dtype());
    let mode = choose(t.dtype(), wanted).map_err(|e| bad(e.to_string()))?;
    let es_out = wanted.size() as u64;
    // a band's stored bytes, once cast on the host, must still fit the slot
    let cap = match mode {
      CastMode::Host { .. } if es_out > es => slot_len / es_out * es,
      _ => slot_len,
    };
    let numel = req.region.numel().ok_or_else(|| bad("the box's element count overflows".into()))?;
    let want = numel.checked_mul(es_out);
    if want != Some(req.dst_len) {
      return Err(
        bad(format!(
          "the destination holds {} bytes, the {} box {:?} needs {}",
          req.dst_len,
          wanted,
          req.region.sizes,
          numel.saturating_mul(es_out)
        ))
        .into(),
      );
    }
    let reads = plan_region(t, &req.region);
    let covered: u64 = reads.iter().map(ChunkRead::numel).sum();
    if covered != numel {
      return Err(
        Error::Metadata {
          path: ck.metadata_path.clone(),
          reason: format!("key `{key}`: the stored chunks cover {covered} of the {numel} requested elements"),
        }
        .into(),
      );
    }
    for read in reads {
      let src = sources.len();
      sources.push(chunk_source(ck, key, read.chunk)?);
      let mut pieces = Vec::new();
      match &sources[src] {
        ChunkSource::File { layout, .. } => {
          let measure = |r: &ChunkRead| -> Result<u64> {
            let c = lower(layout, r, &req.region.sizes).map_err(|e| lower_err(ck, key, e))?;
            Ok(source_extent(&c).map_or(0, |(a, b)| b - a))
          };
          split(read, 0, &measure, cap, &mut pieces)?;
        }
        ChunkSource::Host { .. } => {
          let measure = |r: &ChunkRead| -> Result<u64> {
            r.numel().checked_mul(es).ok_or_else(|| bad("the box's byte size overflows".into()).into())
          };
          split(read, 0, &measure, cap, &mut pieces)?;
        }
      }
      bands.extend(pieces.into_iter().map(|read| Band { req: ri, mode, src, read }));
    }
  }
  Ok((sources, bands))
}

struct Shared<'a> {
  ck: &'a Checkpoint,
  reqs: &'a [Request],
  sources: &'a [ChunkSource],
  bands: &'a [Band],
  next: AtomicUsize,
  stop: AtomicBool,
}

/// Fills `buf` with one band's stored bytes and returns the band's copies (sources relative to `buf`, sizes in
/// stored bytes).
fn stage(sh: &Shared<'_>, buf: &mut [u8], band: &Band, copies: &mut Vec<Copy2D>) -> Result<u64> {
  let req = &sh.reqs[band.req];
  let key = req.key.as_str();
  match &sh.sources[band.src] {
    ChunkSource::File { file, base, storage_len, layout } => {
      let c = lower(layout, &band.read, &req.region.sizes).map_err(|e| lower_err(sh.ck, key, e))?;
      let Some((first, end)) = source_extent(&c) else {
        return Ok(0);
      };
      if end > *storage_len {
        return Err(
          Error::Record {
            path: file.path.clone(),
            key: key.to_owned(),
            reason: format!("the chunk's view reaches byte {end} of a {storage_len}-byte storage"),
          }
          .into(),
        );
      }
      copies.extend(c.map(|mut x| {
        x.src -= first;
        x
      }));
      let n = (end - first) as usize;
      let buf =
        buf.get_mut(..n).ok_or_else(|| CudaError::Panic(format!("band of {n} bytes over the slot")))?;
      // the core's positional read: a file truncated under an open checkpoint is a coded error, never SIGBUS
      file.read_exact_at(buf, base + first).map_err(|e| e.into_error(&file.path, key))?;
      Ok(n as u64)
    }
    ChunkSource::Host { chunk } => {
      let es = chunk.dtype.size() as u64;
      let lengths = &band.read.lengths;
      let n = (band.read.numel() * es) as usize;
      let zeros = vec![0u64; lengths.len()];
      let local = ChunkRead {
        chunk: band.read.chunk,
        src_start: band.read.src_start.clone(),
        dst_start: zeros.clone(),
        lengths: lengths.clone(),
      };
      let buf =
        buf.get_mut(..n).ok_or_else(|| CudaError::Panic(format!("band of {n} bytes over the slot")))?;
      copy_resolved(chunk, &local, buf, lengths).map_err(|e| sh.ck.copy_error(chunk, key, e))?;
      let strides = row_major_strides(lengths)
        .ok_or_else(|| lower_err(sh.ck, key, distcp_core::exec::LowerError::Overflow))?;
      let layout = StoredLayout { stride: strides, storage_offset: 0, elem_size: es };
      let placed = ChunkRead {
        chunk: band.read.chunk,
        src_start: zeros,
        dst_start: band.read.dst_start.clone(),
        lengths: lengths.clone(),
      };
      copies.extend(lower(&layout, &placed, &req.region.sizes).map_err(|e| lower_err(sh.ck, key, e))?);
      Ok(n as u64)
    }
  }
}

/// A copy in stored bytes re-expressed in bytes of an element `to` bytes wide (every offset, pitch and width of a
/// lowered copy is a whole number of elements).
fn rescale(c: &Copy2D, from: u64, to: u64) -> Result<Copy2D> {
  let f = |x: u64| {
    if !x.is_multiple_of(from) {
      return Err(CudaError::Panic(format!("a copy field of {x} bytes is not whole {from}-byte elements")));
    }
    (x / from).checked_mul(to).ok_or_else(|| CudaError::Panic("a cast copy overflows".into()))
  };
  let width = f(c.width)?;
  // a single row's pitches are never used to step: keep them valid without requiring whole elements
  let pitch = |x: u64| if c.height <= 1 { Ok(width) } else { f(x) };
  Ok(Copy2D {
    src: f(c.src)?,
    src_pitch: pitch(c.src_pitch)?,
    dst: f(c.dst)?,
    dst_pitch: pitch(c.dst_pitch)?,
    width,
    height: c.height,
  })
}

fn work<E: WidenExecutor>(sh: &Shared<'_>, ex: &mut E) -> Result<Stats> {
  let mut stats = Stats::default();
  let mut copies = Vec::new();
  // host casts read the stored bytes here, then cast them into the slot (allocated on the first such band)
  let mut scratch: Vec<u8> = Vec::new();
  let mut k = 0usize;
  while !sh.stop.load(Ordering::Relaxed) {
    let i = sh.next.fetch_add(1, Ordering::Relaxed);
    let Some(band) = sh.bands.get(i) else { break };
    let slot = k % ex.slot_count();
    k += 1;
    copies.clear();
    let staged = match band.mode {
      CastMode::Host { from, to } => {
        if scratch.is_empty() {
          scratch = vec![0u8; ex.slot_len()];
        }
        let n = stage(sh, &mut scratch, band, &mut copies)? as usize;
        let (ef, et) = (from.size(), to.size());
        let m = n / ef * et;
        let buf = ex.slot(slot)?;
        let out = buf
          .get_mut(..m)
          .ok_or_else(|| CudaError::Panic(format!("cast band of {m} bytes over the slot")))?;
        distcp_core::convert::cast(&scratch[..n / ef * ef], from, out, to);
        for c in copies.iter_mut() {
          *c = rescale(c, ef as u64, et as u64)?;
        }
        n as u64
      }
      CastMode::Device { from } => {
        let buf = ex.slot(slot)?;
        let n = stage(sh, buf, band, &mut copies)?;
        for c in copies.iter_mut() {
          *c = rescale(c, from.size() as u64, 4)?;
        }
        n
      }
      CastMode::None => {
        let buf = ex.slot(slot)?;
        stage(sh, buf, band, &mut copies)?
      }
    };
    let req = &sh.reqs[band.req];
    for c in &copies {
      if c.dst_end() > req.dst_len {
        return Err(CudaError::Panic(format!(
          "a copy ends at byte {} of a {}-byte destination",
          c.dst_end(),
          req.dst_len
        )));
      }
      stats.bytes += c.bytes();
    }
    match band.mode {
      CastMode::Device { from } => ex.upload_widened(slot, staged as usize, from, req.dst, &copies)?,
      _ => ex.upload(slot, req.dst, &copies)?,
    }
    stats.staged += staged;
    stats.bands += 1;
  }
  Ok(stats)
}

/// Runs `reqs` on the executors (one reader thread each) and waits until every byte has landed, also when a read
/// fails (no copy is left in flight into a destination the caller may free).
pub fn run<E>(execs: &mut [E], ck: &Checkpoint, reqs: &[Request]) -> Result<Stats>
where
  E: WidenExecutor + Send,
{
  let Some(first) = execs.first() else {
    return Err(CudaError::BadRequest("no reader threads".into()));
  };
  let slot_len = first.slot_len();
  if slot_len < MIN_SLOT {
    return Err(CudaError::BadRequest(format!("staging slots of {slot_len} bytes are under {MIN_SLOT}")));
  }
  let (sources, bands) = plan(ck, reqs, slot_len as u64)?;
  let sh = Shared {
    ck,
    reqs,
    sources: &sources,
    bands: &bands,
    next: AtomicUsize::new(0),
    stop: AtomicBool::new(false),
  };
  let threads = execs.len().min(bands.len());
  let results: Vec<Result<Stats>> = std::thread::scope(|s| {
    let handles: Vec<_> = execs[..threads]
      .iter_mut()
      .map(|ex| {
        let sh = &sh;
        s.spawn(move || {
          let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| work(sh, ex)))
            .unwrap_or_else(|p| Err(CudaError::Panic(crate::driver::panic_message(&*p))));
          if r.is_err() {
            sh.stop.store(true, Ordering::Relaxed);
          }
          let done = ex.finish();
          r.and_then(|s| done.map(|()| s))
        })
      })
      .collect();
    handles
      .into_iter()
      .map(|h| h.join().unwrap_or_else(|_| Err(CudaError::Panic("a reader thread".into()))))
      .collect()
  });
  let mut total = Stats::default();
  for r in results {
    let s = r?;
    total.bytes += s.bytes;
    total.staged += s.staged;
    total.bands += s.bands;
  }
  Ok(total)
}
