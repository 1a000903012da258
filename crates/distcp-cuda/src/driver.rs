//! The CUDA driver, loaded at run time: probing, contexts, pinned host memory, device memory and streams.
//!
//! cudarc's `dynamic-loading` resolves `libcuda` lazily and *panics* (it does not return an error) when the library
//! or a symbol is missing. So the library is probed once ([`driver`]), and every entry point of this crate runs its
//! driver calls inside [`guard`], which turns any panic into [`CudaError::Panic`]; nothing unwinds into a caller.

use crate::error::{CudaError, Result};
use cudarc::driver::sys;
use std::collections::HashMap;
use std::ffi::{c_char, c_void, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

static INJECT_PANIC: AtomicBool = AtomicBool::new(false);

/// Test hook: while on, every guarded entry point panics before its first driver call, which proves that such a
/// panic comes back as [`CudaError::Panic`] (a coded error) and never crashes the process.
pub fn inject_panic_for_test(on: bool) {
  INJECT_PANIC.store(on, Ordering::SeqCst);
}

pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
  payload
    .downcast_ref::<&str>()
    .map(|s| (*s).to_owned())
    .or_else(|| payload.downcast_ref::<String>().cloned())
    .unwrap_or_else(|| "unknown panic".into())
}

/// Runs `f` so that a panic (cudarc's on a missing library or symbol, or a bug of ours) becomes an error.
pub fn guard<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
  match catch_unwind(AssertUnwindSafe(|| {
    if INJECT_PANIC.load(Ordering::SeqCst) {
      panic!("panic injected by the test hook");
    }
    f()
  })) {
    Ok(r) => r,
    Err(payload) => Err(CudaError::Panic(panic_message(&*payload))),
  }
}

fn error_name(r: sys::CUresult) -> String {
  let mut p: *const c_char = std::ptr::null();
  // SAFETY: cuGetErrorName writes a pointer to a static NUL-terminated string (or leaves it null on an unknown
  // code); it needs no context.
  let ok = unsafe { sys::cuGetErrorName(r, &mut p) } == sys::CUresult::CUDA_SUCCESS;
  if ok && !p.is_null() {
    // SAFETY: non-null and NUL-terminated, per the driver API.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
  } else {
    format!("{r:?}")
  }
}

/// Turns a `CUresult` into an error naming the call.
pub(crate) fn check(call: &'static str, r: sys::CUresult) -> Result<()> {
  if r == sys::CUresult::CUDA_SUCCESS {
    return Ok(());
  }
  Err(CudaError::Driver { call, code: r as i32, name: error_name(r), context: String::new() })
}

/// What the one-time probe found.
#[derive(Debug, Clone)]
pub struct DriverState {
  /// `cuDriverGetVersion`: 1000·major + 10·minor.
  pub version: i32,
  /// Number of devices.
  pub devices: usize,
}

fn probe() -> std::result::Result<DriverState, String> {
  // SAFETY: only tries to dlopen the candidate names; no symbol is called.
  if !unsafe { sys::is_culib_present() } {
    return Err(
      "the CUDA driver library (libcuda.so.1) could not be loaded: no NVIDIA driver on this machine, or it is not \
       on the library path (LD_LIBRARY_PATH)"
        .into(),
    );
  }
  let r = catch_unwind(|| -> std::result::Result<DriverState, String> {
    // SAFETY: cuInit takes flags 0 and may be called any number of times.
    check("cuInit", unsafe { sys::cuInit(0) })
      .map_err(|e| format!("the CUDA driver does not initialise: {e}"))?;
    let mut version = 0;
    // SAFETY: writes one int.
    check("cuDriverGetVersion", unsafe { sys::cuDriverGetVersion(&mut version) })
      .map_err(|e| e.to_string())?;
    let mut count = 0;
    // SAFETY: writes one int; cuInit succeeded.
    check("cuDeviceGetCount", unsafe { sys::cuDeviceGetCount(&mut count) }).map_err(|e| e.to_string())?;
    Ok(DriverState { version, devices: count.max(0) as usize })
  });
  match r {
    Ok(r) => r,
    Err(payload) => Err(format!("the CUDA driver library is unusable: {}", panic_message(&*payload))),
  }
}

/// The probed driver, or why there is none (probed once per process).
pub fn driver() -> Result<&'static DriverState> {
  static STATE: OnceLock<std::result::Result<DriverState, String>> = OnceLock::new();
  match STATE.get_or_init(probe) {
    Ok(s) if s.devices == 0 => {
      Err(CudaError::NoCuda { reason: "the CUDA driver is loaded but reports no device".into() })
    }
    Ok(s) => Ok(s),
    Err(reason) => Err(CudaError::NoCuda { reason: reason.clone() }),
  }
}

/// One device as `cuda_info` reports it.
#[derive(Debug, Clone)]
pub struct DeviceInfo {
  pub index: usize,
  pub name: String,
  pub total_memory: u64,
  pub pci_bus_id: String,
}

/// What CUDA this process can use.
#[derive(Debug, Clone)]
pub struct CudaInfo {
  pub available: bool,
  /// Why not, when `available` is false.
  pub reason: Option<String>,
  /// `cuDriverGetVersion` as `major.minor`.
  pub driver_version: Option<String>,
  pub devices: Vec<DeviceInfo>,
}

fn device_info(index: usize) -> Result<DeviceInfo> {
  let mut dev = 0;
  // SAFETY: writes one handle; `index` < the device count.
  check("cuDeviceGet", unsafe { sys::cuDeviceGet(&mut dev, index as i32) })?;
  let mut name = [0 as c_char; 256];
  // SAFETY: the buffer holds 256 chars and the driver writes at most `len` including the NUL.
  check("cuDeviceGetName", unsafe { sys::cuDeviceGetName(name.as_mut_ptr(), 256, dev) })?;
  let mut total = 0usize;
  // SAFETY: writes one size_t.
  check("cuDeviceTotalMem", unsafe { sys::cuDeviceTotalMem_v2(&mut total, dev) })?;
  let mut bus = [0 as c_char; 64];
  // SAFETY: as for the name; a bus id is 13 characters.
  check("cuDeviceGetPCIBusId", unsafe { sys::cuDeviceGetPCIBusId(bus.as_mut_ptr(), 64, dev) })?;
  // SAFETY: both buffers were NUL-terminated by the driver (and zero-filled before).
  let (name, bus) = unsafe { (CStr::from_ptr(name.as_ptr()), CStr::from_ptr(bus.as_ptr())) };
  Ok(DeviceInfo {
    index,
    name: name.to_string_lossy().into_owned(),
    total_memory: total as u64,
    pci_bus_id: bus.to_string_lossy().into_owned(),
  })
}

/// Probes the driver and lists the devices. Never fails: a missing driver is `available: false` with a reason.
pub fn cuda_info() -> CudaInfo {
  let r = guard(|| {
    let d = driver()?;
    let devices = (0..d.devices).map(device_info).collect::<Result<Vec<_>>>()?;
    Ok((d.version, devices))
  });
  match r {
    Ok((v, devices)) => CudaInfo {
      available: true,
      reason: None,
      driver_version: Some(format!("{}.{}", v / 1000, (v % 1000) / 10)),
      devices,
    },
    Err(e) => {
      CudaInfo { available: false, reason: Some(e.to_string()), driver_version: None, devices: Vec::new() }
    }
  }
}

/// A device with its primary context retained (for the life of the process: contexts are shared by every read).
#[derive(Debug)]
pub struct Device {
  pub index: usize,
  ctx: sys::CUcontext,
}

// SAFETY: a CUDA context handle may be made current on any thread, and the driver API is thread-safe.
unsafe impl Send for Device {}
// SAFETY: as above; `Device` has no interior mutability of its own.
unsafe impl Sync for Device {}

impl Device {
  /// The device `index`, or [`CudaError::NoCuda`] saying why there is none.
  pub fn open(index: usize) -> Result<Arc<Device>> {
    static OPEN: OnceLock<Mutex<HashMap<usize, Arc<Device>>>> = OnceLock::new();
    let d = driver()?;
    if index >= d.devices {
      return Err(CudaError::NoCuda {
        reason: format!("cuda:{index} was requested, but this machine has {} CUDA device(s)", d.devices),
      });
    }
    let mut open = OPEN.get_or_init(Default::default).lock().unwrap_or_else(|p| p.into_inner());
    if let Some(dev) = open.get(&index) {
      return Ok(dev.clone());
    }
    let mut dev = 0;
    // SAFETY: writes one handle; index < count.
    check("cuDeviceGet", unsafe { sys::cuDeviceGet(&mut dev, index as i32) })?;
    let mut ctx: sys::CUcontext = std::ptr::null_mut();
    // SAFETY: writes one context handle; the retain is never released (the device lives as long as the process).
    check("cuDevicePrimaryCtxRetain", unsafe { sys::cuDevicePrimaryCtxRetain(&mut ctx, dev) })?;
    let dev = Arc::new(Device { index, ctx });
    open.insert(index, dev.clone());
    Ok(dev)
  }

  /// Makes the context current on the calling thread (a cheap thread-local store in the driver).
  pub fn bind(&self) -> Result<()> {
    // SAFETY: `ctx` is a retained primary context, valid for the life of the process.
    check("cuCtxSetCurrent", unsafe { sys::cuCtxSetCurrent(self.ctx) })
  }

  /// `cuda:N`.
  pub fn name(&self) -> String {
    format!("cuda:{}", self.index)
  }
}

/// Page-locked host memory (`cuMemHostAlloc`, portable, *not* write-combined: the CPU reads it back fast).
pub struct PinnedBuffer {
  dev: Arc<Device>,
  ptr: *mut u8,
  len: usize,
}

// SAFETY: the buffer is plain memory owned by this value; access goes through &self/&mut self.
unsafe impl Send for PinnedBuffer {}

impl PinnedBuffer {
  pub fn new(dev: &Arc<Device>, len: usize) -> Result<PinnedBuffer> {
    dev.bind()?;
    let mut p: *mut c_void = std::ptr::null_mut();
    // SAFETY: writes one pointer to `len` fresh bytes of page-locked memory.
    check("cuMemHostAlloc", unsafe {
      sys::cuMemHostAlloc(&mut p, len.max(1), sys::CU_MEMHOSTALLOC_PORTABLE)
    })?;
    Ok(PinnedBuffer { dev: dev.clone(), ptr: p.cast(), len })
  }

  pub fn as_slice(&self) -> &[u8] {
    // SAFETY: `ptr` points to `len` bytes owned by self (cuMemHostAlloc does not zero them, but any byte value is
    // a valid u8 and callers only read what they wrote).
    unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
  }

  pub fn as_mut_slice(&mut self) -> &mut [u8] {
    // SAFETY: as in `as_slice`, and &mut self makes the access exclusive.
    unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
  }

  pub fn ptr(&self) -> *mut u8 {
    self.ptr
  }

  pub fn len(&self) -> usize {
    self.len
  }

  pub fn is_empty(&self) -> bool {
    self.len == 0
  }
}

impl Drop for PinnedBuffer {
  fn drop(&mut self) {
    let (dev, ptr) = (&self.dev, self.ptr);
    let _ = guard(|| {
      dev.bind()?;
      // SAFETY: `ptr` came from cuMemHostAlloc and is freed once; the owner synchronised every copy from it.
      check("cuMemFreeHost", unsafe { sys::cuMemFreeHost(ptr.cast()) })
    });
  }
}

/// Device memory allocated by distcp (`cuMemAlloc`), freed on drop.
pub struct DeviceBuffer {
  dev: Arc<Device>,
  ptr: u64,
  len: u64,
}

impl DeviceBuffer {
  /// `len` bytes of device memory (no allocation for 0 bytes: the pointer is then 0).
  pub fn alloc(dev: &Arc<Device>, len: u64) -> Result<DeviceBuffer> {
    guard(|| {
      dev.bind()?;
      let mut ptr = 0;
      if len > 0 {
        let n = usize::try_from(len).map_err(|_| CudaError::BadRequest(format!("{len} bytes do not fit")))?;
        // SAFETY: writes one device pointer.
        check("cuMemAlloc", unsafe { sys::cuMemAlloc_v2(&mut ptr, n) }).map_err(|e| match e {
          CudaError::Driver { call, code, name, .. } => CudaError::Driver {
            call,
            code,
            name,
            context: format!(" allocating {len} bytes on {}", dev.name()),
          },
          e => e,
        })?;
      }
      Ok(DeviceBuffer { dev: dev.clone(), ptr, len })
    })
  }

  pub fn ptr(&self) -> u64 {
    self.ptr
  }

  pub fn len(&self) -> u64 {
    self.len
  }

  pub fn is_empty(&self) -> bool {
    self.len == 0
  }

  pub fn device(&self) -> &Arc<Device> {
    &self.dev
  }
}

impl Drop for DeviceBuffer {
  fn drop(&mut self) {
    if self.ptr == 0 {
      return;
    }
    let (dev, ptr) = (&self.dev, self.ptr);
    let _ = guard(|| {
      dev.bind()?;
      // SAFETY: `ptr` came from cuMemAlloc and is freed once; every read into it was synchronised before it was
      // handed out.
      check("cuMemFree", unsafe { sys::cuMemFree_v2(ptr) })
    });
  }
}

/// Copies `out.len()` bytes from device address `src` into host memory (synchronous).
pub fn copy_to_host(dev: &Arc<Device>, src: u64, out: &mut [u8]) -> Result<()> {
  guard(|| {
    dev.bind()?;
    if out.is_empty() {
      return Ok(());
    }
    // SAFETY: `out` is writable for its length; the caller vouches that `src..src+len` is device memory.
    check("cuMemcpyDtoH", unsafe { sys::cuMemcpyDtoH_v2(out.as_mut_ptr().cast(), src, out.len()) })
  })
}

/// Checks that `ptr .. ptr + len` lies inside one allocation of device memory on `dev` (a caller's `into`).
pub fn check_device_range(dev: &Arc<Device>, ptr: u64, len: u64) -> Result<()> {
  if len == 0 {
    return Ok(());
  }
  dev.bind()?;
  let bad = |why: String| CudaError::BadRequest(format!("`into` pointer {ptr:#x} ({len} bytes): {why}"));
  let mut ordinal: i32 = -1;
  // SAFETY: the attribute is an int written into `ordinal`; an invalid pointer is an error return, not UB.
  let r = unsafe {
    sys::cuPointerGetAttribute(
      (&mut ordinal as *mut i32).cast(),
      sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL,
      ptr,
    )
  };
  check("cuPointerGetAttribute", r).map_err(|e| bad(format!("not CUDA memory ({e})")))?;
  if ordinal != dev.index as i32 {
    return Err(bad(format!("it is memory of cuda:{ordinal}, not {}", dev.name())));
  }
  let (mut start, mut size) = (0u64, 0usize);
  // SAFETY: RANGE_START_ADDR writes a CUdeviceptr (u64), RANGE_SIZE a size_t.
  let r = unsafe {
    sys::cuPointerGetAttribute(
      (&mut start as *mut u64).cast(),
      sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_RANGE_START_ADDR,
      ptr,
    )
  };
  check("cuPointerGetAttribute", r)?;
  // SAFETY: as above.
  let r = unsafe {
    sys::cuPointerGetAttribute(
      (&mut size as *mut usize).cast(),
      sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_RANGE_SIZE,
      ptr,
    )
  };
  check("cuPointerGetAttribute", r)?;
  let end = ptr.checked_add(len);
  if end.is_none_or(|end| end > start + size as u64) {
    return Err(bad(format!("the allocation holding it ends at {:#x}", start + size as u64)));
  }
  Ok(())
}

/// The pinned-copy ceiling: `total` bytes uploaded from one pinned buffer of `chunk` bytes into device memory with
/// `cuMemcpyHtoDAsync` on one stream, timed from the first call to the stream's completion (bytes, seconds).
pub fn measure_pinned_upload(dev: &Arc<Device>, total: u64, chunk: usize) -> Result<(u64, f64)> {
  guard(|| {
    let src = PinnedBuffer::new(dev, chunk)?;
    let dst = DeviceBuffer::alloc(dev, chunk as u64)?;
    dev.bind()?;
    let mut stream: sys::CUstream = std::ptr::null_mut();
    // SAFETY: writes one stream handle.
    check("cuStreamCreate", unsafe { sys::cuStreamCreate(&mut stream, 1) })?;
    let n = total.div_ceil(chunk as u64).max(1);
    // one warm-up copy: the first touches page tables and is not representative
    // SAFETY: both buffers hold `chunk` bytes and outlive the synchronisation below.
    check("cuMemcpyHtoDAsync", unsafe {
      sys::cuMemcpyHtoDAsync_v2(dst.ptr(), src.ptr().cast(), chunk, stream)
    })?;
    // SAFETY: our stream.
    check("cuStreamSynchronize", unsafe { sys::cuStreamSynchronize(stream) })?;
    let t = std::time::Instant::now();
    for _ in 0..n {
      // SAFETY: as above.
      check("cuMemcpyHtoDAsync", unsafe {
        sys::cuMemcpyHtoDAsync_v2(dst.ptr(), src.ptr().cast(), chunk, stream)
      })?;
    }
    // SAFETY: our stream.
    check("cuStreamSynchronize", unsafe { sys::cuStreamSynchronize(stream) })?;
    let secs = t.elapsed().as_secs_f64();
    // SAFETY: synchronised above; destroyed once.
    unsafe { sys::cuStreamDestroy_v2(stream) };
    Ok((n * chunk as u64, secs))
  })
}
