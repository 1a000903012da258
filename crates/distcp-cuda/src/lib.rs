//! distcp-cuda: DCP checkpoint reads straight into CUDA device memory.
//!
//! Disk → pinned staging (`pread`, or the host read for chunks that need fixups) → device (`cuMemcpy2DAsync`),
//! overlapped by reader threads that each double-buffer two staging slots on their own stream. The chunk plan and
//! the 2-D copies are the core's ([`distcp_core::plan`], [`distcp_core::exec`]); this crate only executes them.
//! `libcuda` is loaded at run time: the crate builds and runs without CUDA, and then reports
//! [`CudaError::NoCuda`] with a reason. No panic leaves this crate (see [`driver::guard`]).
#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::all)]

pub mod cast;
pub mod cuda_exec;
pub mod driver;
pub mod error;
pub mod fake;
pub mod pinned;
pub mod pipeline;
pub mod source;

pub use driver::{cuda_info, inject_panic_for_test, CudaInfo, Device, DeviceBuffer, DeviceInfo};
pub use error::{CudaError, Result};
pub use pipeline::{Request, Stats};

use cuda_exec::CudaExecutor;
use distcp_core::plan::Region;
use distcp_core::{Checkpoint, DType};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// Reader threads and staging per reader.
#[derive(Debug, Clone, Copy)]
pub struct ReaderOptions {
  /// Reader threads (each with one stream and two staging slots).
  pub threads: usize,
  /// Bytes per staging slot.
  pub slot_len: usize,
}

/// Staging slot size: large enough that a `pread` and a copy each cost far more than their call overhead, small
/// enough that threads × 2 slots stays a modest amount of pinned memory (256 MiB for 8 threads).
pub const DEFAULT_SLOT: usize = 16 << 20;

impl Default for ReaderOptions {
  fn default() -> Self {
    let cores = distcp_core::threads::cores();
    ReaderOptions { threads: cores.clamp(1, 8), slot_len: DEFAULT_SLOT }
  }
}

/// Reader threads' executors for one device, kept between reads (pinned memory is slow to allocate).
pub struct CudaReader {
  dev: Arc<Device>,
  execs: Vec<CudaExecutor>,
}

impl CudaReader {
  /// A reader for `cuda:index`, or [`CudaError::NoCuda`] saying why there is none.
  pub fn new(index: usize, opts: ReaderOptions) -> Result<CudaReader> {
    driver::guard(|| {
      let dev = Device::open(index)?;
      let execs = (0..opts.threads.max(1))
        .map(|_| CudaExecutor::new(&dev, opts.slot_len.max(pipeline::MIN_SLOT)))
        .collect::<Result<Vec<_>>>()?;
      Ok(CudaReader { dev, execs })
    })
  }

  pub fn device(&self) -> &Arc<Device> {
    &self.dev
  }

  /// Reads every request into device memory (addresses on this reader's device); returns when all bytes landed.
  pub fn read(&mut self, ck: &Checkpoint, reqs: &[Request]) -> Result<Stats> {
    let execs = &mut self.execs;
    driver::guard(|| pipeline::run(execs, ck, reqs))
  }

  /// Reads the box `region` of `key` into new device memory, as `dtype` (`None`: as stored).
  pub fn read_alloc(
    &mut self,
    ck: &Checkpoint,
    key: &str,
    region: &Region,
    dtype: Option<DType>,
  ) -> Result<DeviceBuffer> {
    let bytes = box_bytes(ck, key, region, dtype)?;
    let buf = DeviceBuffer::alloc(&self.dev, bytes)?;
    self.read(
      ck,
      &[Request { key: key.to_owned(), region: region.clone(), dst: buf.ptr(), dst_len: bytes, dtype }],
    )?;
    Ok(buf)
  }
}

impl CudaReader {
  /// Copies device bytes `src .. src + out.len()` (memory on this reader's device) into `out` through pinned
  /// staging, the reader threads each taking one contiguous part.
  pub fn download(&mut self, src: u64, out: &mut [u8]) -> Result<()> {
    let execs = &mut self.execs;
    driver::guard(|| {
      let per = out.len().div_ceil(execs.len()).max(pipeline::MIN_SLOT);
      std::thread::scope(|s| {
        let handles: Vec<_> = out
          .chunks_mut(per)
          .zip(execs.iter_mut())
          .enumerate()
          .map(|(i, (part, ex))| s.spawn(move || driver::guard(|| ex.download(src + (i * per) as u64, part))))
          .collect();
        handles
          .into_iter()
          .try_for_each(|h| h.join().unwrap_or_else(|_| Err(CudaError::Panic("a download thread".into()))))
      })
    })
  }
}

/// Copies `out.len()` bytes of device memory at `src` on `cuda:index` into `out`, through pinned staging.
pub fn download(index: usize, src: u64, out: &mut [u8]) -> Result<()> {
  driver::guard(|| with_reader(index, |r| r.download(src, out)))
}

/// [`download`] from a caller's pointer: first checks that `src .. src + out.len()` is one allocation on the device.
/// Into registered host memory ([`pinned::HostRegistration`], a save's staging blocks) the bytes go in one DMA
/// transfer; elsewhere through the reader's pinned slots.
pub fn download_checked(index: usize, src: u64, out: &mut [u8]) -> Result<()> {
  driver::guard(|| {
    let dev = Device::open(index)?;
    driver::check_device_range(&dev, src, out.len() as u64)?;
    if !out.is_empty() && pinned::is_registered(out.as_ptr(), out.len()) {
      return driver::copy_to_host(&dev, src, out);
    }
    with_reader(index, |r| r.download(src, out))
  })
}

/// Bytes of the box `region` of tensor `key`, after checking that the box lies inside the tensor (so a bad request
/// is reported as such before any device work).
pub fn region_bytes(ck: &Checkpoint, key: &str, region: &Region) -> Result<u64> {
  box_bytes(ck, key, region, None)
}

/// [`region_bytes`] in elements of `dtype` (`None`: the stored dtype), after checking that the cast exists.
pub fn box_bytes(ck: &Checkpoint, key: &str, region: &Region, dtype: Option<DType>) -> Result<u64> {
  let t = ck.tensor(key)?;
  let es = match dtype {
    Some(want) => {
      cast::choose(t.dtype(), want).map_err(|e| {
        CudaError::Core(distcp_core::Error::BadRequest {
          checkpoint: ck.root.clone(),
          key: key.to_owned(),
          reason: e.to_string(),
        })
      })?;
      want.size()
    }
    None => t.dtype().size(),
  };
  distcp_core::plan::check_region(&t.size, region).map_err(|reason| {
    CudaError::Core(distcp_core::Error::BadRequest {
      checkpoint: ck.root.clone(),
      key: key.to_owned(),
      reason,
    })
  })?;
  region.numel().and_then(|n| n.checked_mul(es as u64)).ok_or_else(|| {
    CudaError::Core(distcp_core::Error::BadRequest {
      checkpoint: ck.root.clone(),
      key: key.to_owned(),
      reason: "the box's byte size overflows".into(),
    })
  })
}

/// Runs `f` with a reader for `cuda:index` from a process-wide pool (created on first use), so that the pinned
/// staging is allocated once, not per read. Concurrent callers get separate readers.
pub fn with_reader<T>(index: usize, f: impl FnOnce(&mut CudaReader) -> Result<T>) -> Result<T> {
  const KEEP: usize = 2;
  static POOL: OnceLock<Mutex<HashMap<usize, Vec<CudaReader>>>> = OnceLock::new();
  let pool = POOL.get_or_init(Default::default);
  let taken = pool.lock().unwrap_or_else(|p| p.into_inner()).get_mut(&index).and_then(Vec::pop);
  let mut reader = match taken {
    Some(r) => r,
    None => CudaReader::new(index, ReaderOptions::default())?,
  };
  let r = f(&mut reader);
  let mut pool = pool.lock().unwrap_or_else(|p| p.into_inner());
  let idle = pool.entry(index).or_default();
  if idle.len() < KEEP {
    idle.push(reader);
  }
  r
}

/// Reads the box `region` of `key` into new memory on `cuda:index`, as `dtype` (`None`: as stored; casts run on
/// the side that moves fewer bytes, see [`cast`]).
pub fn read_to_device(
  ck: &Checkpoint,
  key: &str,
  region: &Region,
  index: usize,
  dtype: Option<DType>,
) -> Result<DeviceBuffer> {
  driver::guard(|| {
    box_bytes(ck, key, region, dtype)?;
    with_reader(index, |r| r.read_alloc(ck, key, region, dtype))
  })
}

/// Reads the box `region` of `key` into the caller's device memory `ptr .. ptr + len` on `cuda:index`, as `dtype`
/// (`None`: as stored); `len` must be exactly the box's bytes in that dtype. distcp never frees it.
pub fn read_into_device(
  ck: &Checkpoint,
  key: &str,
  region: &Region,
  index: usize,
  ptr: u64,
  len: u64,
  dtype: Option<DType>,
) -> Result<()> {
  driver::guard(|| {
    box_bytes(ck, key, region, dtype)?;
    let dev = Device::open(index)?;
    driver::check_device_range(&dev, ptr, len)?;
    with_reader(index, |r| {
      r.read(ck, &[Request { key: key.to_owned(), region: region.clone(), dst: ptr, dst_len: len, dtype }])
    })?;
    Ok(())
  })
}
