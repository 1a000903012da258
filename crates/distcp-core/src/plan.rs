//! Read planning: which part of which stored chunk lands where in a requested box. Pure data, computed from
//! `.metadata` alone, so it can be checked (and printed) without touching tensor bytes.

use crate::metadata::{Chunk, TensorMetadata};

/// A box of a tensor in global coordinates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Region {
  /// Where the box starts, per dimension.
  pub offsets: Vec<u64>,
  /// The box's extent per dimension.
  pub sizes: Vec<u64>,
}

impl Region {
  /// The box covering a whole tensor of `shape`.
  pub fn whole(shape: &[u64]) -> Region {
    Region { offsets: vec![0; shape.len()], sizes: shape.to_vec() }
  }

  /// Elements in the box, or `None` when the count overflows 64 bits.
  pub fn numel(&self) -> Option<u64> {
    crate::limits::checked_numel(&self.sizes)
  }
}

/// Copy `lengths` elements per dimension from `chunk` (starting at `src_start`, chunk-local) to the requested
/// region (starting at `dst_start`, region-local).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkRead {
  /// Index of the chunk in [`TensorMetadata::chunks`].
  pub chunk: usize,
  /// First element to copy, in the chunk's coordinates.
  pub src_start: Vec<u64>,
  /// Where it lands, in the requested region's coordinates.
  pub dst_start: Vec<u64>,
  /// Elements to copy per dimension.
  pub lengths: Vec<u64>,
}

impl ChunkRead {
  /// Elements copied; a read planned inside a checked region never saturates.
  pub fn numel(&self) -> u64 {
    crate::limits::checked_numel(&self.lengths).unwrap_or(u64::MAX)
  }
}

/// Checks that `region` lies inside a tensor of `shape`; the error says how it does not.
pub fn check_region(shape: &[u64], region: &Region) -> Result<(), String> {
  if region.offsets.len() != shape.len() || region.sizes.len() != shape.len() {
    return Err(format!(
      "the tensor has {} dimensions, the requested box has offsets {:?} and sizes {:?}",
      shape.len(),
      region.offsets,
      region.sizes
    ));
  }
  for (d, ((&o, &s), &n)) in region.offsets.iter().zip(&region.sizes).zip(shape).enumerate() {
    if o.checked_add(s).is_none_or(|end| end > n) {
      return Err(format!(
        "the requested box {o}..{} in dimension {d} exceeds the size {n}",
        o.saturating_add(s)
      ));
    }
  }
  Ok(())
}

fn overlap(chunk: &Chunk, region: &Region) -> Option<ChunkRead> {
  let dims = region.offsets.len();
  let mut read = ChunkRead {
    chunk: 0,
    src_start: Vec::with_capacity(dims),
    dst_start: Vec::with_capacity(dims),
    lengths: Vec::with_capacity(dims),
  };
  for d in 0..dims {
    let (c0, c1) = (chunk.offsets[d], chunk.offsets[d].saturating_add(chunk.sizes[d]));
    let (r0, r1) = (region.offsets[d], region.offsets[d] + region.sizes[d]);
    let (lo, hi) = (c0.max(r0), c1.min(r1));
    if lo >= hi {
      return None; // also drops zero-size chunks, whose offsets may be out of range (torch ≥ 2.8)
    }
    read.src_start.push(lo - c0);
    read.dst_start.push(lo - r0);
    read.lengths.push(hi - lo);
  }
  Some(read)
}

/// Every (chunk, sub-box) that contributes to `region`. Chunks that do not overlap it are never read.
pub fn plan_region(tensor: &TensorMetadata, region: &Region) -> Vec<ChunkRead> {
  let mut reads = Vec::new();
  for (i, chunk) in tensor.chunks.iter().enumerate() {
    if let Some(mut r) = overlap(chunk, region) {
      r.chunk = i;
      reads.push(r);
    }
  }
  reads
}

#[cfg(test)]
mod tests {
  use super::*;
  use crate::dtype::DType;
  use crate::metadata::TensorProperties;

  fn tensor(size: &[u64], chunks: &[(&[u64], &[u64])]) -> TensorMetadata {
    TensorMetadata {
      properties: TensorProperties {
        dtype: DType::Float32,
        requires_grad: false,
        pin_memory: false,
        module: String::new(),
      },
      size: size.to_vec(),
      chunks: chunks.iter().map(|(o, s)| Chunk { offsets: o.to_vec(), sizes: s.to_vec() }).collect(),
    }
  }

  #[test]
  fn shard_on_dim1_box_spanning_both() {
    let t = tensor(&[3, 8], &[(&[0, 0], &[3, 4]), (&[0, 4], &[3, 4])]);
    let r = Region { offsets: vec![1, 2], sizes: vec![2, 4] };
    let plan = plan_region(&t, &r);
    assert_eq!(
      plan,
      vec![
        ChunkRead { chunk: 0, src_start: vec![1, 2], dst_start: vec![0, 0], lengths: vec![2, 2] },
        ChunkRead { chunk: 1, src_start: vec![1, 0], dst_start: vec![0, 2], lengths: vec![2, 2] },
      ]
    );
    assert_eq!(Some(plan.iter().map(ChunkRead::numel).sum::<u64>()), r.numel());
  }

  #[test]
  fn untouched_and_empty_chunks_are_skipped() {
    // an empty shard whose offset equals the dim size, as torch ≥ 2.8 writes it
    let t = tensor(&[5, 3], &[(&[0, 0], &[3, 3]), (&[3, 0], &[2, 3]), (&[5, 0], &[0, 3])]);
    let plan = plan_region(&t, &Region { offsets: vec![0, 0], sizes: vec![2, 3] });
    assert_eq!(plan.len(), 1);
    assert_eq!(plan[0].chunk, 0);
    let plan = plan_region(&t, &Region::whole(&[5, 3]));
    assert_eq!(plan.len(), 2);
  }

  #[test]
  fn zero_dim() {
    let t = tensor(&[], &[(&[], &[])]);
    let plan = plan_region(&t, &Region::whole(&[]));
    assert_eq!(plan, vec![ChunkRead { chunk: 0, src_start: vec![], dst_start: vec![], lengths: vec![] }]);
    assert_eq!(plan[0].numel(), 1);
  }

  #[test]
  fn region_checks() {
    assert!(check_region(&[4, 4], &Region { offsets: vec![2, 0], sizes: vec![3, 4] }).is_err());
    assert!(check_region(&[4, 4], &Region { offsets: vec![0], sizes: vec![4] }).is_err());
    assert!(check_region(&[4, 4], &Region { offsets: vec![u64::MAX, 0], sizes: vec![2, 4] }).is_err());
    assert!(check_region(&[4, 4], &Region { offsets: vec![1, 1], sizes: vec![3, 3] }).is_ok());
  }
}
