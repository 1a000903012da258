//! Element casts between floating dtypes, bit-identical to torch's CPU `.to()`: round to nearest, ties to even
//! (`c10::BFloat16` / `c10::Half`). NaN follows torch's vectorised kernels, which convert all but a tensor's
//! last few elements: bf16 NaN is 0xFFFF, f16 NaN keeps sign and top payload bits with the quiet bit set (F16C
//! `vcvtps2ph`). torch's scalar tail loop encodes NaN differently (0x7FC0, 0x7E00), so a NaN among the last
//! elements of a tensor may differ from torch in its payload bits; it is still a NaN.

use crate::dtype::DType;

pub fn is_float(d: DType) -> bool {
  matches!(d, DType::Float64 | DType::Float32 | DType::Float16 | DType::BFloat16)
}

/// torch's `round_to_nearest_even` (c10/util/BFloat16.h).
pub fn f32_to_bf16(f: f32) -> u16 {
  if f.is_nan() {
    return 0xFFFF;
  }
  let u = f.to_bits();
  let rounding_bias = ((u >> 16) & 1) + 0x7FFF;
  (u.wrapping_add(rounding_bias) >> 16) as u16
}

pub fn bf16_to_f32(b: u16) -> f32 {
  f32::from_bits(u32::from(b) << 16)
}

/// torch's `fp16_ieee_from_fp32_value` (c10/util/Half.h) for numbers; NaN as the F16C instruction converts it.
pub fn f32_to_f16(f: f32) -> u16 {
  if f.is_nan() {
    let w = f.to_bits();
    return (((w >> 16) & 0x8000) | 0x7E00 | ((w >> 13) & 0x03FF)) as u16;
  }
  let scale_to_inf = f32::from_bits(0x7780_0000); // 2^112
  let scale_to_zero = f32::from_bits(0x0880_0000); // 2^-110
  let mut base = (f.abs() * scale_to_inf) * scale_to_zero;
  let w = f.to_bits();
  let shl1_w = w.wrapping_add(w);
  let sign = w & 0x8000_0000;
  let mut bias = shl1_w & 0xFF00_0000;
  if bias < 0x7100_0000 {
    bias = 0x7100_0000;
  }
  base += f32::from_bits((bias >> 1) + 0x0780_0000);
  let bits = base.to_bits();
  let exp_bits = (bits >> 13) & 0x0000_7C00;
  let mantissa_bits = bits & 0x0000_0FFF;
  let nonsign = exp_bits + mantissa_bits;
  ((sign >> 16) | if shl1_w > 0xFF00_0000 { 0x7E00 } else { nonsign }) as u16
}

/// torch's `fp16_ieee_to_fp32_value` (exact).
pub fn f16_to_f32(h: u16) -> f32 {
  let w = u32::from(h) << 16;
  let sign = w & 0x8000_0000;
  let two_w = w.wrapping_add(w);
  let exp_offset = 0xE0u32 << 23;
  let exp_scale = f32::from_bits(0x0780_0000); // 2^-112
  let normalized = f32::from_bits((two_w >> 4) + exp_offset) * exp_scale;
  let magic_mask = 126u32 << 23;
  let magic_bias = 0.5f32;
  let denormalized = f32::from_bits((two_w >> 17) | magic_mask) - magic_bias;
  let denormalized_cutoff = 1u32 << 27;
  let result = sign | if two_w < denormalized_cutoff { denormalized.to_bits() } else { normalized.to_bits() };
  f32::from_bits(result)
}

fn read_f32(src: &[u8], from: DType, i: usize) -> f32 {
  match from {
    DType::Float32 => f32::from_le_bytes([src[4 * i], src[4 * i + 1], src[4 * i + 2], src[4 * i + 3]]),
    DType::BFloat16 => bf16_to_f32(u16::from_le_bytes([src[2 * i], src[2 * i + 1]])),
    DType::Float16 => f16_to_f32(u16::from_le_bytes([src[2 * i], src[2 * i + 1]])),
    _ => {
      let mut b = [0u8; 8];
      b.copy_from_slice(&src[8 * i..8 * i + 8]);
      f64::from_le_bytes(b) as f32
    }
  }
}

/// Casts `src` (elements of `from`) into `dst` (elements of `to`); both floating dtypes, same element count.
/// float64 goes through float32 first, as torch's `static_cast<BFloat16>(double)` does.
pub fn cast(src: &[u8], from: DType, dst: &mut [u8], to: DType) {
  let n = src.len() / from.size();
  if from == to {
    dst.copy_from_slice(src);
    return;
  }
  match to {
    DType::BFloat16 => {
      // torch converts float16 → bfloat16 with the scalar rule (NaN → 0x7FC0), seen against torch 2.15
      let nan = if from == DType::Float16 { 0x7FC0u16 } else { 0xFFFF };
      for i in 0..n {
        let v = read_f32(src, from, i);
        let b = if v.is_nan() { nan } else { f32_to_bf16(v) };
        dst[2 * i..2 * i + 2].copy_from_slice(&b.to_le_bytes());
      }
    }
    DType::Float16 => {
      for i in 0..n {
        dst[2 * i..2 * i + 2].copy_from_slice(&f32_to_f16(read_f32(src, from, i)).to_le_bytes());
      }
    }
    DType::Float32 => {
      for i in 0..n {
        dst[4 * i..4 * i + 4].copy_from_slice(&read_f32(src, from, i).to_le_bytes());
      }
    }
    _ => {
      for i in 0..n {
        dst[8 * i..8 * i + 8].copy_from_slice(&f64::from(read_f32(src, from, i)).to_le_bytes());
      }
    }
  }
}

/// [`cast`] split over threads in fixed-size blocks.
pub fn cast_parallel(src: &[u8], from: DType, dst: &mut [u8], to: DType) {
  const BLOCK_ELEMS: usize = 1 << 20;
  let n = src.len() / from.size();
  let threads = std::thread::available_parallelism().map_or(1, |p| p.get());
  if n < 2 * BLOCK_ELEMS || threads == 1 {
    cast(src, from, dst, to);
    return;
  }
  let per = n.div_ceil(threads).max(BLOCK_ELEMS);
  std::thread::scope(|s| {
    for (sc, dc) in src.chunks(per * from.size()).zip(dst.chunks_mut(per * to.size())) {
      s.spawn(move || cast(sc, from, dc, to));
    }
  });
}

#[cfg(test)]
mod tests {
  use super::*;

  #[test]
  fn bf16_rounds_to_nearest_even() {
    assert_eq!(f32_to_bf16(1.0), 0x3F80);
    // 1 + 2^-8 is exactly halfway between bf16 1.0 and the next value: ties to even (1.0)
    assert_eq!(f32_to_bf16(f32::from_bits(0x3F80_8000)), 0x3F80);
    // one ulp above halfway rounds up
    assert_eq!(f32_to_bf16(f32::from_bits(0x3F80_8001)), 0x3F81);
    // halfway with an odd lower bit rounds up to even
    assert_eq!(f32_to_bf16(f32::from_bits(0x3F81_8000)), 0x3F82);
    assert_eq!(f32_to_bf16(f32::NAN), 0xFFFF);
    assert_eq!(f32_to_bf16(f32::INFINITY), 0x7F80);
  }

  #[test]
  fn f16_round_trip_and_rounding() {
    for h in [0u16, 0x3C00, 0xBC00, 0x0001, 0x03FF, 0x7BFF, 0x7C00, 0xFC00] {
      assert_eq!(f32_to_f16(f16_to_f32(h)), h, "{h:#x}");
    }
    assert_eq!(f32_to_f16(65520.0), 0x7C00); // rounds to inf
    assert_eq!(f32_to_f16(1.0 + f32::EPSILON), 0x3C00);
    assert_eq!(f32_to_f16(f32::NAN) & 0x7E00, 0x7E00);
  }
}
