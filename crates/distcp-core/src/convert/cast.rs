//! Element casts between floating dtypes, bit-identical to torch's CPU `.to()`: round to nearest, ties to even
//! (`c10::BFloat16` / `c10::Half`). NaN follows torch's vectorised kernels, which convert all but a tensor's
//! last few elements: bf16 NaN is 0xFFFF, f16 NaN keeps sign and top payload bits with the quiet bit set (F16C
//! `vcvtps2ph`). torch's scalar tail loop encodes NaN differently (0x7FC0, 0x7E00), so a NaN among the last
//! elements of a tensor may differ from torch in its payload bits; it is still a NaN.
//!
//! fp8 (`float8_e4m3fn`, `float8_e5m2`) follows torch 2.15's `c10/util/Float8_*.h` and its vectorised copies,
//! which agree with each other: every cast goes through float32. Into e4m3fn a finite overflow or an infinity
//! saturates to ±448 (0x7E/0xFE; torch ≥ 2.15, older releases produced NaN) and NaN becomes 0x7F with its sign;
//! into e5m2 an overflow becomes ±inf and NaN 0x7F with its sign. Out of fp8 a NaN becomes 0x7FC0 in bf16 and, in
//! float32, keeps its payload with the quiet bit set (the F16C widening torch's kernels use for e5m2).

use crate::dtype::DType;

/// torch's `fp8e4m3fn_from_fp32_value` (torch 2.15: saturating), written as the header writes it.
#[cfg(test)]
pub fn f32_to_e4m3fn(f: f32) -> u8 {
  let mut bits = f.to_bits();
  let sign = bits & 0x8000_0000;
  bits ^= sign;
  let result = if bits >= 1087 << 20 {
    if bits > 0x7F80_0000 {
      0x7F
    } else {
      0x7E
    }
  } else if bits < 121 << 23 {
    let denorm_mask = 141u32 << 23;
    (f32::from_bits(bits) + f32::from_bits(denorm_mask)).to_bits().wrapping_sub(denorm_mask) as u8
  } else {
    let mant_odd = (bits >> 20) & 1;
    let r = (bits.wrapping_add(((7i32 - 127) as u32) << 23).wrapping_add(0x7FFFF).wrapping_add(mant_odd)
      >> 20) as u8;
    if r == 0x7F {
      0x7E
    } else {
      r
    }
  };
  result | (sign >> 24) as u8
}

/// torch's `fp8e5m2_from_fp32_value`, written as the header writes it.
#[cfg(test)]
pub fn f32_to_e5m2(f: f32) -> u8 {
  let mut bits = f.to_bits();
  let sign = bits & 0x8000_0000;
  bits ^= sign;
  let result = if bits >= 143 << 23 {
    if bits > 0x7F80_0000 {
      0x7F
    } else {
      0x7C
    }
  } else if bits < 113 << 23 {
    let denorm_mask = 134u32 << 23;
    (f32::from_bits(bits) + f32::from_bits(denorm_mask)).to_bits().wrapping_sub(denorm_mask) as u8
  } else {
    let mant_odd = (bits >> 21) & 1;
    (bits.wrapping_add(((15i32 - 127) as u32) << 23).wrapping_add(0xFFFFF).wrapping_add(mant_odd) >> 21) as u8
  };
  result | (sign >> 24) as u8
}

/// torch's `fp8e4m3fn_to_fp32_value` (exact; NaN 0x7F becomes 0x7FF00000 with the sign).
pub const fn e4m3fn_to_f32_bits(b: u8) -> u32 {
  let w = (b as u32) << 24;
  let sign = w & 0x8000_0000;
  let nonsign = w & 0x7FFF_FFFF;
  let lz = nonsign.leading_zeros();
  let renorm_shift = lz.saturating_sub(4);
  let inf_nan_mask = ((nonsign.wrapping_add(0x0100_0000) as i32) >> 8) as u32 & 0x7F80_0000;
  let zero_mask = (nonsign.wrapping_sub(1) as i32 >> 31) as u32;
  sign
    | ((((nonsign << renorm_shift) >> 4).wrapping_add((0x78 - renorm_shift) << 23) | inf_nan_mask)
      & !zero_mask)
}

/// e5m2 is the top byte of a float16; widened as the F16C instruction torch's kernels use does (exact for
/// numbers, NaN quieted).
pub const fn e5m2_to_f32_bits(b: u8) -> u32 {
  let h = (b as u32) << 8;
  let sign = (h & 0x8000) << 16;
  let exp = (h >> 10) & 0x1F;
  let mant = h & 0x3FF;
  if exp == 0x1F {
    // infinity, or NaN with the quiet bit forced
    sign | 0x7F80_0000 | (mant << 13) | if mant != 0 { 0x0040_0000 } else { 0 }
  } else if exp == 0 {
    if mant == 0 {
      sign
    } else {
      // subnormal: mant · 2^-24, normalised (mant has at most 10 significant bits)
      let shift = mant.leading_zeros() - 21; // brings the leading 1 to bit 10
      let m = (mant << shift) & 0x3FF;
      sign | ((127 - 15 + 1 - shift) << 23) | (m << 13)
    }
  } else {
    sign | ((exp + 127 - 15) << 23) | (mant << 13)
  }
}

const fn fp8_table(e4m3: bool) -> [u32; 256] {
  let mut t = [0u32; 256];
  let mut i = 0;
  while i < 256 {
    t[i] = if e4m3 { e4m3fn_to_f32_bits(i as u8) } else { e5m2_to_f32_bits(i as u8) };
    i += 1;
  }
  t
}

/// Widening an fp8 byte is a table lookup: 256 entries, computed once by the definitions above.
static E4M3FN_F32: [u32; 256] = fp8_table(true);
static E5M2_F32: [u32; 256] = fp8_table(false);

/// torch's `round_to_nearest_even` (c10/util/BFloat16.h).
pub fn f32_to_bf16(f: f32) -> u16 {
  if f.is_nan() {
    return 0xFFFF;
  }
  let u = f.to_bits();
  let rounding_bias = ((u >> 16) & 1) + 0x7FFF;
  (u.wrapping_add(rounding_bias) >> 16) as u16
}

#[cfg(test)]
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
#[cfg(test)]
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

#[cfg(test)]
fn read_f32(src: &[u8], from: DType, i: usize) -> f32 {
  match from {
    DType::Float32 => f32::from_le_bytes([src[4 * i], src[4 * i + 1], src[4 * i + 2], src[4 * i + 3]]),
    DType::BFloat16 => bf16_to_f32(u16::from_le_bytes([src[2 * i], src[2 * i + 1]])),
    DType::Float16 => f16_to_f32(u16::from_le_bytes([src[2 * i], src[2 * i + 1]])),
    DType::Float8E4M3Fn => f32::from_bits(e4m3fn_to_f32_bits(src[i])),
    DType::Float8E5M2 => {
      // the top byte of a float16, widened with the quiet bit forced on NaN (F16C)
      let v = f16_to_f32(u16::from(src[i]) << 8);
      if v.is_nan() {
        f32::from_bits(v.to_bits() | 0x0040_0000)
      } else {
        v
      }
    }
    _ => {
      let mut b = [0u8; 8];
      b.copy_from_slice(&src[8 * i..8 * i + 8]);
      f64::from_le_bytes(b) as f32
    }
  }
}

/// The element-at-a-time definition of [`cast`]: the reference the vectorised kernels are tested against.
#[cfg(test)]
fn cast_reference(src: &[u8], from: DType, dst: &mut [u8], to: DType) {
  let n = src.len() / from.size();
  if from == to {
    dst.copy_from_slice(src);
    return;
  }
  match to {
    DType::BFloat16 => {
      // torch converts float16 and fp8 → bfloat16 with the scalar rule (NaN → 0x7FC0), seen against torch 2.15
      let nan = if matches!(from, DType::Float16 | DType::Float8E4M3Fn | DType::Float8E5M2) {
        0x7FC0u16
      } else {
        0xFFFF
      };
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
    DType::Float8E4M3Fn => {
      for (i, y) in dst.iter_mut().enumerate().take(n) {
        *y = f32_to_e4m3fn(read_f32(src, from, i));
      }
    }
    DType::Float8E5M2 => {
      for (i, y) in dst.iter_mut().enumerate().take(n) {
        *y = f32_to_e5m2(read_f32(src, from, i));
      }
    }
    _ => {
      for i in 0..n {
        dst[8 * i..8 * i + 8].copy_from_slice(&f64::from(read_f32(src, from, i)).to_le_bytes());
      }
    }
  }
}

// ---- vectorised kernels. The same rules as above, written without early returns and without a per-element
// dtype match, one loop per dtype pair, so the compiler turns each into SIMD code (bit operations, integer adds,
// float multiplies: no reordering of float arithmetic is involved, so the result is the same bit for bit).

/// Applies `f` to every element: `A`-byte elements of `src` into `B`-byte elements of `dst` (little-endian
/// arrays, so the loop has no bounds checks or per-element length logic left for the compiler to keep scalar).
#[inline(always)]
fn map<const A: usize, const B: usize>(src: &[u8], dst: &mut [u8], f: impl Fn([u8; A]) -> [u8; B]) {
  let (s, _) = src.as_chunks::<A>();
  let (d, _) = dst.as_chunks_mut::<B>();
  for (x, y) in s.iter().zip(d.iter_mut()) {
    *y = f(*x);
  }
}

#[inline(always)]
fn h(b: [u8; 2]) -> u16 {
  u16::from_le_bytes(b)
}

#[inline(always)]
fn f(b: [u8; 4]) -> f32 {
  f32::from_le_bytes(b)
}

#[inline(always)]
fn d(b: [u8; 8]) -> f64 {
  f64::from_le_bytes(b)
}

#[inline(always)]
fn v_bf16_to_f32(b: u16) -> f32 {
  f32::from_bits(u32::from(b) << 16)
}

#[inline(always)]
fn v_f32_to_bf16(f: f32) -> u16 {
  let u = f.to_bits();
  let rounded = (u.wrapping_add(((u >> 16) & 1) + 0x7FFF) >> 16) as u16;
  // NaN: exponent all ones and a non-zero mantissa, tested on the bits (no float compare needed)
  if u & 0x7FFF_FFFF > 0x7F80_0000 {
    0xFFFF
  } else {
    rounded
  }
}

#[inline(always)]
fn v_f16_to_f32(h: u16) -> f32 {
  let w = u32::from(h) << 16;
  let sign = w & 0x8000_0000;
  let two_w = w.wrapping_add(w);
  let normalized = f32::from_bits((two_w >> 4) + (0xE0u32 << 23)) * f32::from_bits(0x0780_0000);
  let denormalized = f32::from_bits((two_w >> 17) | (126u32 << 23)) - 0.5f32;
  let bits = if two_w < (1u32 << 27) { denormalized.to_bits() } else { normalized.to_bits() };
  f32::from_bits(sign | bits)
}

#[inline(always)]
fn v_f32_to_f16(f: f32) -> u16 {
  let w = f.to_bits();
  let mut base =
    (f32::from_bits(w & 0x7FFF_FFFF) * f32::from_bits(0x7780_0000)) * f32::from_bits(0x0880_0000);
  let shl1_w = w.wrapping_add(w);
  let sign = w & 0x8000_0000;
  let bias = (shl1_w & 0xFF00_0000).max(0x7100_0000);
  base += f32::from_bits((bias >> 1) + 0x0780_0000);
  let bits = base.to_bits();
  let nonsign = ((bits >> 13) & 0x0000_7C00) + (bits & 0x0000_0FFF);
  let nan = 0x7E00 | ((w >> 13) & 0x03FF);
  let inf_nan = if shl1_w > 0xFF00_0000 { nan } else { nonsign };
  ((sign >> 16) | inf_nan) as u16
}

#[inline(always)]
fn v_f16_to_bf16(h: u16) -> u16 {
  // float16 NaN: exponent all ones, mantissa non-zero; torch's scalar rule gives 0x7FC0
  if h & 0x7FFF > 0x7C00 {
    0x7FC0
  } else {
    v_f32_to_bf16(v_f16_to_f32(h))
  }
}

/// [`f32_to_e4m3fn`] without branches, so that it vectorises: both candidate results are computed and one is
/// selected (the float add of the subnormal path is exact IEEE arithmetic whichever lane uses it).
#[inline(always)]
fn v_f32_to_e4m3fn(f: f32) -> u8 {
  let w = f.to_bits();
  let sign = w & 0x8000_0000;
  let a = w ^ sign;
  let denorm_mask = 141u32 << 23;
  let denorm = (f32::from_bits(a) + f32::from_bits(denorm_mask)).to_bits().wrapping_sub(denorm_mask);
  let normal =
    a.wrapping_add((((7i32 - 127) as u32) << 23).wrapping_add(0x7FFFF)).wrapping_add((a >> 20) & 1) >> 20;
  let normal = if normal & 0xFF == 0x7F { 0x7E } else { normal };
  let over = if a > 0x7F80_0000 { 0x7F } else { 0x7E };
  let r = if a >= 1087 << 20 {
    over
  } else if a < 121 << 23 {
    denorm
  } else {
    normal
  };
  (r as u8) | (sign >> 24) as u8
}

/// [`f32_to_e5m2`] without branches.
#[inline(always)]
fn v_f32_to_e5m2(f: f32) -> u8 {
  let w = f.to_bits();
  let sign = w & 0x8000_0000;
  let a = w ^ sign;
  let denorm_mask = 134u32 << 23;
  let denorm = (f32::from_bits(a) + f32::from_bits(denorm_mask)).to_bits().wrapping_sub(denorm_mask);
  let normal =
    a.wrapping_add((((15i32 - 127) as u32) << 23).wrapping_add(0xFFFFF)).wrapping_add((a >> 21) & 1) >> 21;
  let over = if a > 0x7F80_0000 { 0x7F } else { 0x7C };
  let r = if a >= 143 << 23 {
    over
  } else if a < 113 << 23 {
    denorm
  } else {
    normal
  };
  (r as u8) | (sign >> 24) as u8
}

#[inline(always)]
fn v_e4m3fn_to_f32(b: u8) -> f32 {
  f32::from_bits(E4M3FN_F32[usize::from(b)])
}

#[inline(always)]
fn v_e5m2_to_f32(b: u8) -> f32 {
  f32::from_bits(E5M2_F32[usize::from(b)])
}

/// An fp8 number widened to bf16: exact (the top half of its float32), NaN → 0x7FC0 as torch's scalar
/// `round_to_nearest_even`, which is what its fp8 copies reach.
#[inline(always)]
fn v_fp8_f32_to_bf16(f: f32) -> u16 {
  let u = f.to_bits();
  if u & 0x7FFF_FFFF > 0x7F80_0000 {
    0x7FC0
  } else {
    (u >> 16) as u16
  }
}

/// The pairs with an fp8 side. Every one goes through float32, as torch's do (float64 is narrowed to float32
/// first, as `static_cast<Float8_e4m3fn>(double)` does).
#[inline(always)]
fn cast_fp8_kernels(src: &[u8], from: DType, dst: &mut [u8], to: DType) -> bool {
  use DType::{
    BFloat16 as Bf, Float16 as F16, Float32 as F32, Float64 as F64, Float8E4M3Fn as E4, Float8E5M2 as E5,
  };
  match (from, to) {
    (E4, F32) => map(src, dst, |[x]: [u8; 1]| v_e4m3fn_to_f32(x).to_le_bytes()),
    (E5, F32) => map(src, dst, |[x]: [u8; 1]| v_e5m2_to_f32(x).to_le_bytes()),
    (E4, Bf) => map(src, dst, |[x]: [u8; 1]| v_fp8_f32_to_bf16(v_e4m3fn_to_f32(x)).to_le_bytes()),
    (E5, Bf) => map(src, dst, |[x]: [u8; 1]| v_fp8_f32_to_bf16(v_e5m2_to_f32(x)).to_le_bytes()),
    (E4, F16) => map(src, dst, |[x]: [u8; 1]| v_f32_to_f16(v_e4m3fn_to_f32(x)).to_le_bytes()),
    (E5, F16) => map(src, dst, |[x]: [u8; 1]| v_f32_to_f16(v_e5m2_to_f32(x)).to_le_bytes()),
    (E4, F64) => map(src, dst, |[x]: [u8; 1]| f64::from(v_e4m3fn_to_f32(x)).to_le_bytes()),
    (E5, F64) => map(src, dst, |[x]: [u8; 1]| f64::from(v_e5m2_to_f32(x)).to_le_bytes()),
    (E4, E5) => map(src, dst, |[x]: [u8; 1]| [v_f32_to_e5m2(v_e4m3fn_to_f32(x))]),
    (E5, E4) => map(src, dst, |[x]: [u8; 1]| [v_f32_to_e4m3fn(v_e5m2_to_f32(x))]),
    (F32, E4) => map(src, dst, |x| [v_f32_to_e4m3fn(f(x))]),
    (F32, E5) => map(src, dst, |x| [v_f32_to_e5m2(f(x))]),
    (Bf, E4) => map(src, dst, |x| [v_f32_to_e4m3fn(v_bf16_to_f32(h(x)))]),
    (Bf, E5) => map(src, dst, |x| [v_f32_to_e5m2(v_bf16_to_f32(h(x)))]),
    (F16, E4) => map(src, dst, |x| [v_f32_to_e4m3fn(v_f16_to_f32(h(x)))]),
    (F16, E5) => map(src, dst, |x| [v_f32_to_e5m2(v_f16_to_f32(h(x)))]),
    (F64, E4) => map(src, dst, |x| [v_f32_to_e4m3fn(d(x) as f32)]),
    (F64, E5) => map(src, dst, |x| [v_f32_to_e5m2(d(x) as f32)]),
    _ => return false,
  }
  true
}

/// Every floating pair through the block kernels. `#[inline(always)]` so that each caller compiled for a wider
/// instruction set gets its own copy.
#[inline(always)]
fn cast_kernels(src: &[u8], from: DType, dst: &mut [u8], to: DType) -> bool {
  use DType::{BFloat16 as Bf, Float16 as F16, Float32 as F32, Float64 as F64};
  match (from, to) {
    (Bf, F32) => map(src, dst, |x| v_bf16_to_f32(h(x)).to_le_bytes()),
    (F16, F32) => map(src, dst, |x| v_f16_to_f32(h(x)).to_le_bytes()),
    (F64, F32) => map(src, dst, |x| (d(x) as f32).to_le_bytes()),
    (F32, Bf) => map(src, dst, |x| v_f32_to_bf16(f(x)).to_le_bytes()),
    (F32, F16) => map(src, dst, |x| v_f32_to_f16(f(x)).to_le_bytes()),
    (Bf, F16) => map(src, dst, |x| v_f32_to_f16(v_bf16_to_f32(h(x))).to_le_bytes()),
    (F16, Bf) => map(src, dst, |x| v_f16_to_bf16(h(x)).to_le_bytes()),
    (F64, Bf) => map(src, dst, |x| v_f32_to_bf16(d(x) as f32).to_le_bytes()),
    (F64, F16) => map(src, dst, |x| v_f32_to_f16(d(x) as f32).to_le_bytes()),
    (F32, F64) => map(src, dst, |x| f64::from(f(x)).to_le_bytes()),
    (Bf, F64) => map(src, dst, |x| f64::from(v_bf16_to_f32(h(x))).to_le_bytes()),
    (F16, F64) => map(src, dst, |x| f64::from(v_f16_to_f32(h(x))).to_le_bytes()),
    _ => return cast_fp8_kernels(src, from, dst, to),
  }
  true
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn cast_kernels_avx2(src: &[u8], from: DType, dst: &mut [u8], to: DType) -> bool {
  cast_kernels(src, from, dst, to)
}

fn cast_vectorised(src: &[u8], from: DType, dst: &mut [u8], to: DType) -> bool {
  #[cfg(target_arch = "x86_64")]
  if std::arch::is_x86_feature_detected!("avx2") {
    // SAFETY: the CPU was just seen to support AVX2, the only feature the function is compiled for.
    return unsafe { cast_kernels_avx2(src, from, dst, to) };
  }
  cast_kernels(src, from, dst, to)
}

/// Casts `src` (elements of `from`) into `dst` (elements of `to`); both floating dtypes ([`DType::is_floating_point`]), same
/// element count. float64 goes through float32 first, as torch's `static_cast<BFloat16>(double)` does.
pub fn cast(src: &[u8], from: DType, dst: &mut [u8], to: DType) {
  if from == to {
    dst.copy_from_slice(src);
    return;
  }
  // every pair of the six floating dtypes has a kernel; anything else is not a cast this module makes
  let done = cast_vectorised(src, from, dst, to);
  debug_assert!(done, "no cast from {from} to {to}");
}

/// [`cast`] split over threads in fixed-size blocks.
pub fn cast_parallel(src: &[u8], from: DType, dst: &mut [u8], to: DType) {
  const BLOCK_ELEMS: usize = 1 << 20;
  let n = src.len() / from.size();
  let threads = crate::threads::cores();
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

  /// The header's worked values: saturation into e4m3fn, overflow to inf into e5m2, ties to even, subnormals.
  #[test]
  fn fp8_edges() {
    let e4 = |x: f32| f32_to_e4m3fn(x);
    assert_eq!(e4(448.0), 0x7E);
    assert_eq!(e4(464.0), 0x7E); // halfway between 448 and the NaN pattern: even is 448
    assert_eq!(e4(470.0), 0x7E); // would round into 0x7F, which is NaN: saturates
    assert_eq!(e4(480.0), 0x7E);
    assert_eq!(e4(f32::INFINITY), 0x7E);
    assert_eq!(e4(f32::NEG_INFINITY), 0xFE);
    assert_eq!(e4(-f32::NAN), 0xFF);
    assert_eq!(e4(2f32.powi(-9)), 0x01); // smallest subnormal
    assert_eq!(e4(2f32.powi(-10)), 0x00); // half of it: ties to even (0)
    assert_eq!(e4(3.0 * 2f32.powi(-10)), 0x02); // one and a half: ties to even (2)
    let e5 = |x: f32| f32_to_e5m2(x);
    assert_eq!(e5(57344.0), 0x7B);
    assert_eq!(e5(61440.0), 0x7C); // the tie above the largest finite rounds to even: inf
    assert_eq!(e5(-1e9), 0xFC);
    assert_eq!(e5(f32::NAN), 0x7F);
    assert_eq!(e5(2f32.powi(-16)), 0x01);
    for b in 0..=255u8 {
      let x = f32::from_bits(e4m3fn_to_f32_bits(b));
      if b & 0x7F == 0x7F {
        assert!(x.is_nan());
      } else {
        assert_eq!(e4(x), b, "e4m3fn {b:#x} round trip");
      }
      let y = f32::from_bits(e5m2_to_f32_bits(b));
      if y.is_nan() {
        assert_eq!(e5(y), 0x7F | (b & 0x80));
      } else {
        assert_eq!(e5(y), b, "e5m2 {b:#x} round trip");
      }
    }
  }

  /// Every fp8 input to every floating dtype, and every 16-bit input into fp8.
  #[test]
  fn fp8_vectorised_equals_reference_on_every_input() {
    let bytes: Vec<u8> = (0..=255u8).collect();
    let all16: Vec<u8> = (0..=u16::MAX).flat_map(u16::to_le_bytes).collect();
    for from in [DType::Float8E4M3Fn, DType::Float8E5M2] {
      for to in FLOATS {
        check_all_builds(&bytes, from, to);
        check_all_builds(&all16, to, from);
      }
    }
  }

  const FLOATS: [DType; 6] =
    [DType::Float64, DType::Float32, DType::Float16, DType::BFloat16, DType::Float8E4M3Fn, DType::Float8E5M2];

  /// Both kernel builds (the baseline one and the AVX2 one when the CPU has it) against the reference.
  fn check_all_builds(src: &[u8], from: DType, to: DType) {
    let n = src.len() / from.size();
    let mut want = vec![0u8; n * to.size()];
    cast_reference(src, from, &mut want, to);
    if from != to {
      let mut got = vec![0xA5u8; n * to.size()];
      assert!(cast_kernels(src, from, &mut got, to));
      assert!(got == want, "{from} -> {to} (baseline build) differs from the reference");
    }
    let mut got = vec![0x5Au8; n * to.size()];
    cast(src, from, &mut got, to);
    assert!(got == want, "{from} -> {to} (dispatched build) differs from the reference");
    let mut got = vec![0x33u8; n * to.size()];
    cast_parallel(src, from, &mut got, to);
    assert!(got == want, "{from} -> {to} (threaded) differs from the reference");
  }

  /// All 65,536 inputs of each 16-bit dtype, to every other floating dtype.
  #[test]
  fn vectorised_equals_reference_on_every_16_bit_input() {
    let all: Vec<u8> = (0..=u16::MAX).flat_map(u16::to_le_bytes).collect();
    for from in [DType::Float16, DType::BFloat16] {
      for to in FLOATS {
        if to != from {
          check_all_builds(&all, from, to);
        }
      }
    }
  }

  /// Large enough for the threaded split (several 1 Mi-element blocks) and an odd tail after the last block.
  #[test]
  fn vectorised_equals_reference_threaded() {
    let n = (2 << 20) + 77;
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let bytes: Vec<u8> = (0..n * 8)
      .map(|_| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x as u8
      })
      .collect();
    for from in FLOATS {
      for to in FLOATS {
        if to != from {
          check_all_builds(&bytes[..n * from.size()], from, to);
        }
      }
    }
  }

  /// Single-thread throughput of each kernel against the reference (`cargo test --release -- --ignored
  /// cast_throughput --nocapture`); what a slab of a conversion costs.
  #[test]
  #[ignore]
  fn cast_throughput() {
    let n = 16 << 20;
    let src: Vec<u8> = (0..n * 8).map(|i| (i * 7 + i / 3) as u8).collect();
    for (from, to) in [
      (DType::BFloat16, DType::Float16),
      (DType::BFloat16, DType::Float32),
      (DType::Float32, DType::BFloat16),
      (DType::Float32, DType::Float16),
      (DType::Float16, DType::Float32),
      (DType::Float64, DType::BFloat16),
      (DType::BFloat16, DType::Float8E4M3Fn),
      (DType::Float32, DType::Float8E5M2),
      (DType::Float8E4M3Fn, DType::BFloat16),
    ] {
      let s = &src[..n * from.size()];
      let mut d = vec![0u8; n * to.size()];
      d.fill(1); // fault the pages in first: this measures the arithmetic
      let t = std::time::Instant::now();
      cast_reference(s, from, &mut d, to);
      let r = t.elapsed().as_secs_f64();
      let t = std::time::Instant::now();
      cast(s, from, &mut d, to);
      let v = t.elapsed().as_secs_f64();
      let gb = (s.len() + d.len()) as f64 / 1e9;
      let mut same = vec![1u8; s.len()];
      let t = std::time::Instant::now();
      same.copy_from_slice(std::hint::black_box(s));
      std::hint::black_box(&same);
      let c = t.elapsed().as_secs_f64();
      println!("  memcpy of the source {:6.2} GB/s", 2.0 * s.len() as f64 / 1e9 / c);
      println!(
        "{from:>9} -> {to:<9} reference {:6.2} GB/s   vectorised {:6.2} GB/s (bytes in + out)",
        gb / r,
        gb / v
      );
    }
  }

  mod prop {
    use super::*;
    use proptest::prelude::*;

    proptest! {
      #![proptest_config(ProptestConfig::with_cases(64))]
      /// Random bit patterns (NaN payloads, subnormals, infinities included) of any length, so every block/tail
      /// split is exercised.
      #[test]
      fn vectorised_equals_reference(words in proptest::collection::vec(any::<u64>(), 0..600), from in 0usize..6, to in 0usize..6) {
        let (from, to) = (FLOATS[from], FLOATS[to]);
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        let n = bytes.len() / 8;
        check_all_builds(&bytes[..n * from.size()], from, to);
      }
    }
  }
}
