//! The CUDA executor: two pinned staging slots and one stream per reader thread; a slot's copies go out with
//! `cuMemcpyHtoDAsync`/`cuMemcpy2DAsync` and an event tells when the slot may be refilled.

use crate::driver::{check, Device, PinnedBuffer};
use crate::error::{CudaError, Result};
use cudarc::driver::sys;
use distcp_core::exec::{Copy2D, StagedExecutor};
use std::sync::Arc;

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
    let mut ex =
      CudaExecutor { dev: dev.clone(), stream, slots: Vec::new(), events: Vec::new(), pending: Vec::new() };
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

  fn copy(&self, from: *const u8, dst_base: u64, c: &Copy2D) -> Result<()> {
    // SAFETY (all calls below): `from + c.src ..` lies inside the slot (the pipeline checked the copies against
    // the slot length), the slot stays alive and untouched until its event has completed, and `dst_base + c.dst ..`
    // lies inside the destination (checked against its length by the pipeline).
    let src = unsafe { from.add(c.src as usize) };
    let dst = dst_base + c.dst;
    let contiguous = c.height == 1 || (c.src_pitch == c.width && c.dst_pitch == c.width);
    if contiguous {
      let n = (c.width * c.height) as usize;
      // SAFETY: see above.
      return check("cuMemcpyHtoDAsync", unsafe {
        sys::cuMemcpyHtoDAsync_v2(dst, src.cast(), n, self.stream)
      });
    }
    if c.src_pitch > MAX_PITCH || c.dst_pitch > MAX_PITCH {
      for row in 0..c.height {
        // SAFETY: see above; row < height keeps the row inside both extents.
        let s = unsafe { src.add((row * c.src_pitch) as usize) };
        check("cuMemcpyHtoDAsync", unsafe {
          sys::cuMemcpyHtoDAsync_v2(dst + row * c.dst_pitch, s.cast(), c.width as usize, self.stream)
        })?;
      }
      return Ok(());
    }
    let p = sys::CUDA_MEMCPY2D {
      srcXInBytes: 0,
      srcY: 0,
      srcMemoryType: sys::CUmemorytype::CU_MEMORYTYPE_HOST,
      srcHost: src.cast(),
      srcDevice: 0,
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
    Ok(())
  }
}

impl Drop for CudaExecutor {
  fn drop(&mut self) {
    let _ = crate::driver::guard(|| {
      // the slots are freed after this (field order): nothing may still be copying from them
      self.finish()?;
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
