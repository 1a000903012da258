// A small MLP, torch.nn.Sequential(Linear(in, hidden), LayerNorm(hidden), ReLU(), Linear(hidden, out)), with MSE
// loss, trained on Float32Array. Parameter names are the ones torch gives that Sequential: 0.weight, 0.bias,
// 1.weight, 1.bias, 3.weight, 3.bias (ReLU has none).
import type { Model, Parameter, StateDict, Tensor } from '../../src/index.js'
import { DistcpError } from '../../src/index.js'
import type { Batch } from './data.js'
import { uniform } from './data.js'
import { f32 } from './f32.js'

/** A float32 parameter; `values` views its bytes. */
export class F32Parameter implements Parameter {
  readonly dtype = 'float32' as const
  readonly shape: number[]
  readonly data: Uint8Array
  grad: Tensor | null = null
  requiresGrad = true

  constructor(shape: number[], values?: ArrayLike<number>) {
    this.shape = shape
    const n = shape.reduce((a, b) => a * b, 1)
    const v = new Float32Array(n)
    if (values) v.set(values)
    this.data = new Uint8Array(v.buffer)
  }

  get values(): Float32Array {
    return new Float32Array(this.data.buffer, this.data.byteOffset, this.data.byteLength / 4)
  }

  /** The gradient's values (created as zeros if there is none yet). */
  gradValues(): Float32Array {
    if (!this.grad) this.grad = { dtype: 'float32', shape: [...this.shape], data: new Uint8Array(this.data.byteLength) }
    return new Float32Array(this.grad.data.buffer, this.grad.data.byteOffset, this.grad.data.byteLength / 4)
  }
}

export interface MlpConfig {
  inFeatures?: number
  hidden?: number
  outFeatures?: number
  /** LayerNorm's eps (torch's default 1e-5). */
  eps?: number
  /**
   * Initial weights: Linear weights and biases uniform in ±1/√fan_in (torch's default bounds) from this seed;
   * LayerNorm weight 1, bias 0. Default 0.
   */
  seed?: number
}

/** Sequential(Linear, LayerNorm, ReLU, Linear) in plain TypeScript; implements distcp's `Model`. */
export class TinyMLP implements Model {
  readonly inFeatures: number
  readonly hidden: number
  readonly outFeatures: number
  readonly eps: number
  readonly params: Map<string, F32Parameter>

  constructor(config: MlpConfig = {}) {
    const { inFeatures = 4, hidden = 8, outFeatures = 2, eps = 1e-5, seed = 0 } = config
    this.inFeatures = inFeatures
    this.hidden = hidden
    this.outFeatures = outFeatures
    this.eps = eps
    const scaled = (stream: number, n: number, fanIn: number): Float32Array => {
      const bound = 1 / Math.sqrt(fanIn)
      return uniform(seed, stream, n).map((u) => f32(u * bound))
    }
    this.params = new Map([
      ['0.weight', new F32Parameter([hidden, inFeatures], scaled(0, hidden * inFeatures, inFeatures))],
      ['0.bias', new F32Parameter([hidden], scaled(1, hidden, inFeatures))],
      ['1.weight', new F32Parameter([hidden], new Float32Array(hidden).fill(1))],
      ['1.bias', new F32Parameter([hidden])],
      ['3.weight', new F32Parameter([outFeatures, hidden], scaled(2, outFeatures * hidden, hidden))],
      ['3.bias', new F32Parameter([outFeatures], scaled(3, outFeatures, hidden))],
    ])
  }

  p(name: string): F32Parameter {
    return this.params.get(name)!
  }

  namedParameters(): [string, F32Parameter][] {
    return [...this.params]
  }

  /** `model.state_dict()`: new tensor objects sharing the parameters' memory (like `detach()`). */
  stateDict(): StateDict {
    const sd: StateDict = {}
    for (const [k, p] of this.params) sd[k] = { dtype: p.dtype, shape: [...p.shape], data: p.data }
    return sd
  }

  /** `model.load_state_dict(sd, strict=True)`: same keys, dtypes and shapes, or an error naming every difference. */
  loadStateDict(sd: StateDict): void {
    const problems: string[] = []
    for (const k of this.params.keys()) if (!(k in sd)) problems.push(`missing key ${k}`)
    for (const k of Object.keys(sd)) if (!this.params.has(k)) problems.push(`unexpected key ${k}`)
    for (const [k, p] of this.params) {
      const t = sd[k] as Tensor | undefined
      if (!t) continue
      if (t.dtype !== 'float32' || t.shape.join(',') !== p.shape.join(',')) {
        problems.push(`${k}: expected float32 [${p.shape}], got ${t.dtype} [${t.shape}]`)
      }
    }
    if (problems.length) throw new DistcpError('ERR_DISTCP_STATE_MISMATCH', `TinyMLP.loadStateDict: ${problems.join('; ')}`)
    for (const [k, p] of this.params) {
      const t = sd[k] as Tensor
      if (t.data !== p.data) p.data.set(new Uint8Array(t.data.buffer, t.data.byteOffset, t.data.byteLength))
    }
  }

  /** Forward pass; returns the output [batch, out] and what backward needs. */
  #forward(b: Batch) {
    const { inFeatures: I, hidden: H, outFeatures: O } = this
    const B = b.batch
    const w0 = this.p('0.weight').values
    const b0 = this.p('0.bias').values
    const g1 = this.p('1.weight').values
    const b1 = this.p('1.bias').values
    const w3 = this.p('3.weight').values
    const b3 = this.p('3.bias').values
    const z = new Float32Array(B * H) // Linear 0
    const xhat = new Float64Array(B * H)
    const rstd = new Float64Array(B)
    const a = new Float32Array(B * H) // LayerNorm 1
    const r = new Float32Array(B * H) // ReLU 2
    const out = new Float32Array(B * O) // Linear 3
    for (let n = 0; n < B; n++) {
      for (let j = 0; j < H; j++) {
        let s = b0[j]
        for (let k = 0; k < I; k++) s += b.x[n * I + k] * w0[j * I + k]
        z[n * H + j] = s
      }
      let mean = 0
      for (let j = 0; j < H; j++) mean += z[n * H + j]
      mean /= H
      let v = 0
      for (let j = 0; j < H; j++) v += (z[n * H + j] - mean) ** 2
      v /= H
      rstd[n] = 1 / Math.sqrt(v + this.eps)
      for (let j = 0; j < H; j++) {
        const xh = (z[n * H + j] - mean) * rstd[n]
        xhat[n * H + j] = xh
        a[n * H + j] = xh * g1[j] + b1[j]
        r[n * H + j] = Math.max(0, a[n * H + j])
      }
      for (let o = 0; o < O; o++) {
        let s = b3[o]
        for (let j = 0; j < H; j++) s += r[n * H + j] * w3[o * H + j]
        out[n * O + o] = s
      }
    }
    return { z, xhat, rstd, a, r, out }
  }

  /** The model's output for `x` ([batch, in] → [batch, out]). */
  predict(b: Batch): Float32Array {
    return this.#forward(b).out
  }

  /** MSE loss (mean over every output), as float32. */
  loss(b: Batch): number {
    const { out } = this.#forward(b)
    let s = 0
    for (let i = 0; i < out.length; i++) s += (out[i] - b.y[i]) ** 2
    return f32(s / out.length)
  }

  /** Loss, and its gradient added into every parameter's `grad` (created when null), like `loss.backward()`. */
  lossAndBackward(b: Batch): number {
    const { inFeatures: I, hidden: H, outFeatures: O } = this
    const B = b.batch
    const { xhat, rstd, a, r, out } = this.#forward(b)
    const w3 = this.p('3.weight').values
    const g1 = this.p('1.weight').values
    let s = 0
    for (let i = 0; i < out.length; i++) s += (out[i] - b.y[i]) ** 2
    const loss = f32(s / out.length)

    const dOut = new Float64Array(B * O)
    for (let i = 0; i < out.length; i++) dOut[i] = (2 * (out[i] - b.y[i])) / out.length
    const gw0 = new Float64Array(H * I)
    const gb0 = new Float64Array(H)
    const gg1 = new Float64Array(H)
    const gb1 = new Float64Array(H)
    const gw3 = new Float64Array(O * H)
    const gb3 = new Float64Array(O)
    for (let n = 0; n < B; n++) {
      const dr = new Float64Array(H)
      for (let o = 0; o < O; o++) {
        const d = dOut[n * O + o]
        gb3[o] += d
        for (let j = 0; j < H; j++) {
          gw3[o * H + j] += d * r[n * H + j]
          dr[j] += d * w3[o * H + j]
        }
      }
      // ReLU, then LayerNorm's affine part
      const dxhat = new Float64Array(H)
      let sumD = 0
      let sumDX = 0
      for (let j = 0; j < H; j++) {
        const da = a[n * H + j] > 0 ? dr[j] : 0
        gg1[j] += da * xhat[n * H + j]
        gb1[j] += da
        dxhat[j] = da * g1[j]
        sumD += dxhat[j]
        sumDX += dxhat[j] * xhat[n * H + j]
      }
      for (let j = 0; j < H; j++) {
        const dz = (rstd[n] / H) * (H * dxhat[j] - sumD - xhat[n * H + j] * sumDX)
        gb0[j] += dz
        for (let k = 0; k < I; k++) gw0[j * I + k] += dz * b.x[n * I + k]
      }
    }
    const add = (name: string, g: Float64Array): void => {
      const dst = this.p(name).gradValues()
      for (let i = 0; i < g.length; i++) dst[i] = f32(dst[i] + f32(g[i]))
    }
    add('0.weight', gw0)
    add('0.bias', gb0)
    add('1.weight', gg1)
    add('1.bias', gb1)
    add('3.weight', gw3)
    add('3.bias', gb3)
    return loss
  }
}
