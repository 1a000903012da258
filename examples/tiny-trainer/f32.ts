// float32 arithmetic as PyTorch's CPU kernels do it: every result rounded to float32 (Math.fround), and a fused
// multiply-add rounded once where the kernel uses one (lerp's explicit fmadd, addcmul/add-with-alpha contracted by
// the compiler). +, -, *, / and sqrt of float32 values computed in float64 and rounded once are exactly the float32
// results (53 ≥ 2·24 + 2), so only the fused operations need care.

export const f32 = Math.fround

const box = new Float32Array(1)
const bits = new Int32Array(box.buffer)

/** The float32 next to `x` (a float32) towards +∞ (`up`) or −∞. */
function nextF32(x: number, up: boolean): number {
  if (x === 0) {
    bits[0] = 1
    return up ? box[0] : -box[0]
  }
  box[0] = x
  bits[0] += x > 0 === up ? 1 : -1
  return box[0]
}

/** `a * b + c` rounded once to float32 (a, b, c float32): what an FMA instruction on float32 returns. */
export function fma32(a: number, b: number, c: number): number {
  const p = a * b // exact: two 24-bit significands fit in 53 bits
  const s = p + c
  const r = f32(s)
  if (r === s || !Number.isFinite(s)) return r
  const bb = s - p
  const err = p - (s - bb) + (c - bb) // s + err == p + c exactly (TwoSum)
  if (err === 0) return r
  // s was rounded; only when it sits exactly halfway between two float32s can the second rounding go wrong
  const other = nextF32(r, s > r)
  if (s !== (r + other) / 2) return r
  return err > 0 ? Math.max(r, other) : Math.min(r, other)
}

/** `torch.lerp(start, end, weight)` on CPU for float32: `fmadd(w, end - start, start)` (w < 0.5) or from `end`. */
export function lerp32(start: number, end: number, weight: number): number {
  const diff = f32(end - start)
  return Math.abs(weight) < 0.5 ? fma32(weight, diff, start) : fma32(f32(weight - 1), diff, end)
}
