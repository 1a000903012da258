//! A fake device over host memory, implementing the same [`StagedExecutor`] as CUDA, so the pipeline (bands,
//! staging, 2-D placement) is tested on machines without a GPU. Uploads are deferred until the slot is lent again
//! or the executor finishes, as an asynchronous DMA would read the slot later: a pipeline that refilled a slot
//! before waiting for it would land wrong bytes here too.

use crate::error::{CudaError, Result};
use crate::pipeline::WidenExecutor;
use distcp_core::exec::{Copy2D, StagedExecutor};
use distcp_core::DType;
use std::sync::{Arc, Mutex};

/// Device memory simulated in host memory: addresses `base .. base + len`.
pub struct FakeDevice {
  mem: Mutex<Vec<u8>>,
  base: u64,
}

impl FakeDevice {
  /// `len` bytes of fake device memory, filled with `fill` (so untouched bytes are visible).
  pub fn new(len: usize, fill: u8) -> Arc<FakeDevice> {
    // a non-zero base, so that a copy computed from address 0 lands outside
    Arc::new(FakeDevice { mem: Mutex::new(vec![fill; len]), base: 0x1_0000 })
  }

  /// Address of byte `offset`.
  pub fn addr(&self, offset: u64) -> u64 {
    self.base + offset
  }

  /// A copy of the bytes at `addr .. addr + len`.
  pub fn read(&self, addr: u64, len: usize) -> Vec<u8> {
    let mem = self.mem.lock().unwrap_or_else(|p| p.into_inner());
    let at = (addr - self.base) as usize;
    mem[at..at + len].to_vec()
  }

  fn apply(&self, slot: &[u8], dst_base: u64, copies: &[Copy2D]) -> Result<()> {
    let mut mem = self.mem.lock().unwrap_or_else(|p| p.into_inner());
    let out = |what: &str| CudaError::BadRequest(format!("fake device: a copy {what}"));
    for c in copies {
      for row in 0..c.height {
        let s = (c.src + row * c.src_pitch) as usize;
        let d = (dst_base + c.dst + row * c.dst_pitch)
          .checked_sub(self.base)
          .ok_or_else(|| out("writes below the device memory"))? as usize;
        let w = c.width as usize;
        let from = slot.get(s..s + w).ok_or_else(|| out("reads past its staging slot"))?;
        let to = mem.get_mut(d..d + w).ok_or_else(|| out("writes past the device memory"))?;
        to.copy_from_slice(from);
      }
    }
    Ok(())
  }
}

/// One reader thread's executor on a [`FakeDevice`].
pub struct FakeExecutor {
  dev: Arc<FakeDevice>,
  slots: Vec<Vec<u8>>,
  pending: Vec<Option<Pending>>,
}

struct Pending {
  dst_base: u64,
  copies: Vec<Copy2D>,
  /// `(stored dtype, staged bytes)` when the slot's elements are widened to float32 "on the device" first.
  widen: Option<(DType, usize)>,
}

impl FakeExecutor {
  /// Two slots of `slot_len` bytes.
  pub fn new(dev: &Arc<FakeDevice>, slot_len: usize) -> FakeExecutor {
    FakeExecutor { dev: dev.clone(), slots: vec![vec![0xAB; slot_len]; 2], pending: vec![None, None] }
  }

  fn land(&mut self, slot: usize) -> Result<()> {
    if let Some(p) = self.pending[slot].take() {
      match p.widen {
        None => self.dev.apply(&self.slots[slot], p.dst_base, &p.copies)?,
        Some((from, staged)) => {
          let src = self.slots[slot]
            .get(..staged)
            .ok_or_else(|| CudaError::BadRequest("fake device: a widen reads past its slot".into()))?;
          let mut wide = vec![0u8; staged / 2 * 4];
          crate::cast::widen_slice(from, src, &mut wide);
          self.dev.apply(&wide, p.dst_base, &p.copies)?;
        }
      }
    }
    Ok(())
  }
}

impl StagedExecutor for FakeExecutor {
  type Error = CudaError;

  fn slot_count(&self) -> usize {
    self.slots.len()
  }

  fn slot_len(&self) -> usize {
    self.slots[0].len()
  }

  fn slot(&mut self, slot: usize) -> Result<&mut [u8]> {
    self.land(slot)?;
    // stale bytes from the last band must never be mistaken for this one's
    self.slots[slot].fill(0xCD);
    Ok(&mut self.slots[slot])
  }

  fn upload(&mut self, slot: usize, dst_base: u64, copies: &[Copy2D]) -> Result<()> {
    if self.pending[slot].is_some() {
      return Err(CudaError::BadRequest(
        "fake device: a slot was uploaded twice without being waited for".into(),
      ));
    }
    self.pending[slot] = Some(Pending { dst_base, copies: copies.to_vec(), widen: None });
    Ok(())
  }

  fn finish(&mut self) -> Result<()> {
    for s in 0..self.slots.len() {
      self.land(s)?;
    }
    Ok(())
  }
}

impl WidenExecutor for FakeExecutor {
  fn upload_widened(
    &mut self,
    slot: usize,
    staged: usize,
    from: DType,
    dst_base: u64,
    copies: &[Copy2D],
  ) -> Result<()> {
    self.upload(slot, dst_base, copies)?;
    if let Some(p) = self.pending[slot].as_mut() {
      p.widen = Some((from, staged));
    }
    Ok(())
  }
}
