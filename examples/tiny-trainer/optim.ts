// torch.optim.AdamW / Adam (the single-tensor CPU path torch 2.15 takes by default for CPU float32 tensors) and
// torch.optim.lr_scheduler.StepLR, following torch's order of operations and its float32/float64 split:
// hyper-parameter arithmetic in float64 (Python floats), tensor arithmetic in float32 with the fused operations
// torch's kernels use. State dicts have torch's exact layout and Python types.
import {
  DistcpError,
  PyFloat,
  PyTuple,
  type LRScheduler,
  type Optimizer,
  type OptimizerStateDict,
  type ParamGroup,
  type ParamGroupState,
  type Parameter,
  type StateDict,
  type StateValue,
  type Tensor,
} from '../../src/index.js'
import { f32, fma32, lerp32 } from './f32.js'

/** A Python number (int or float, maybe wrapped) as a JS number. */
export function num(v: unknown): number {
  if (v instanceof PyFloat) return v.value
  if (typeof v === 'number') return v
  if (typeof v === 'bigint') return Number(v)
  throw new DistcpError('ERR_DISTCP_INVALID_INPUT', `expected a number, got ${String(v)}`)
}

function pair(v: unknown): [number, number] {
  const items = v instanceof PyTuple ? v.items : v
  if (!Array.isArray(items) || items.length !== 2) throw new DistcpError('ERR_DISTCP_INVALID_INPUT', `expected two betas`)
  return [num(items[0]), num(items[1])]
}

const float = (v: unknown): StateValue => (typeof v === 'number' ? new PyFloat(v) : (v as StateValue))
const floats = (v: unknown): StateValue => (Array.isArray(v) ? v.map(float) : (v as StateValue))

function f32View(t: Tensor): Float32Array {
  return new Float32Array(t.data.buffer, t.data.byteOffset, t.data.byteLength / 4)
}

function cloneF32(t: Tensor, shape: number[], what: string): Tensor {
  if (t.dtype !== 'float32') throw new DistcpError('ERR_DISTCP_INVALID_INPUT', `${what}: expected float32, got ${t.dtype}`)
  if (t.shape.join(',') !== shape.join(',')) throw new DistcpError('ERR_DISTCP_INVALID_INPUT', `${what}: expected shape [${shape}], got [${t.shape}]`)
  return { dtype: 'float32', shape: [...shape], data: new Uint8Array(t.data) }
}

export interface AdamOptions {
  lr?: number
  betas?: [number, number]
  eps?: number
  weightDecay?: number
}

interface AdamParamState {
  step: Tensor
  exp_avg: Tensor
  exp_avg_sq: Tensor
}

/** A parameter group given to the constructor: parameters plus optional per-group hyper-parameters. */
export interface AdamGroupInput extends AdamOptions {
  params: Parameter[]
}

/**
 * torch.optim.AdamW (decoupled weight decay, default 0.01). Groups hold torch's keys in torch's order: lr, betas,
 * eps, weight_decay, amsgrad, maximize, foreach, capturable, differentiable, fused, decoupled_weight_decay (plus
 * initial_lr once a scheduler is attached). amsgrad, maximize, capturable, … are stored but only their defaults
 * are implemented.
 */
const FLAG_DEFAULTS = { amsgrad: false, maximize: false, foreach: null, capturable: false, differentiable: false, fused: null }

export class AdamW implements Optimizer {
  readonly paramGroups: ParamGroup[] = []
  readonly state = new Map<Parameter, AdamParamState>()
  readonly decoupled: boolean

  constructor(params: Parameter[] | AdamGroupInput[], options: AdamOptions = {}, decoupled = true) {
    this.decoupled = decoupled
    const defaults = { lr: 1e-3, betas: [0.9, 0.999] as [number, number], eps: 1e-8, ...options }
    const groups: AdamGroupInput[] = params.length > 0 && 'params' in params[0] ? (params as AdamGroupInput[]) : [{ params: params as Parameter[] }]
    for (const g of groups) {
      const o = { ...defaults, ...g }
      const wd = o.weightDecay
      this.paramGroups.push({
        params: [...g.params],
        lr: o.lr,
        betas: new PyTuple([new PyFloat(o.betas[0]), new PyFloat(o.betas[1])]),
        eps: o.eps,
        // torch's defaults: AdamW weight_decay=1e-2 (a float), Adam weight_decay=0 (an int)
        weight_decay: wd !== undefined ? new PyFloat(wd) : decoupled ? new PyFloat(1e-2) : 0,
        ...FLAG_DEFAULTS,
        decoupled_weight_decay: decoupled,
      })
    }
  }

  /** `optimizer.state_dict()`: state by parameter index (references, not copies), groups with index lists. */
  stateDict(): OptimizerStateDict {
    const index = new Map<Parameter, number>()
    for (const g of this.paramGroups) for (const p of g.params) if (!index.has(p)) index.set(p, index.size)
    const state: OptimizerStateDict['state'] = {}
    for (const [p, s] of this.state) state[index.get(p)!] = { step: s.step, exp_avg: s.exp_avg, exp_avg_sq: s.exp_avg_sq }
    const param_groups = this.paramGroups.map((g) => {
      const out: ParamGroupState = { params: [] }
      delete (out as { params?: number[] }).params
      for (const [k, v] of Object.entries(g)) {
        if (k === 'params') continue
        out[k] = k === 'lr' || k === 'eps' || k === 'initial_lr' ? float(v) : (v as StateValue)
      }
      out.params = g.params.map((p) => index.get(p)!)
      return out
    })
    return { state, param_groups }
  }

  /** `optimizer.load_state_dict(sd)`: hyper-parameters from `sd`'s groups, state matched by position, copied. */
  loadStateDict(sd: OptimizerStateDict): void {
    if (sd.param_groups.length !== this.paramGroups.length) {
      throw new DistcpError('ERR_DISTCP_STATE_MISMATCH', 'loaded state dict has a different number of parameter groups')
    }
    const byIndex = new Map<number, Parameter>()
    sd.param_groups.forEach((g, i) => {
      const mine = this.paramGroups[i].params
      if (g.params.length !== mine.length) {
        throw new DistcpError('ERR_DISTCP_STATE_MISMATCH', "loaded state dict contains a parameter group that doesn't match the size of optimizer's group")
      }
      g.params.forEach((id, j) => byIndex.set(id, mine[j]))
    })
    const state = new Map<Parameter, AdamParamState>()
    for (const [k, s] of Object.entries(sd.state)) {
      const p = byIndex.get(Number(k))
      if (!p) continue
      const t = s as Record<string, Tensor>
      state.set(p, {
        step: cloneF32(t.step, [], `state ${k} step`),
        exp_avg: cloneF32(t.exp_avg, p.shape, `state ${k} exp_avg`),
        exp_avg_sq: cloneF32(t.exp_avg_sq, p.shape, `state ${k} exp_avg_sq`),
      })
    }
    this.state.clear()
    for (const [p, s] of state) this.state.set(p, s)
    sd.param_groups.forEach((g, i) => {
      const group = this.paramGroups[i]
      const params = group.params
      for (const k of Object.keys(group)) delete group[k]
      group.params = params
      for (const [k, v] of Object.entries(g)) if (k !== 'params') group[k] = v
      // Adam.__setstate__ / AdamW.__setstate__: groups saved by older torch lack the newer flags
      for (const [k, v] of Object.entries(FLAG_DEFAULTS)) if (!(k in group)) group[k] = v
      if (this.decoupled) group.decoupled_weight_decay = true
      else if (!('decoupled_weight_decay' in group)) group.decoupled_weight_decay = false
    })
  }

  zeroGrad(setToNone = true): void {
    for (const g of this.paramGroups) {
      for (const p of g.params) {
        if (!p.grad) continue
        if (setToNone) p.grad = null
        else p.grad.data.fill(0)
      }
    }
  }

  /** One update (torch's `_single_tensor_adam`), for every parameter that has a gradient. */
  step(): void {
    for (const g of this.paramGroups) {
      if (g.amsgrad || g.maximize || g.capturable || g.differentiable || g.fused) {
        throw new DistcpError('ERR_DISTCP_UNSUPPORTED', 'this AdamW implements amsgrad/maximize/capturable/differentiable/fused = off only')
      }
      const lr = num(g.lr)
      const [beta1, beta2] = pair(g.betas)
      const eps = num(g.eps)
      const wd = num(g.weight_decay)
      const decoupled = g.decoupled_weight_decay === true
      for (const p of g.params) {
        if (!p.grad) continue
        let s = this.state.get(p)
        if (!s) {
          const zeros = (): Tensor => ({ dtype: 'float32', shape: [...p.shape], data: new Uint8Array(p.data.byteLength) })
          s = { step: { dtype: 'float32', shape: [], data: new Uint8Array(4) }, exp_avg: zeros(), exp_avg_sq: zeros() }
          this.state.set(p, s)
        }
        const param = f32View(p)
        const grad = f32View(p.grad)
        const m = f32View(s.exp_avg)
        const v = f32View(s.exp_avg_sq)
        const stepT = f32View(s.step)
        stepT[0] = f32(stepT[0] + 1) // step_t += 1
        const decay = f32(1 - lr * wd) // param.mul_(1 - lr * weight_decay)
        const wdF = f32(wd)
        const w1 = f32(1 - beta1) // exp_avg.lerp_(grad, 1 - beta1)
        const b2 = f32(beta2) // exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        const c2 = f32(1 - beta2)
        const step = stepT[0]
        const biasCorrection1 = 1 - beta1 ** step
        const biasCorrection2 = 1 - beta2 ** step
        const stepSize = lr / biasCorrection1
        const bc2Sqrt = f32(Math.sqrt(biasCorrection2)) // bias_correction2 ** 0.5, then a float32 scalar
        const epsF = f32(eps)
        const negStep = f32(-stepSize) // addcdiv_(exp_avg, denom, value=-step_size)
        for (let i = 0; i < param.length; i++) {
          let gi = grad[i]
          if (wd !== 0) {
            if (decoupled) param[i] = f32(param[i] * decay)
            else gi = fma32(param[i], wdF, gi) // grad.add(param, alpha=weight_decay)
          }
          m[i] = lerp32(m[i], gi, w1)
          v[i] = fma32(f32(c2 * gi), gi, f32(v[i] * b2))
          const denom = f32(f32(f32(Math.sqrt(v[i])) / bc2Sqrt) + epsF)
          param[i] = f32(param[i] + f32(f32(negStep * m[i]) / denom))
        }
      }
    }
  }
}

/** torch.optim.Adam: AdamW's update with L2 weight decay added to the gradient (default 0). */
export class Adam extends AdamW {
  constructor(params: Parameter[] | AdamGroupInput[], options: AdamOptions = {}) {
    super(params, options, false)
  }
}

/**
 * torch.optim.lr_scheduler.StepLR: every `stepSize` steps, each group's lr is multiplied by `gamma` (the chainable
 * form `step()` uses: `group.lr * gamma`, not `base_lr * gamma ** (epoch // step_size)`). State dict: torch 2.15's
 * `__dict__` minus the optimizer, in its order.
 */
export class StepLR implements LRScheduler {
  readonly optimizer: Optimizer
  state: StateDict

  constructor(optimizer: Optimizer, options: { stepSize: number; gamma?: number; lastEpoch?: number }) {
    this.optimizer = optimizer
    const { stepSize, gamma = 0.1, lastEpoch = -1 } = options
    if (lastEpoch === -1) for (const g of optimizer.paramGroups) if (!('initial_lr' in g)) g.initial_lr = g.lr
    this.state = {
      step_size: stepSize,
      gamma,
      base_lrs: optimizer.paramGroups.map((g) => num(g.initial_lr)),
      last_epoch: lastEpoch,
    }
    // _initial_step()
    this.state._step_count = 0
    this.state._is_initial = true
    this.step()
    this.state._is_initial = false
  }

  /** The learning rates `step()` set last. */
  getLastLr(): number[] {
    return (this.state._last_lr as StateValue[]).map(num)
  }

  step(): void {
    this.state._step_count = num(this.state._step_count) + 1
    this.state._get_lr_called_within_step = true
    const epoch = num(this.state.last_epoch) + 1
    this.state.last_epoch = epoch
    const stepSize = num(this.state.step_size)
    const gamma = num(this.state.gamma)
    const lrs = this.optimizer.paramGroups.map((g) => (epoch === 0 || epoch % stepSize !== 0 ? num(g.lr) : num(g.lr) * gamma))
    this.state._get_lr_called_within_step = false
    this.optimizer.paramGroups.forEach((g, i) => (g.lr = lrs[i]))
    this.state._last_lr = this.optimizer.paramGroups.map((g) => num(g.lr))
  }

  /** `scheduler.state_dict()`, floats typed as Python floats. */
  stateDict(): StateDict {
    const out: StateDict = {}
    for (const [k, v] of Object.entries(this.state)) {
      out[k] = k === 'gamma' ? float(v) : k === 'base_lrs' || k === '_last_lr' ? floats(v) : v
    }
    return out
  }

  /** `scheduler.load_state_dict(sd)`: `__dict__.update(sd)`. */
  loadStateDict(sd: StateDict): void {
    Object.assign(this.state, sd)
  }
}
