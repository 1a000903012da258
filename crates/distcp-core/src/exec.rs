//! Byte movement, lowered to one vocabulary every executor shares.
//!
//! A [`ChunkRead`] (which box of a stored chunk goes where in a row-major destination) is lowered into
//! [`Copy2D`]s: `height` rows of `width` bytes, each row read at `src + i·src_pitch` of the chunk's storage and
//! written at `dst + i·dst_pitch` of the destination. That is exactly what `cuMemcpy2DAsync` takes, and what a
//! host `memcpy` loop takes, so the CPU executor, the CUDA executor and the fake device used in tests all consume
//! the same lowered copies: the rules about strides, offsets and contiguity live here only.
//!
//! Lowering is an iterator: a permuted tensor can need one copy per row of its outer dimensions, and the number of
//! copies is never materialised.

use crate::plan::ChunkRead;

/// One rectangular byte copy (all fields in bytes, `height ≥ 1`, `width ≥ 1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Copy2D {
  /// Offset of the first row in the source storage.
  pub src: u64,
  /// Distance between consecutive source rows.
  pub src_pitch: u64,
  /// Offset of the first row in the destination.
  pub dst: u64,
  /// Distance between consecutive destination rows.
  pub dst_pitch: u64,
  /// Bytes per row.
  pub width: u64,
  /// Number of rows.
  pub height: u64,
}

impl Copy2D {
  /// One past the last source byte this copy reads.
  pub fn src_end(&self) -> u64 {
    self.src + (self.height - 1) * self.src_pitch + self.width
  }

  /// One past the last destination byte this copy writes.
  pub fn dst_end(&self) -> u64 {
    self.dst + (self.height - 1) * self.dst_pitch + self.width
  }

  /// Bytes moved.
  pub fn bytes(&self) -> u64 {
    self.width * self.height
  }
}

/// How a stored chunk's elements sit in its storage: element strides and element offset, as torch records them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredLayout {
  /// Element stride of each dimension.
  pub stride: Vec<u64>,
  /// Element offset of element `[0, 0, …]`.
  pub storage_offset: u64,
  /// Bytes per element.
  pub elem_size: u64,
}

/// Row-major element strides of `sizes`, or `None` when they overflow.
pub fn row_major_strides(sizes: &[u64]) -> Option<Vec<u64>> {
  let mut strides = vec![1u64; sizes.len()];
  for d in (0..sizes.len().saturating_sub(1)).rev() {
    strides[d] = strides[d + 1].checked_mul(sizes[d + 1])?;
  }
  Some(strides)
}

#[derive(Clone, Copy, Debug)]
struct Dim {
  len: u64,
  src: u64,
  dst: u64,
}

/// The copies of one lowered chunk read; see [`lower`].
#[derive(Debug, Clone)]
pub struct Copies {
  /// Outer dimensions walked by the odometer (element strides).
  outer: Vec<Dim>,
  index: Vec<u64>,
  /// Element offsets of the first copy.
  src_base: u64,
  dst_base: u64,
  elem_size: u64,
  /// Width, height and pitches shared by every copy.
  template: Copy2D,
  done: bool,
}

impl Copies {
  /// Width, height and pitches, which every copy shares (`src`/`dst` are 0 here).
  pub fn shape(&self) -> Copy2D {
    self.template
  }

  /// Whether the copies' rows, in the order the iterator yields them, read the source at increasing,
  /// non-overlapping offsets (a row-major chunk: yes; a transposed one: no). A reader that streams the source
  /// through a window needs this.
  pub fn is_ascending(&self) -> bool {
    self.ascends(self.template.src_pitch, |d| d.src)
  }

  /// [`Copies::is_ascending`] for where the rows land: at increasing, non-overlapping offsets of the destination.
  pub fn lands_ascending(&self) -> bool {
    self.ascends(self.template.dst_pitch, |d| d.dst)
  }

  /// Whether rows `pitch` bytes apart, walked by outer dimensions `stride` elements apart, ascend.
  fn ascends(&self, pitch: u64, stride: impl Fn(&Dim) -> u64) -> bool {
    let t = &self.template;
    if t.height > 1 && pitch < t.width {
      return false;
    }
    // bytes spanned by one copy, then by each outer dimension from the innermost out
    let mut span = (t.height - 1).saturating_mul(pitch).saturating_add(t.width);
    for d in self.outer.iter().rev() {
      let step = stride(d).saturating_mul(self.elem_size);
      if d.len > 1 && step < span {
        return false;
      }
      span = (d.len - 1).saturating_mul(step).saturating_add(span);
    }
    true
  }

  /// How many copies the iterator yields in all.
  pub fn copy_count(&self) -> u64 {
    if self.done {
      return 0;
    }
    self.outer.iter().map(|d| d.len).product()
  }
}

impl Iterator for Copies {
  type Item = Copy2D;

  fn next(&mut self) -> Option<Copy2D> {
    if self.done {
      return None;
    }
    let (mut s, mut t) = (self.src_base, self.dst_base);
    for (i, d) in self.index.iter().zip(&self.outer) {
      s += i * d.src;
      t += i * d.dst;
    }
    // odometer over the outer dims
    let mut d = self.outer.len();
    loop {
      if d == 0 {
        self.done = true;
        break;
      }
      d -= 1;
      self.index[d] += 1;
      if self.index[d] < self.outer[d].len {
        break;
      }
      self.index[d] = 0;
    }
    // `lower` checked that the largest offset times the element size fits
    Some(Copy2D { src: s * self.elem_size, dst: t * self.elem_size, ..self.template })
  }
}

/// Why a read could not be lowered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LowerError {
  /// An offset or size does not fit in 64 bits.
  #[error("byte offsets of the read overflow 64 bits")]
  Overflow,
  /// The read's rank does not match the layout's or the destination's.
  #[error("the read has {read} dimensions, the stored layout {layout} and the destination {dst}")]
  Rank {
    /// dimensions of the read
    read: usize,
    /// dimensions of the stored layout
    layout: usize,
    /// dimensions of the destination
    dst: usize,
  },
}

/// Lowers `read` (a box of a chunk stored with `layout`) into 2-D copies into a row-major destination of
/// `dst_sizes` elements. Dimensions that both sides step through contiguously are merged, so a row-major chunk
/// landing in whole rows of its destination is one copy, and a `Shard(1)` chunk is one copy with pitches. An empty
/// read yields no copies. All arithmetic is checked: a read whose byte offsets would overflow is refused.
///
/// The caller checks that the source storage holds [`Copies::shape`]'s extent (see [`source_extent`]) and that
/// the destination holds `dst_sizes`.
pub fn lower(layout: &StoredLayout, read: &ChunkRead, dst_sizes: &[u64]) -> Result<Copies, LowerError> {
  let n = read.lengths.len();
  if layout.stride.len() != n
    || dst_sizes.len() != n
    || read.src_start.len() != n
    || read.dst_start.len() != n
  {
    return Err(LowerError::Rank { read: n, layout: layout.stride.len(), dst: dst_sizes.len() });
  }
  let ov = LowerError::Overflow;
  let es = layout.elem_size;
  let dst_strides = row_major_strides(dst_sizes).ok_or(ov.clone())?;
  let mut src_base = layout.storage_offset;
  let mut dst_base = 0u64;
  let mut dims: Vec<Dim> = Vec::with_capacity(n);
  for (d, &len) in read.lengths.iter().enumerate() {
    let (src, dst) = (layout.stride[d], dst_strides[d]);
    src_base = read.src_start[d].checked_mul(src).and_then(|x| x.checked_add(src_base)).ok_or(ov.clone())?;
    dst_base = read.dst_start[d].checked_mul(dst).and_then(|x| x.checked_add(dst_base)).ok_or(ov.clone())?;
    if len != 1 {
      dims.push(Dim { len, src, dst });
    }
  }
  let empty = dims.iter().any(|d| d.len == 0);
  // merge an outer dim into the inner one when both sides step through it contiguously
  let mut merged: Vec<Dim> = Vec::with_capacity(dims.len());
  for d in dims.into_iter().rev() {
    match merged.last_mut() {
      Some(inner)
        if inner.src.checked_mul(inner.len) == Some(d.src)
          && inner.dst.checked_mul(inner.len) == Some(d.dst) =>
      {
        inner.len = inner.len.checked_mul(d.len).ok_or(ov.clone())?
      }
      _ => merged.push(d),
    }
  }
  merged.reverse();
  // innermost contiguous run → width; the next dim out → rows of the 2-D copy
  let width_elems = match merged.last() {
    Some(inner) if inner.src == 1 && inner.dst == 1 => {
      let len = inner.len;
      merged.pop();
      len
    }
    _ => 1,
  };
  let (height, src_pitch, dst_pitch) = match merged.pop() {
    Some(d) => (d.len, d.src, d.dst),
    None => (1, 0, 0),
  };
  let to_bytes = |x: u64| x.checked_mul(es).ok_or(LowerError::Overflow);
  // the largest offset any copy reaches must fit, so the iterator's unchecked sums cannot overflow
  let mut src_max = src_base;
  let mut dst_max = dst_base;
  if !empty {
    for d in merged.iter().chain([Dim { len: height, src: src_pitch, dst: dst_pitch }].iter()) {
      let steps = d.len - 1;
      src_max = steps.checked_mul(d.src).and_then(|x| x.checked_add(src_max)).ok_or(ov.clone())?;
      dst_max = steps.checked_mul(d.dst).and_then(|x| x.checked_add(dst_max)).ok_or(ov.clone())?;
    }
    to_bytes(src_max.checked_add(width_elems).ok_or(ov.clone())?)?;
    to_bytes(dst_max.checked_add(width_elems).ok_or(ov.clone())?)?;
  }
  let template = Copy2D {
    src: 0,
    dst: 0,
    src_pitch: to_bytes(src_pitch)?,
    dst_pitch: to_bytes(dst_pitch)?,
    width: to_bytes(width_elems)?,
    height,
  };
  Ok(Copies {
    index: vec![0; merged.len()],
    outer: merged,
    src_base,
    dst_base,
    elem_size: es,
    template,
    done: empty,
  })
}

/// The byte range of the storage that `copies` read: `[first, end)`, or `None` for no copies. Computed without
/// walking the copies.
pub fn source_extent(copies: &Copies) -> Option<(u64, u64)> {
  if copies.done {
    return None;
  }
  let es = copies.elem_size;
  let first = copies.src_base * es;
  let mut last = copies.src_base;
  for d in &copies.outer {
    last += (d.len - 1) * d.src;
  }
  let t = &copies.template;
  Some((first, last * es + (t.height - 1) * t.src_pitch + t.width))
}

/// An executor that moves bytes from host staging slots to a destination address space (device memory for
/// CUDA, host memory standing in for it in tests). A reader thread owns one: it fills a slot from disk or from a
/// host read, queues the slot's [`Copy2D`]s with [`StagedExecutor::upload`], and fills the other slot while
/// those copies run. Copies' `src` offsets are relative to the slot's start, `dst` offsets relative to `dst_base`.
pub trait StagedExecutor {
  /// Why a slot could not be lent or an upload failed.
  type Error;

  /// Number of staging slots (two for double buffering).
  fn slot_count(&self) -> usize;

  /// Bytes in each slot.
  fn slot_len(&self) -> usize;

  /// Waits until the uploads queued from slot `slot` have finished reading it, then lends it for filling.
  fn slot(&mut self, slot: usize) -> Result<&mut [u8], Self::Error>;

  /// Queues `copies` from slot `slot` to the destination that starts at address `dst_base`. May return before
  /// the bytes have moved; the slot is not lent again until they have.
  fn upload(&mut self, slot: usize, dst_base: u64, copies: &[Copy2D]) -> Result<(), Self::Error>;

  /// Waits until every queued upload has landed.
  fn finish(&mut self) -> Result<(), Self::Error>;
}

#[cfg(test)]
mod tests {
  use super::*;

  fn layout(stride: &[u64], offset: u64, es: u64) -> StoredLayout {
    StoredLayout { stride: stride.to_vec(), storage_offset: offset, elem_size: es }
  }

  fn read(src: &[u64], dst: &[u64], len: &[u64]) -> ChunkRead {
    ChunkRead { chunk: 0, src_start: src.to_vec(), dst_start: dst.to_vec(), lengths: len.to_vec() }
  }

  #[test]
  fn row_major_chunk_into_whole_rows_is_one_copy() {
    let c: Vec<_> =
      lower(&layout(&[4, 1], 0, 2), &read(&[0, 0], &[3, 0], &[5, 4]), &[10, 4]).unwrap().collect();
    assert_eq!(c, vec![Copy2D { src: 0, src_pitch: 0, dst: 24, dst_pitch: 0, width: 40, height: 1 }]);
  }

  #[test]
  fn shard1_chunk_is_one_pitched_copy() {
    // chunk [3, 4] of a [3, 8] tensor at column 4
    let c: Vec<_> =
      lower(&layout(&[4, 1], 0, 4), &read(&[0, 0], &[0, 4], &[3, 4]), &[3, 8]).unwrap().collect();
    assert_eq!(c, vec![Copy2D { src: 0, src_pitch: 16, dst: 16, dst_pitch: 32, width: 16, height: 3 }]);
    let c = lower(&layout(&[8, 1], 0, 4), &read(&[0, 4], &[0, 0], &[3, 4]), &[3, 4]).unwrap();
    assert!(c.is_ascending());
  }

  #[test]
  fn transposed_storage_copies_elements_with_pitches() {
    // x.t(): shape (3,2) stride (1,3)
    let mut c = lower(&layout(&[1, 3], 0, 4), &read(&[0, 0], &[0, 0], &[3, 2]), &[3, 2]).unwrap();
    assert_eq!(c.copy_count(), 3);
    assert!(!c.is_ascending());
    assert_eq!(source_extent(&c), Some((0, 24)));
    assert_eq!(c.next(), Some(Copy2D { src: 0, src_pitch: 12, dst: 0, dst_pitch: 4, width: 4, height: 2 }));
    assert_eq!(c.next(), Some(Copy2D { src: 4, src_pitch: 12, dst: 8, dst_pitch: 4, width: 4, height: 2 }));
    assert_eq!(c.next(), Some(Copy2D { src: 8, src_pitch: 12, dst: 16, dst_pitch: 4, width: 4, height: 2 }));
    assert_eq!(c.next(), None);
  }

  #[test]
  fn zero_dim_and_empty() {
    let c: Vec<_> = lower(&layout(&[], 2, 4), &read(&[], &[], &[]), &[]).unwrap().collect();
    assert_eq!(c, vec![Copy2D { src: 8, src_pitch: 0, dst: 0, dst_pitch: 0, width: 4, height: 1 }]);
    let c = lower(&layout(&[1], 0, 4), &read(&[0], &[0], &[0]), &[0]).unwrap();
    assert_eq!(c.copy_count(), 0);
    assert_eq!(source_extent(&c), None);
  }

  #[test]
  fn overflow_is_refused() {
    let r = lower(&layout(&[u64::MAX / 2, 1], 0, 4), &read(&[0, 0], &[0, 0], &[3, 2]), &[3, 2]);
    assert_eq!(r.err(), Some(LowerError::Overflow));
    let r = lower(&layout(&[1], 0, 4), &read(&[0], &[0], &[3]), &[3, 1]);
    assert!(matches!(r, Err(LowerError::Rank { .. })));
  }
}
