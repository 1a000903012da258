//! Host memory that the caller owns, page-locked for the driver (`cuMemHostRegister`): a save's staging blocks, so
//! that a device tensor's bytes reach them in one DMA transfer instead of through a staging slot and a memcpy.
//!
//! Registration is process-wide bookkeeping: [`download_checked`](crate::download_checked) asks [`is_registered`]
//! whether its destination lies in registered memory and, if so, copies into it directly.

use crate::driver::{check, guard, Device};
use crate::error::Result;
use cudarc::driver::sys;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, OnceLock};

/// Start address → length of every live registration.
fn registry() -> &'static Mutex<BTreeMap<usize, usize>> {
  static R: OnceLock<Mutex<BTreeMap<usize, usize>>> = OnceLock::new();
  R.get_or_init(Default::default)
}

/// Whether `ptr .. ptr + len` lies inside one registered range of `ranges`.
fn covered(ranges: &BTreeMap<usize, usize>, ptr: usize, len: usize) -> bool {
  match ranges.range(..=ptr).next_back() {
    Some((&start, &n)) => ptr.checked_add(len).is_some_and(|end| end <= start.saturating_add(n)),
    None => false,
  }
}

/// Whether `ptr .. ptr + len` lies inside memory registered with [`HostRegistration::new`].
pub fn is_registered(ptr: *const u8, len: usize) -> bool {
  let ranges = registry().lock().unwrap_or_else(|p| p.into_inner());
  covered(&ranges, ptr as usize, len)
}

/// A registration of `len` bytes at `ptr`, undone on drop (which must come before the memory is freed).
pub struct HostRegistration {
  dev: Arc<Device>,
  ptr: usize,
  len: usize,
}

impl HostRegistration {
  /// Page-locks `ptr .. ptr + len` for every context (`CU_MEMHOSTREGISTER_PORTABLE`), registering through the
  /// context of `cuda:index` (a device the caller already uses: no context is created on another GPU).
  ///
  /// # Safety
  /// The memory must stay mapped, and not be registered again, until the returned value is dropped.
  pub unsafe fn new(index: usize, ptr: *mut u8, len: usize) -> Result<HostRegistration> {
    guard(|| {
      let dev = Device::open(index)?;
      dev.bind()?;
      // SAFETY: the caller vouches that the range is mapped memory it owns for the registration's life.
      check("cuMemHostRegister", unsafe {
        sys::cuMemHostRegister_v2(ptr.cast(), len, sys::CU_MEMHOSTREGISTER_PORTABLE)
      })?;
      registry().lock().unwrap_or_else(|p| p.into_inner()).insert(ptr as usize, len);
      Ok(HostRegistration { dev, ptr: ptr as usize, len })
    })
  }

  /// Bytes registered.
  pub fn len(&self) -> usize {
    self.len
  }

  /// Whether nothing is registered.
  pub fn is_empty(&self) -> bool {
    self.len == 0
  }
}

impl Drop for HostRegistration {
  fn drop(&mut self) {
    registry().lock().unwrap_or_else(|p| p.into_inner()).remove(&self.ptr);
    let (dev, ptr) = (&self.dev, self.ptr);
    let _ = guard(|| {
      dev.bind()?;
      // SAFETY: `ptr` was registered by `new` and is unregistered once, before its memory goes.
      check("cuMemHostUnregister", unsafe { sys::cuMemHostUnregister(ptr as *mut std::ffi::c_void) })
    });
  }
}

#[cfg(test)]
mod tests {
  use super::*;

  #[test]
  fn a_destination_counts_as_registered_only_inside_one_range() {
    let mut r = BTreeMap::new();
    r.insert(4096, 8192);
    r.insert(65536, 100);
    assert!(covered(&r, 4096, 8192));
    assert!(covered(&r, 5000, 10));
    assert!(!covered(&r, 4095, 2), "starts before the range");
    assert!(!covered(&r, 12000, 289), "runs past the end");
    assert!(!covered(&r, 12288, 1), "the first byte after it");
    assert!(covered(&r, 65536, 100));
    assert!(!covered(&r, 100, 1));
    assert!(!covered(&r, usize::MAX - 1, 10), "overflow is not coverage");
  }
}
