//! The CUDA executor: two pinned staging slots and one stream per reader thread; a slot's copies go out with
//! `cuMemcpyHtoDAsync`/`cuMemcpy2DAsync` and an event tells when the slot may be refilled.

use crate::cast::{kernel_name, WIDEN_PTX};
use crate::driver::{check, Device, DeviceBuffer, PinnedBuffer};
use crate::error::{CudaError, Result};
use crate::pipeline::WidenExecutor;
use cudarc::driver::sys;
use distcp_core::exec::{Copy2D, StagedExecutor};
use distcp_core::DType;
use std::ffi::c_void;
use std::sync::Arc;

/// Threads per block of the widening kernels.
const WIDEN_BLOCK: u32 = 256;

/// The widening kernels, loaded on the first band that needs them and kept with the executor.
struct Widen {
  module: sys::CUmodule,
  bf16: sys::CUfunction,
  f16: sys::CUfunction,
}

/// Device scratch of a read that widens: the stored band, and it widened. One of each suffices for both slots
/// (every step runs in order on the executor's stream); freed when the read finishes, so that idle readers hold
/// no device memory.
struct Scratch {
  stage: DeviceBuffer,
  wide: DeviceBuffer,
}

/// `cuMemcpy2D` refuses pitches above the device's maximum (2³¹ − 1 on every current GPU); wider pitches are
/// copied row by row.
const MAX_PITCH: u64 = i32::MAX as u64;

/// One reader thread's staging and stream.
pub struct CudaExecutor {
  dev: Arc<Device>,
  stream: sys::CUstream,
  slots: Vec<PinnedBuffer>,
  events: Vec<sys::CUevent>,
  pending: Vec<bool>,
  widen: Option<Widen>,
  scratch: Option<Scratch>,
}

// SAFETY: the stream and event handles may be used from any thread once the context is current there, which
// every method ensures (`bind`); the executor is used by one thread at a time (&mut self).
unsafe impl Send for CudaExecutor {}

impl CudaExecutor {
  /// Two slots of `slot_len` bytes of pinned memory, one non-blocking stream, one event per slot.
  pub fn new(dev: &Arc<Device>, slot_len: usize) -> Result<CudaExecutor> {
    dev.bind()?;
    let mut stream: sys::CUstream = std::ptr::null_mut();
    // SAFETY: writes one stream handle; the context is current.
    check("cuStreamCreate", unsafe {
      sys::cuStreamCreate(&mut stream, sys::CUstream_flags::CU_STREAM_NON_BLOCKING as u32)
    })?;
    let mut ex = CudaExecutor {
      dev: dev.clone(),
      stream,
      slots: Vec::new(),
      events: Vec::new(),
      pending: Vec::new(),
      widen: None,
      scratch: None,
    };
    for _ in 0..2 {
      ex.slots.push(PinnedBuffer::new(dev, slot_len)?);
      let mut ev: sys::CUevent = std::ptr::null_mut();
      // SAFETY: writes one event handle; timing is off (it is only waited on).
      check("cuEventCreate", unsafe {
        sys::cuEventCreate(&mut ev, sys::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32)
      })?;
      ex.events.push(ev);
      ex.pending.push(false);
    }
    Ok(ex)
  }

  fn widen_setup(&mut self) -> Result<(&Widen, &Scratch)> {
    if self.widen.is_none() {
      let mut module: sys::CUmodule = std::ptr::null_mut();
      // SAFETY: the image is NUL-terminated PTX text that outlives the call; writes one module handle.
      check("cuModuleLoadData", unsafe { sys::cuModuleLoadData(&mut module, WIDEN_PTX.as_ptr().cast()) })?;
      let get = |from: DType| -> Result<sys::CUfunction> {
        let mut f: sys::CUfunction = std::ptr::null_mut();
        // SAFETY: `module` was just loaded; the name is NUL-terminated; writes one function handle.
        check("cuModuleGetFunction", unsafe {
          sys::cuModuleGetFunction(&mut f, module, kernel_name(from).as_ptr())
        })?;
        Ok(f)
      };
      match get(DType::BFloat16).and_then(|b| Ok((b, get(DType::Float16)?))) {
        Ok((bf16, f16)) => self.widen = Some(Widen { module, bf16, f16 }),
        Err(e) => {
          // SAFETY: loaded above, unloaded once; nothing was launched from it.
          unsafe { sys::cuModuleUnload(module) };
          return Err(e);
        }
      }
    }
    if self.scratch.is_none() {
      let len = self.slot_len() as u64;
      let stage = DeviceBuffer::alloc(&self.dev, len)?;
      self.scratch = Some(Scratch { stage, wide: DeviceBuffer::alloc(&self.dev, len * 2)? });
    }
    match (&self.widen, &self.scratch) {
      (Some(w), Some(s)) => Ok((w, s)),
      _ => Err(CudaError::Panic("widening kernels missing after setup".into())),
    }
  }

  fn copy(&self, from: *const u8, dst_base: u64, c: &Copy2D) -> Result<()> {
    // SAFETY (all calls below): `from + c.src ..` lies inside the slot (the pipeline checked the copies against
    // the slot length), the slot stays alive and untouched until its event has completed, and `dst_base + c.dst ..`
    // lies inside the destination (checked against its length by the pipeline).
    let src = unsafe { from.add(c.src as usize) };
    let dst = dst_base + c.dst;
    self.copy_rows(Mem::Host(src), dst, c)
  }

  /// One copy from host memory (`Mem::Host`, already offset by `c.src`) or device memory (`Mem::Device`, likewise)
  /// to device address `dst`.
  fn copy_rows(&self, src: Mem, dst: u64, c: &Copy2D) -> Result<()> {
    let contiguous = c.height == 1 || (c.src_pitch == c.width && c.dst_pitch == c.width);
    let one = |at: u64, dst: u64, n: usize| match src {
      // SAFETY: the caller's extents (see `copy`): `at` stays inside the copy's source rows.
      Mem::Host(p) => check("cuMemcpyHtoDAsync", unsafe {
        sys::cuMemcpyHtoDAsync_v2(dst, p.add(at as usize).cast(), n, self.stream)
      }),
      // SAFETY: as above, in device memory of this context.
      Mem::Device(p) => {
        check("cuMemcpyDtoDAsync", unsafe { sys::cuMemcpyDtoDAsync_v2(dst, p + at, n, self.stream) })
      }
    };
    if contiguous {
      return one(0, dst, (c.width * c.height) as usize);
    }
    if c.src_pitch > MAX_PITCH || c.dst_pitch > MAX_PITCH {
      for row in 0..c.height {
        one(row * c.src_pitch, dst + row * c.dst_pitch, c.width as usize)?;
      }
      return Ok(());
    }
    let (src_type, src_host, src_device) = match src {
      Mem::Host(p) => (sys::CUmemorytype::CU_MEMORYTYPE_HOST, p.cast(), 0),
      Mem::Device(p) => (sys::CUmemorytype::CU_MEMORYTYPE_DEVICE, std::ptr::null(), p),
    };
    let p = sys::CUDA_MEMCPY2D {
      srcXInBytes: 0,
      srcY: 0,
      srcMemoryType: src_type,
      srcHost: src_host,
      srcDevice: src_device,
      srcArray: std::ptr::null_mut(),
      srcPitch: c.src_pitch as usize,
      dstXInBytes: 0,
      dstY: 0,
      dstMemoryType: sys::CUmemorytype::CU_MEMORYTYPE_DEVICE,
      dstHost: std::ptr::null_mut(),
      dstDevice: dst,
      dstArray: std::ptr::null_mut(),
      dstPitch: c.dst_pitch as usize,
      WidthInBytes: c.width as usize,
      Height: c.height as usize,
    };
    // SAFETY: see above; the descriptor is read by the driver during the call only.
    check("cuMemcpy2DAsync", unsafe { sys::cuMemcpy2DAsync_v2(&p, self.stream) })
  }
}

impl CudaExecutor {
  /// Copies device bytes `src .. src + out.len()` into `out` through the two pinned slots: the DMA of one slot
  /// overlaps the host copy out of the other (the path a save from device memory takes).
  pub fn download(&mut self, src: u64, out: &mut [u8]) -> Result<()> {
    self.dev.bind()?;
    let slot_len = self.slot_len();
    let pieces: Vec<(usize, usize)> =
      (0..out.len()).step_by(slot_len).map(|at| (at, slot_len.min(out.len() - at))).collect();
    let mut queued: Option<(usize, usize, usize)> = None; // (slot, at, len) in flight
    for (i, &(at, len)) in pieces.iter().enumerate() {
      let slot = i % 2;
      // SAFETY: the slot holds `slot_len` ≥ `len` bytes and is not read by the host until its event completes;
      // the caller vouches that `src .. src + out.len()` is device memory of this context.
      check("cuMemcpyDtoHAsync", unsafe {
        sys::cuMemcpyDtoHAsync_v2(self.slots[slot].ptr().cast(), src + at as u64, len, self.stream)
      })?;
      // SAFETY: event and stream belong to this executor.
      check("cuEventRecord", unsafe { sys::cuEventRecord(self.events[slot], self.stream) })?;
      if let Some((s, a, l)) = queued.replace((slot, at, len)) {
        self.drain(s, &mut out[a..a + l])?;
      }
    }
    if let Some((s, a, l)) = queued {
      self.drain(s, &mut out[a..a + l])?;
    }
    Ok(())
  }

  fn drain(&mut self, slot: usize, out: &mut [u8]) -> Result<()> {
    // SAFETY: the event was recorded after the slot's DMA on our stream.
    check("cuEventSynchronize", unsafe { sys::cuEventSynchronize(self.events[slot]) })?;
    out.copy_from_slice(&self.slots[slot].as_slice()[..out.len()]);
    Ok(())
  }
}

#[derive(Clone, Copy)]
enum Mem {
  Host(*const u8),
  Device(u64),
}

impl WidenExecutor for CudaExecutor {
  fn upload_widened(
    &mut self,
    slot: usize,
    staged: usize,
    from: DType,
    dst_base: u64,
    copies: &[Copy2D],
  ) -> Result<()> {
    self.dev.bind()?;
    let (stream, src) = (self.stream, self.slots[slot].ptr());
    let (w, sc) = self.widen_setup()?;
    let (stage, wide) = (sc.stage.ptr(), sc.wide.ptr());
    let f = if from == DType::BFloat16 { w.bf16 } else { w.f16 };
    if staged > sc.stage.len() as usize {
      return Err(CudaError::Panic(format!("a widened band of {staged} bytes is over the device scratch")));
    }
    let mut n = (staged / 2) as u64;
    let blocks = u32::try_from(n.div_ceil(u64::from(WIDEN_BLOCK)))
      .map_err(|_| CudaError::Panic(format!("{n} elements are too many blocks for one launch")))?;
    // SAFETY: the slot holds `staged` bytes and stays untouched until its event (recorded below) completes; the
    // scratch holds at least `staged` bytes.
    check("cuMemcpyHtoDAsync", unsafe { sys::cuMemcpyHtoDAsync_v2(stage, src.cast(), staged, stream) })?;
    if blocks > 0 {
      let (mut a, mut b) = (stage, wide);
      let mut params: [*mut c_void; 3] =
        [(&mut a as *mut u64).cast(), (&mut b as *mut u64).cast(), (&mut n as *mut u64).cast()];
      // SAFETY: the kernel takes (u64 src, u64 dst, u64 n) and touches src[0..n) (2-byte elements, inside the
      // stage buffer) and dst[0..n) (4-byte elements, inside `wide`, twice the stage's size); the parameters are
      // read during the call.
      check("cuLaunchKernel", unsafe {
        sys::cuLaunchKernel(
          f,
          blocks,
          1,
          1,
          WIDEN_BLOCK,
          1,
          1,
          0,
          stream,
          params.as_mut_ptr(),
          std::ptr::null_mut(),
        )
      })?;
    }
    let wide_len = n * 4;
    for c in copies {
      if c.src_end() > wide_len {
        return Err(CudaError::Panic(format!("a widened copy reads past the {wide_len} widened bytes")));
      }
      self.copy_rows(Mem::Device(wide + c.src), dst_base + c.dst, c)?;
    }
    // SAFETY: event and stream belong to this executor's context.
    check("cuEventRecord", unsafe { sys::cuEventRecord(self.events[slot], self.stream) })?;
    self.pending[slot] = true;
    Ok(())
  }
}

impl StagedExecutor for CudaExecutor {
  type Error = CudaError;

  fn slot_count(&self) -> usize {
    self.slots.len()
  }

  fn slot_len(&self) -> usize {
    self.slots[0].len()
  }

  fn slot(&mut self, slot: usize) -> Result<&mut [u8]> {
    self.dev.bind()?;
    if self.pending[slot] {
      // SAFETY: the event was recorded on our stream after the slot's copies.
      check("cuEventSynchronize", unsafe { sys::cuEventSynchronize(self.events[slot]) })?;
      self.pending[slot] = false;
    }
    Ok(self.slots[slot].as_mut_slice())
  }

  fn upload(&mut self, slot: usize, dst_base: u64, copies: &[Copy2D]) -> Result<()> {
    self.dev.bind()?;
    let from = self.slots[slot].ptr();
    for c in copies {
      self.copy(from, dst_base, c)?;
    }
    // SAFETY: event and stream belong to this executor's context.
    check("cuEventRecord", unsafe { sys::cuEventRecord(self.events[slot], self.stream) })?;
    self.pending[slot] = true;
    Ok(())
  }

  fn finish(&mut self) -> Result<()> {
    self.dev.bind()?;
    // SAFETY: our own stream.
    check("cuStreamSynchronize", unsafe { sys::cuStreamSynchronize(self.stream) })?;
    self.pending.iter_mut().for_each(|p| *p = false);
    // nothing on the stream uses the scratch any more
    self.scratch = None;
    Ok(())
  }
}

impl Drop for CudaExecutor {
  fn drop(&mut self) {
    let _ = crate::driver::guard(|| {
      // the slots are freed after this (field order): nothing may still be copying from them
      self.finish()?;
      if let Some(w) = self.widen.take() {
        // SAFETY: loaded by us, unloaded once, after the stream finished every launch.
        unsafe { sys::cuModuleUnload(w.module) };
      }
      for ev in self.events.drain(..) {
        // SAFETY: created by us, destroyed once.
        unsafe { sys::cuEventDestroy_v2(ev) };
      }
      // SAFETY: created by us, destroyed once, after synchronising.
      unsafe { sys::cuStreamDestroy_v2(self.stream) };
      Ok(())
    });
  }
}
