//! Where a dtype cast of a device read runs: on the side that moves fewer bytes over PCIe.
//!
//! - Narrowing (and every pair the device has no exact kernel for): the host casts each staged band into the
//!   pinned slot with the core's casts ([`distcp_core::convert::cast`], bit-identical to torch's CPU `.to()`), so
//!   only the smaller wanted bytes cross.
//! - bfloat16/float16 → float32: the stored bytes cross, and a PTX kernel ([`WIDEN_PTX`]) widens them on the
//!   device. Both widenings are exact, so there is no rounding to agree on: bf16 → f32 is `u32(x) << 16` (NaN
//!   payloads kept), f16 → f32 is `cvt.f32.f16`, the instruction torch's CUDA `.to(torch.float32)` compiles to
//!   (`__half2float`), so the device result is torch's on CUDA by construction. Measured on an H200
//!   (`bench/gpu/results/h200-2026-11-28-casts.txt`): the kernel equals torch's CUDA cast on all 65536 bf16 and
//!   fp16 patterns, and the host cast on every real tensor; fp16 NaN payloads are where torch's CPU cast
//!   (`fp16_ieee_to_fp32_value`: sign and payload kept, quiet bit set) and its CUDA cast differ, and the device
//!   follows CUDA there. [`widen`] is the CPU rule in plain Rust, used by the fake device (checked against the core
//!   on all 65536 patterns), so CI's fake device matches torch's CPU, not CUDA, on fp16 NaN payloads only.

use crate::error::{CudaError, Result};
use distcp_core::DType;

/// How one request's elements get from the stored dtype to the wanted one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CastMode {
  /// Same dtype: bytes as stored.
  None,
  /// Cast on the host into the staging slot.
  Host { from: DType, to: DType },
  /// Stored bytes uploaded, widened to float32 on the device.
  Device { from: DType },
}

/// The dtypes the CUDA cast kernels take (fp8 casts run on the host only).
fn has_kernel(d: DType) -> bool {
  matches!(d, DType::Float64 | DType::Float32 | DType::Float16 | DType::BFloat16)
}

/// Chooses where the cast from `from` (stored) to `to` (wanted) runs; casts exist between floating dtypes only.
pub fn choose(from: DType, to: DType) -> Result<CastMode> {
  if from == to {
    return Ok(CastMode::None);
  }
  if !has_kernel(from) || !has_kernel(to) {
    return Err(CudaError::BadRequest(format!(
      "cannot read a {from} tensor as {to}: casts are between float64, float32, float16 and bfloat16"
    )));
  }
  Ok(match (from, to) {
    (DType::BFloat16 | DType::Float16, DType::Float32) => CastMode::Device { from },
    _ => CastMode::Host { from, to },
  })
}

/// One element of `from` (bfloat16 or float16, little-endian bits) widened to float32 bits, as the device kernel
/// computes it.
pub fn widen(from: DType, h: u16) -> u32 {
  if from == DType::BFloat16 {
    return u32::from(h) << 16;
  }
  let sign = u32::from(h & 0x8000) << 16;
  let exp = u32::from((h >> 10) & 0x1F);
  let man = u32::from(h & 0x03FF);
  match (exp, man) {
    (0, 0) => sign,
    (0, m) => {
      // subnormal: normalise (value m · 2^-24 is exact in f32)
      let shift = m.leading_zeros() - 21; // bits to bring the top set bit to position 10
      let m = (m << shift) & 0x03FF;
      sign | ((113 - shift) << 23) | (m << 13)
    }
    (0x1F, 0) => sign | 0x7F80_0000,
    (0x1F, m) => sign | 0x7FC0_0000 | (m << 13),
    (e, m) => sign | ((e + 112) << 23) | (m << 13),
  }
}

/// [`widen`] over a buffer: `src` holds elements of `from`, `dst` as many float32s.
pub fn widen_slice(from: DType, src: &[u8], dst: &mut [u8]) {
  for (s, d) in src.chunks_exact(2).zip(dst.chunks_exact_mut(4)) {
    d.copy_from_slice(&widen(from, u16::from_le_bytes([s[0], s[1]])).to_le_bytes());
  }
}

/// The kernels' entry names, by stored dtype.
pub fn kernel_name(from: DType) -> &'static std::ffi::CStr {
  if from == DType::BFloat16 {
    c"distcp_widen_bf16_f32"
  } else {
    c"distcp_widen_f16_f32"
  }
}

/// `(src, dst, n)`: thread i widens element i of `src` into `dst`. Hand-written PTX, JIT-compiled by the driver
/// (no nvcc at build time); `.target sm_52` so that every GPU a current driver supports loads it.
pub const WIDEN_PTX: &std::ffi::CStr = c"
.version 7.0
.target sm_52
.address_size 64

.visible .entry distcp_widen_bf16_f32(.param .u64 p_src, .param .u64 p_dst, .param .u64 p_n)
{
  .reg .pred %p;
  .reg .b16 %h;
  .reg .b32 %r<4>;
  .reg .b64 %rd<8>;
  ld.param.u64 %rd1, [p_src];
  ld.param.u64 %rd2, [p_dst];
  ld.param.u64 %rd3, [p_n];
  mov.u32 %r1, %ctaid.x;
  mov.u32 %r2, %ntid.x;
  mov.u32 %r3, %tid.x;
  mul.wide.u32 %rd4, %r1, %r2;
  cvt.u64.u32 %rd5, %r3;
  add.u64 %rd4, %rd4, %rd5;
  setp.ge.u64 %p, %rd4, %rd3;
  @%p bra DONE_BF16;
  cvta.to.global.u64 %rd1, %rd1;
  cvta.to.global.u64 %rd2, %rd2;
  shl.b64 %rd5, %rd4, 1;
  add.u64 %rd6, %rd1, %rd5;
  ld.global.b16 %h, [%rd6];
  cvt.u32.u16 %r1, %h;
  shl.b32 %r1, %r1, 16;
  shl.b64 %rd5, %rd4, 2;
  add.u64 %rd7, %rd2, %rd5;
  st.global.b32 [%rd7], %r1;
DONE_BF16:
  ret;
}

.visible .entry distcp_widen_f16_f32(.param .u64 p_src, .param .u64 p_dst, .param .u64 p_n)
{
  .reg .pred %p;
  .reg .b16 %h;
  .reg .f32 %f;
  .reg .b32 %r<4>;
  .reg .b64 %rd<8>;
  ld.param.u64 %rd1, [p_src];
  ld.param.u64 %rd2, [p_dst];
  ld.param.u64 %rd3, [p_n];
  mov.u32 %r1, %ctaid.x;
  mov.u32 %r2, %ntid.x;
  mov.u32 %r3, %tid.x;
  mul.wide.u32 %rd4, %r1, %r2;
  cvt.u64.u32 %rd5, %r3;
  add.u64 %rd4, %rd4, %rd5;
  setp.ge.u64 %p, %rd4, %rd3;
  @%p bra DONE_F16;
  cvta.to.global.u64 %rd1, %rd1;
  cvta.to.global.u64 %rd2, %rd2;
  shl.b64 %rd5, %rd4, 1;
  add.u64 %rd6, %rd1, %rd5;
  ld.global.b16 %h, [%rd6];
  cvt.f32.f16 %f, %h;
  shl.b64 %rd5, %rd4, 2;
  add.u64 %rd7, %rd2, %rd5;
  st.global.f32 [%rd7], %f;
DONE_F16:
  ret;
}
";
