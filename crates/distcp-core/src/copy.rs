//! Executes one [`ChunkRead`]: copies a box out of a stored (possibly permuted) tensor into a row-major
//! destination, one `memcpy` per contiguous run.

use crate::dtype::DType;
use crate::exec::{lower, StoredLayout};
use crate::plan::ChunkRead;
use crate::torch_save::TensorRecord;

/// Where a chunk's storage bytes come from: a slice (mapped or decompressed), or a file read with `pread`.
pub trait RunSource {
  /// Copies `out.len()` bytes that start at byte `offset` of the storage into `out`.
  fn copy_run(&self, offset: usize, out: &mut [u8]) -> std::io::Result<()>;
}

impl RunSource for [u8] {
  fn copy_run(&self, offset: usize, out: &mut [u8]) -> std::io::Result<()> {
    out.copy_from_slice(&self[offset..offset + out.len()]);
    Ok(())
  }
}

/// Copies `read` from `storage` (the record's whole storage) into `dst`, a row-major buffer of `dst_sizes`.
/// The caller has checked that the record's view fits its storage and that `dst` holds `dst_sizes` elements.
/// The stride rules live in [`crate::exec::lower`]; this is the host executor of its copies.
pub fn copy_chunk<S: RunSource + ?Sized>(
  storage: &S,
  rec: &TensorRecord,
  read: &ChunkRead,
  dst: &mut [u8],
  dst_sizes: &[u64],
) -> std::io::Result<()> {
  let layout = StoredLayout {
    stride: rec.stride.clone(),
    storage_offset: rec.storage_offset,
    elem_size: rec.dtype.size() as u64,
  };
  let copies = lower(&layout, read, dst_sizes).map_err(std::io::Error::other)?;
  let fix = Fixup::of(rec);
  for c in copies {
    let width = c.width as usize;
    for row in 0..c.height {
      let (s, t) = ((c.src + row * c.src_pitch) as usize, (c.dst + row * c.dst_pitch) as usize);
      let dst_len = dst.len();
      let out = dst.get_mut(t..t + width).ok_or_else(|| {
        std::io::Error::other(format!("destination too small: bytes {t}..{} of {dst_len}", t + width))
      })?;
      storage.copy_run(s, out)?;
      if let Some(f) = &fix {
        f.apply(out);
      }
    }
  }
  Ok(())
}

/// What must happen to stored bytes to give the values torch would show: byte order, lazy conj/neg bits.
struct Fixup {
  dtype: DType,
  swap: bool,
  conj: bool,
  neg: bool,
}

impl Fixup {
  fn of(rec: &TensorRecord) -> Option<Fixup> {
    (rec.big_endian || rec.conj || rec.neg).then_some(Fixup {
      dtype: rec.dtype,
      swap: rec.big_endian,
      conj: rec.conj,
      neg: rec.neg,
    })
  }

  fn apply(&self, bytes: &mut [u8]) {
    if self.swap {
      let unit = self.dtype.swap_unit();
      if unit > 1 {
        for u in bytes.chunks_exact_mut(unit) {
          u.reverse();
        }
      }
    }
    let es = self.dtype.size();
    let is_float = matches!(
      self.dtype,
      DType::Float64
        | DType::Float32
        | DType::Float16
        | DType::BFloat16
        | DType::Float8E4M3Fn
        | DType::Float8E5M2
        | DType::Complex128
        | DType::Complex64
        | DType::Complex32
    );
    for e in bytes.chunks_exact_mut(es) {
      if self.dtype.is_complex() {
        let half = es / 2;
        if self.neg {
          e[half - 1] ^= 0x80;
        }
        if self.neg != self.conj {
          e[es - 1] ^= 0x80;
        }
      } else if self.neg && is_float {
        e[es - 1] ^= 0x80;
      } else if self.neg {
        negate_int(e);
      }
    }
  }
}

fn negate_int(e: &mut [u8]) {
  // two's complement: invert and add one, little-endian
  let mut carry = true;
  for b in e.iter_mut() {
    *b = !*b;
    if carry {
      let (v, c) = b.overflowing_add(1);
      *b = v;
      carry = c;
    }
  }
}

#[cfg(test)]
mod tests {
  use super::*;

  fn rec(shape: &[u64], stride: &[u64], offset: u64, storage_len: usize) -> TensorRecord {
    TensorRecord {
      dtype: DType::Int32,
      shape: shape.to_vec(),
      stride: stride.to_vec(),
      storage_offset: offset,
      storage: 0..storage_len * 4,
      big_endian: false,
      conj: false,
      neg: false,
    }
  }

  fn i32s(v: &[i32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
  }

  fn read_i32(b: &[u8]) -> Vec<i32> {
    b.chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
  }

  #[test]
  fn transposed_storage_reads_as_torch_shows_it() {
    // x = arange(6).reshape(2,3); y = x.t() → shape (3,2), stride (1,3), storage 0..6
    let storage = i32s(&[0, 1, 2, 3, 4, 5]);
    let r = rec(&[3, 2], &[1, 3], 0, 6);
    let read = ChunkRead { chunk: 0, src_start: vec![0, 0], dst_start: vec![0, 0], lengths: vec![3, 2] };
    let mut dst = vec![0u8; 24];
    copy_chunk(&storage[..], &r, &read, &mut dst, &[3, 2]).unwrap();
    assert_eq!(read_i32(&dst), vec![0, 3, 1, 4, 2, 5]);
  }

  #[test]
  fn sub_box_into_a_larger_destination() {
    // chunk 2x3 row-major copied into the right half of a 2x6 destination
    let storage = i32s(&[1, 2, 3, 4, 5, 6]);
    let r = rec(&[2, 3], &[3, 1], 0, 6);
    let read = ChunkRead { chunk: 0, src_start: vec![0, 1], dst_start: vec![0, 3], lengths: vec![2, 2] };
    let mut dst = vec![0u8; 48];
    copy_chunk(&storage[..], &r, &read, &mut dst, &[2, 6]).unwrap();
    assert_eq!(read_i32(&dst), vec![0, 0, 0, 2, 3, 0, 0, 0, 0, 5, 6, 0]);
  }

  #[test]
  fn storage_offset_and_zero_dim() {
    let storage = i32s(&[9, 8, 7]);
    let r = rec(&[], &[], 2, 3);
    let read = ChunkRead { chunk: 0, src_start: vec![], dst_start: vec![], lengths: vec![] };
    let mut dst = vec![0u8; 4];
    copy_chunk(&storage[..], &r, &read, &mut dst, &[]).unwrap();
    assert_eq!(read_i32(&dst), vec![7]);
  }

  #[test]
  fn big_endian_and_neg() {
    let storage: Vec<u8> = [5i32, -7].iter().flat_map(|x| x.to_be_bytes()).collect();
    let mut r = rec(&[2], &[1], 0, 2);
    r.big_endian = true;
    r.neg = true;
    let read = ChunkRead { chunk: 0, src_start: vec![0], dst_start: vec![0], lengths: vec![2] };
    let mut dst = vec![0u8; 8];
    copy_chunk(&storage[..], &r, &read, &mut dst, &[2]).unwrap();
    assert_eq!(read_i32(&dst), vec![-5, 7]);
  }
}
