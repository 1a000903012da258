//! CUDA: `cudaInfo()`, reads into new device memory (`NativeDeviceBuffer`) or into the caller's. Conversion and
//! scheduling only; the pipeline lives in distcp-cuda.

use crate::checkpoint::NativeCheckpoint;
use crate::errors::{cuda_js, invalid_arg, job, Job, Result, Work};
use distcp_core::plan::Region;
use distcp_core::{Checkpoint, DType};
use distcp_cuda::{CudaError, DeviceBuffer};
use napi::bindgen_prelude::{AsyncTask, BigInt, Buffer, Uint8Array};
use napi::Env;
use napi_derive::napi;
use std::sync::{Arc, Mutex};

pub use crate::cuda_info::{NativeCudaDevice, NativeCudaInfo};

/// Probes the CUDA driver (loaded at run time) and lists the devices; without one, `available` is false and
/// `reason` says why.
#[napi(catch_unwind)]
pub fn cuda_info() -> NativeCudaInfo {
  let i = distcp_cuda::cuda_info();
  NativeCudaInfo {
    available: i.available,
    reason: i.reason,
    driver_version: i.driver_version,
    devices: i
      .devices
      .into_iter()
      .map(|d| NativeCudaDevice {
        index: d.index as u32,
        name: d.name,
        total_memory: d.total_memory as f64,
        pci_bus_id: d.pci_bus_id,
      })
      .collect(),
  }
}

/// Test hook: makes the CUDA layer panic at its next entry point (proves the panic comes back as a coded error).
#[napi]
pub fn cuda_inject_panic_for_test(on: bool) {
  distcp_cuda::inject_panic_for_test(on);
}

/// Device memory allocated by distcp; freed by `dispose()` or when JS collects this object.
#[napi]
pub struct NativeDeviceBuffer {
  buf: Arc<Mutex<Option<DeviceBuffer>>>,
  ptr: u64,
  len: u64,
  device: u32,
}

impl NativeDeviceBuffer {
  fn live(&self) -> Result<()> {
    match self.buf.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
      Some(_) => Ok(()),
      None => Err(cuda_js(CudaError::Disposed)),
    }
  }
}

#[napi]
impl NativeDeviceBuffer {
  /// Device address of the first byte (throws ERR_DISTCP_DISPOSED after dispose()).
  #[napi(getter)]
  pub fn ptr(&self) -> Result<BigInt> {
    self.live()?;
    Ok(BigInt::from(self.ptr))
  }

  #[napi(getter)]
  pub fn byte_length(&self) -> f64 {
    self.len as f64
  }

  #[napi(getter)]
  pub fn device_index(&self) -> u32 {
    self.device
  }

  #[napi(getter)]
  pub fn disposed(&self) -> bool {
    self.buf.lock().unwrap_or_else(|p| p.into_inner()).is_none()
  }

  /// Frees the memory now; a second call does nothing.
  #[napi(catch_unwind)]
  pub fn dispose(&self) {
    let taken = self.buf.lock().unwrap_or_else(|p| p.into_inner()).take();
    drop(taken);
  }

  /// Copies the bytes back to a new host Buffer (on a worker thread, through pinned staging).
  #[napi(ts_return_type = "Promise<Buffer>")]
  pub fn to_host(&self) -> Result<AsyncTask<Job<ToHostTask>>> {
    self.live()?;
    Ok(job(ToHostTask { buf: self.buf.clone() }))
  }
}

pub struct ToHostTask {
  buf: Arc<Mutex<Option<DeviceBuffer>>>,
}

impl Work<'_> for ToHostTask {
  type Output = Vec<u8>;
  type JsValue = Buffer;

  fn compute(&mut self) -> Result<Vec<u8>> {
    // held for the copy, so a concurrent dispose() waits instead of freeing memory being read
    let guard = self.buf.lock().unwrap_or_else(|p| p.into_inner());
    let b = guard.as_ref().ok_or_else(|| cuda_js(CudaError::Disposed))?;
    let mut out =
      vec![0u8; usize::try_from(b.len()).map_err(|_| cuda_js(CudaError::BadRequest("too large".into())))?];
    distcp_cuda::download(b.device().index, b.ptr(), &mut out).map_err(cuda_js)?;
    Ok(out)
  }

  fn resolve(&mut self, _env: &Env, out: Vec<u8>) -> Result<Buffer> {
    Ok(out.into())
  }
}

pub struct ReadDeviceTask {
  ck: Arc<Checkpoint>,
  key: String,
  region: Region,
  device: u32,
  dtype: Option<DType>,
}

impl Work<'_> for ReadDeviceTask {
  type Output = DeviceBuffer;
  type JsValue = NativeDeviceBuffer;

  fn compute(&mut self) -> Result<DeviceBuffer> {
    distcp_cuda::read_to_device(&self.ck, &self.key, &self.region, self.device as usize, self.dtype)
      .map_err(cuda_js)
  }

  fn resolve(&mut self, _env: &Env, buf: DeviceBuffer) -> Result<NativeDeviceBuffer> {
    Ok(NativeDeviceBuffer {
      ptr: buf.ptr(),
      len: buf.len(),
      device: self.device,
      buf: Arc::new(Mutex::new(Some(buf))),
    })
  }
}

pub struct ReadIntoDeviceTask {
  ck: Arc<Checkpoint>,
  key: String,
  region: Region,
  device: u32,
  ptr: u64,
  len: u64,
  dtype: Option<DType>,
}

impl Work<'_> for ReadIntoDeviceTask {
  type Output = ();
  type JsValue = ();

  fn compute(&mut self) -> Result<()> {
    let (ck, key, region) = (&self.ck, self.key.as_str(), &self.region);
    distcp_cuda::read_into_device(ck, key, region, self.device as usize, self.ptr, self.len, self.dtype)
      .map_err(cuda_js)
  }

  fn resolve(&mut self, _env: &Env, _: ()) -> Result<()> {
    Ok(())
  }
}

fn device_ptr(ptr: &BigInt) -> Result<u64> {
  match ptr.words.as_slice() {
    [] => Ok(0),
    [w] if !ptr.sign_bit => Ok(*w),
    _ => Err(invalid_arg("`into.ptr` must be a device address (a non-negative 64-bit bigint)")),
  }
}

fn wanted_dtype(dtype: Option<String>) -> Result<Option<DType>> {
  dtype
    .map(|d| DType::from_name(&d).ok_or_else(|| invalid_arg(format!("`dtype` '{d}' is not a torch dtype"))))
    .transpose()
}

/// Reads a tensor (or the box `offsets`/`sizes`) into new memory on `cuda:device`, as `dtype` (default: stored).
#[napi(ts_return_type = "Promise<NativeDeviceBuffer>")]
pub fn read_to_device(
  ck: &NativeCheckpoint,
  key: String,
  device: u32,
  offsets: Option<Vec<f64>>,
  sizes: Option<Vec<f64>>,
  dtype: Option<String>,
) -> Result<AsyncTask<Job<ReadDeviceTask>>> {
  let ck_ = ck.get()?;
  let region = ck.region(&ck_, &key, offsets, sizes)?;
  let dtype = wanted_dtype(dtype)?;
  Ok(job(ReadDeviceTask { ck: ck_, key, region, device, dtype }))
}

/// Reads a tensor (or a box) into the caller's device memory `ptr .. ptr + byteLength` on `cuda:device`.
// napi passes the JS call's positional arguments; an options object would only move the same count elsewhere
#[allow(clippy::too_many_arguments)]
#[napi(ts_return_type = "Promise<void>")]
pub fn read_into_device(
  ck: &NativeCheckpoint,
  key: String,
  device: u32,
  ptr: BigInt,
  byte_length: f64,
  offsets: Option<Vec<f64>>,
  sizes: Option<Vec<f64>>,
  dtype: Option<String>,
) -> Result<AsyncTask<Job<ReadIntoDeviceTask>>> {
  let ck_ = ck.get()?;
  let region = ck.region(&ck_, &key, offsets, sizes)?;
  let ptr = device_ptr(&ptr)?;
  let dtype = wanted_dtype(dtype)?;
  if !(byte_length >= 0.0 && byte_length.fract() == 0.0 && byte_length <= 9_007_199_254_740_991.0) {
    return Err(invalid_arg(format!("`into.byteLength` must be a byte count, got {byte_length}")));
  }
  Ok(job(ReadIntoDeviceTask { ck: ck_, key, region, device, ptr, len: byte_length as u64, dtype }))
}

pub struct CopyFromDeviceTask {
  device: u32,
  ptr: u64,
  len: usize,
}

impl Work<'_> for CopyFromDeviceTask {
  type Output = Vec<u8>;
  type JsValue = Buffer;

  fn compute(&mut self) -> Result<Vec<u8>> {
    let mut out = vec![0u8; self.len];
    distcp_cuda::download_checked(self.device as usize, self.ptr, &mut out).map_err(cuda_js)?;
    Ok(out)
  }

  fn resolve(&mut self, _env: &Env, out: Vec<u8>) -> Result<Buffer> {
    Ok(out.into())
  }
}

/// Copies `byteLength` bytes of the caller's device memory at `ptr` on `cuda:device` into a new host Buffer.
#[napi(ts_return_type = "Promise<Buffer>")]
pub fn copy_from_device(
  device: u32,
  ptr: BigInt,
  byte_length: f64,
) -> Result<AsyncTask<Job<CopyFromDeviceTask>>> {
  let ptr = device_ptr(&ptr)?;
  if !(byte_length >= 0.0 && byte_length.fract() == 0.0 && byte_length < (1u64 << 32) as f64) {
    return Err(invalid_arg(format!(
      "byteLength must be a byte count below 4 GiB (one Node buffer), got {byte_length}"
    )));
  }
  Ok(job(CopyFromDeviceTask { device, ptr, len: byte_length as usize }))
}

pub struct CopyFromDeviceIntoTask {
  device: u32,
  ptr: u64,
  into: Uint8Array,
}

impl Work<'_> for CopyFromDeviceIntoTask {
  type Output = ();
  type JsValue = ();

  fn compute(&mut self) -> Result<()> {
    // SAFETY: `into` is a staging view that only this save writes until the promise settles (src/staging.ts); the
    // Uint8Array reference keeps its memory alive meanwhile.
    let out = unsafe { self.into.as_mut() };
    crate::save::pin_staging_block(self.device as usize, out.as_ptr(), out.len());
    distcp_cuda::download_checked(self.device as usize, self.ptr, out).map_err(cuda_js)
  }

  fn resolve(&mut self, _env: &Env, _: ()) -> Result<()> {
    Ok(())
  }
}

/// Copies `into.byteLength` bytes of the caller's device memory at `ptr` on `cuda:device` into `into` (a save's
/// staging memory, reused across saves: no fresh host buffer per device tensor).
#[napi(ts_return_type = "Promise<void>")]
pub fn copy_from_device_into(
  device: u32,
  ptr: BigInt,
  into: Uint8Array,
) -> Result<AsyncTask<Job<CopyFromDeviceIntoTask>>> {
  let ptr = device_ptr(&ptr)?;
  Ok(job(CopyFromDeviceIntoTask { device, ptr, into }))
}
