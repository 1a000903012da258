// Deterministic numbers that Python can reproduce exactly (interop/tiny_trainer.py has the same code): a 32-bit
// LCG whose top 24 bits become a float32 in [-1, 1) with no rounding at all.

/** The LCG state for stream `index` of `seed`. */
function start(seed: number, index: number): number {
  return (Math.imul(seed >>> 0, 2654435761 | 0) + Math.imul(index >>> 0, 40503) + 12345) >>> 0
}

/** `n` values in [-1, 1), exact float32s (multiples of 2⁻²³). */
export function uniform(seed: number, index: number, n: number): Float32Array {
  let s = start(seed, index)
  const out = new Float32Array(n)
  for (let i = 0; i < n; i++) {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0
    out[i] = (s >>> 8) / 2 ** 23 - 1
  }
  return out
}

/** A training batch: `x` is [batch, inFeatures], `y` is [batch, outFeatures], row-major. */
export interface Batch {
  x: Float32Array
  y: Float32Array
  batch: number
}

/** Batch number `step` of a run: inputs and targets drawn from stream `1000 + step` of `seed`. */
export function makeBatch(seed: number, step: number, batch = 3, inFeatures = 4, outFeatures = 2): Batch {
  const v = uniform(seed, 1000 + step, batch * (inFeatures + outFeatures))
  return { x: v.slice(0, batch * inFeatures), y: v.slice(batch * inFeatures), batch }
}
