// ModelState / OptimizerState: NeMo-RL's `native_checkpoint` Stateful wrappers, with what torch's
// `get_optimizer_state_dict` / `set_optimizer_state_dict` do to an optimizer (FQN keys, state materialisation).
import type { StateDict, StateValue } from './checkpoint.js'
import { DistcpError } from './errors.js'
import type { Tensor } from './tensor.js'
import { mapItems, PyFloat, PyTuple } from './values.js'

/**
 * torch's `Stateful`: something `dcp.save` / `dcp.load` replace by its state dict, and load back in place.
 * {@link load} calls `stateDict()` to get the target tree (tensors in it are read into), then `loadStateDict()`
 * with the loaded tree.
 */
export interface Stateful {
  stateDict(): StateDict | Promise<StateDict>
  loadStateDict(stateDict: StateDict): void | Promise<void>
}

/** A trainable tensor: a {@link Tensor} plus its gradient (what `torch.nn.Parameter` is to a tensor). */
export interface Parameter extends Tensor {
  /** The gradient, same dtype and shape, or null/absent when there is none (torch's `param.grad`). */
  grad?: Tensor | null
  /** `false` for a frozen parameter (default: true). */
  requiresGrad?: boolean
}

/**
 * A model, shaped like `torch.nn.Module` as far as checkpointing goes.
 * - `namedParameters()`: `[fqn, parameter]` in `named_parameters()` order; a parameter shared under two names
 *   (tied weights) is listed once, under its first name. The objects must be the very ones the optimizer's
 *   `paramGroups[i].params` hold (identity is how parameters are matched, as in torch).
 * - `namedBuffers()` (optional): persistent buffers, `[fqn, tensor]`.
 * - `stateDict()`: `{ fqn: tensor }` for every parameter and persistent buffer (tied weights under each of their
 *   names, as `model.state_dict()` does). Tensors may share memory with the parameters: {@link load} reads into
 *   them, then calls `loadStateDict`.
 * - `loadStateDict(sd)`: copies the values in (strict, like `set_model_state_dict`'s default).
 */
export interface Model {
  namedParameters(): Iterable<[string, Parameter]>
  namedBuffers?(): Iterable<[string, Tensor]>
  stateDict(): StateDict
  loadStateDict(stateDict: StateDict): void | Promise<void>
}

/** A live parameter group of an optimizer: its parameters and hyper-parameters (`lr`, `betas`, …). */
export interface ParamGroup {
  params: Parameter[]
  /** The learning rate; {@link OptimizerState} sets it to 0 for a moment when it materialises state. */
  lr?: number | PyFloat
  [hyperParameter: string]: unknown
}

/** A parameter group in an optimizer state dict: hyper-parameters, and `params` as indices (PyTorch's layout). */
export interface ParamGroupState {
  params: number[]
  [hyperParameter: string]: StateValue
}

/**
 * `torch.optim.Optimizer.state_dict()`'s layout. `state` is keyed by parameter index: parameters are numbered
 * 0, 1, 2, … in the order they appear in `param_groups` (group after group); a parameter without state has no
 * entry. `param_groups[i].params` lists the indices of group i.
 */
export interface OptimizerStateDict {
  state: { [paramIndex: number]: { [name: string]: StateValue } }
  param_groups: ParamGroupState[]
}

/**
 * An optimizer in PyTorch's shape.
 * - `paramGroups`: the live groups (`optimizer.param_groups`); `lr` is read by `step()`.
 * - `stateDict()` / `loadStateDict()`: {@link OptimizerStateDict}; `loadStateDict` takes hyper-parameters from the
 *   given groups and state by index, like `Optimizer.load_state_dict`.
 * - `step()`: one update from the parameters' `grad` (parameters without a grad are skipped, as torch does).
 * - `zeroGrad(setToNone = true)`: clears the gradients.
 */
export interface Optimizer {
  readonly paramGroups: ParamGroup[]
  stateDict(): OptimizerStateDict
  loadStateDict(stateDict: OptimizerStateDict): void
  step(): void
  zeroGrad(setToNone?: boolean): void
}

/** A learning-rate scheduler in PyTorch's shape (`state_dict()` is its `__dict__` without the optimizer). */
export interface LRScheduler {
  stateDict(): StateDict
  loadStateDict(stateDict: StateDict): void
}

/** `ModelState(model)` from the seed: the model's state dict, keyed by FQN. */
export class ModelState implements Stateful {
  constructor(readonly model: Model) {}

  /** `get_model_state_dict(model)`: `{ fqn: tensor }`. */
  stateDict(): StateDict {
    return this.model.stateDict()
  }

  /** `set_model_state_dict(model, sd)`. */
  async loadStateDict(stateDict: StateDict): Promise<void> {
    await this.model.loadStateDict(stateDict)
  }
}

// Hyper-parameters whose torch defaults are Python floats, in optimizers and in LR schedulers. A plain JS number
// given for one of them is saved as a float even when integral (`lr: 1` → `1.0`), and an array under TUPLE_KEYS
// as a tuple. Keys whose torch defaults are ints (Adam's and SGD's `weight_decay=0`, SGD's `momentum=0` and
// `dampening=0`, Adagrad's `lr_decay=0`, ReduceLROnPlateau's `min_lrs`, `step_size`, `last_epoch`, …) keep the
// JS rule (integral → int): give a `PyFloat` to force a float there, as a Python user would write `0.0`.
const FLOAT_KEYS = new Set([
  // torch.optim param groups
  'lr',
  'initial_lr',
  'eps',
  'betas',
  'etas',
  'step_sizes',
  'alpha',
  'rho',
  'lambd',
  't0',
  'momentum_decay',
  'max_lr',
  'min_lr',
  // torch.optim.lr_scheduler state
  'gamma',
  'base_lrs',
  '_last_lr',
  'eta_min',
  'start_factor',
  'end_factor',
  'factor',
  'base_momentums',
  'max_momentums',
  'threshold',
  'best',
])
const TUPLE_KEYS = new Set(['betas', 'etas', 'step_sizes'])

function asFloats(v: StateValue): StateValue {
  if (typeof v === 'number') return new PyFloat(v)
  if (Array.isArray(v)) return mapItems(v, 'optimizer state', asFloats)
  if (v instanceof PyTuple) return new PyTuple(mapItems(v.items, 'optimizer state', (x) => asFloats(x as StateValue) as never))
  return v
}

/** Python types for known float hyper-parameters (see FLOAT_KEYS); everything else as given. */
function pythonTyped(entries: Iterable<[string, StateValue]>): StateDict {
  const out: StateDict = {}
  for (const [k, v] of entries) {
    let x = FLOAT_KEYS.has(k) ? asFloats(v) : v
    if (TUPLE_KEYS.has(k) && Array.isArray(x)) x = new PyTuple(x as never)
    out[k] = x
  }
  return out
}

const zerosLike = (t: Tensor): Tensor => ({ dtype: t.dtype, shape: [...t.shape], data: new Uint8Array(t.data.byteLength) })

/**
 * torch's `_init_optim_state`: an optimizer with no state yet (never stepped) and no gradients is stepped once
 * with zero gradients and every group's `lr` at 0, so that its state (AdamW: `step`, `exp_avg`, `exp_avg_sq`)
 * exists and parameters do not move; then `lr` is restored and gradients are dropped (`zeroGrad(true)`).
 */
export function initOptimizerState(optimizer: Optimizer): void {
  if (Object.keys(optimizer.stateDict().state).length > 0) return
  for (const g of optimizer.paramGroups) for (const p of g.params) if (p.grad != null) return
  for (const g of optimizer.paramGroups) for (const p of g.params) if (p.requiresGrad !== false) p.grad = zerosLike(p)
  const lrs: (number | PyFloat | undefined)[] = []
  for (const g of optimizer.paramGroups) {
    if ('lr' in g) {
      lrs.push(g.lr)
      g.lr = g.lr instanceof PyFloat ? new PyFloat(0) : 0
    }
  }
  optimizer.step()
  for (const g of optimizer.paramGroups) if ('lr' in g) g.lr = lrs.shift()
  optimizer.zeroGrad(true)
}

/** The optimizer state in the FQN layout `get_optimizer_state_dict` returns. */
export interface FqnOptimizerState {
  state: { [fqn: string]: { [name: string]: StateValue } }
  param_groups: ({ params: string[] } & { [hyperParameter: string]: StateValue })[]
}

/**
 * `OptimizerState(model, optimizer, scheduler?)` from the seed. Its state dict is
 * `{ optim: get_optimizer_state_dict(model, optimizer), sched?: scheduler.state_dict() }` (`sched` only with a
 * scheduler), which flattens to `optim.optim.state.<fqn>.exp_avg`, `optim.optim.param_groups.0.lr`, …,
 * `optim.sched.last_epoch` under the seed's top-level key `optim`.
 *
 * Like torch: optimizer state is keyed by parameter FQN (tied parameters once, under their first name),
 * `param_groups[i].params` become FQN lists, a never-stepped optimizer is materialised first
 * ({@link initOptimizerState}), and known float hyper-parameters are typed as Python floats (`PyFloat`), `betas`
 * as a tuple (`PyTuple`).
 */
export class OptimizerState implements Stateful {
  constructor(
    readonly model: Model,
    readonly optimizer: Optimizer,
    readonly scheduler?: LRScheduler | null,
  ) {}

  /** Parameter → FQN (first name), and index → parameter, following torch's matching by identity. */
  #mapping(): { fqnOf: Map<Parameter, string>; byIndex: Parameter[] } {
    const fqnOf = new Map<Parameter, string>()
    for (const [fqn, p] of this.model.namedParameters()) if (!fqnOf.has(p)) fqnOf.set(p, fqn)
    const byIndex = this.optimizer.paramGroups.flatMap((g) => g.params)
    return { fqnOf, byIndex }
  }

  /** `get_optimizer_state_dict(model, optimizer)` (+ the scheduler's state dict). */
  stateDict(): StateDict {
    initOptimizerState(this.optimizer)
    const osd = this.optimizer.stateDict()
    const { fqnOf, byIndex } = this.#mapping()
    const fqnOfIndex = (i: number, where: string): string => {
      const p = byIndex[i]
      const fqn = p === undefined ? undefined : fqnOf.get(p)
      if (fqn === undefined) {
        throw new DistcpError(
          'ERR_DISTCP_INVALID_INPUT',
          `OptimizerState: ${where}: parameter ${i} of the optimizer is not one of the model's namedParameters()`,
        )
      }
      return fqn
    }
    const state: FqnOptimizerState['state'] = {}
    for (const [k, v] of Object.entries(osd.state)) state[fqnOfIndex(Number(k), 'state')] = v
    const paramGroups = mapItems(osd.param_groups, 'optimizer param_groups', (g, gi) => {
      const typed = pythonTyped(Object.entries(g).filter(([k]) => k !== 'params'))
      typed.params = mapItems(g.params, `optimizer param_groups[${gi}].params`, (i) => fqnOfIndex(i, `param_groups[${gi}]`))
      return typed
    })
    const out: StateDict = { optim: { state, param_groups: paramGroups } }
    if (this.scheduler) out.sched = pythonTyped(Object.entries(this.scheduler.stateDict()))
    return out
  }

  /**
   * `set_optimizer_state_dict(model, optimizer, sd.optim)` then, when `sd` has `sched` and a scheduler was given,
   * `scheduler.loadStateDict(sd.sched)`. State is matched to parameters by FQN; every parameter that requires a
   * gradient must have state in `sd` (torch's strict default).
   */
  loadStateDict(stateDict: StateDict): void {
    const optim = stateDict.optim as unknown as FqnOptimizerState | undefined
    if (typeof optim !== 'object' || optim === null || typeof optim.state !== 'object' || !Array.isArray(optim.param_groups)) {
      throw new DistcpError('ERR_DISTCP_INVALID_INPUT', 'OptimizerState: the state dict has no `optim` with `state` and `param_groups`')
    }
    initOptimizerState(this.optimizer)
    this.optimizer.loadStateDict(this.#toIndexLayout(optim))
    if ('sched' in stateDict && this.scheduler) this.scheduler.loadStateDict(stateDict.sched as StateDict)
  }

  /** torch's `_split_optim_state_dict`, ending in the index layout `Optimizer.load_state_dict` expects. */
  #toIndexLayout(optim: FqnOptimizerState): OptimizerStateDict {
    const { fqnOf } = this.#mapping()
    const state: OptimizerStateDict['state'] = {}
    const groups: ParamGroupState[] = []
    const groupOf = new Map<object, number>()
    let index = 0
    for (const g of this.optimizer.paramGroups) {
      const params: number[] = []
      groups.push({ params })
      for (const p of g.params) {
        const fqn = fqnOf.get(p)
        if (fqn === undefined) {
          throw new DistcpError('ERR_DISTCP_INVALID_INPUT', `OptimizerState: parameter ${index} of the optimizer is not one of the model's namedParameters()`)
        }
        params.push(index)
        if (p.requiresGrad !== false) {
          if (Object.prototype.hasOwnProperty.call(optim.state, fqn)) state[index] = optim.state[fqn]
          else {
            throw new DistcpError(
              'ERR_DISTCP_STATE_MISMATCH',
              `Missing optimizer state for parameter '${fqn}' in checkpoint. The parameter requires gradients but has no saved optimizer state.`,
            )
          }
        }
        for (const lg of optim.param_groups) if (lg.params.includes(fqn)) groupOf.set(lg, groups.length - 1)
        index++
      }
      if (g.params.length === 0) {
        const empty = optim.param_groups.filter((lg) => lg.params.length === 0)
        if (empty.length !== 1) {
          throw new DistcpError(
            'ERR_DISTCP_STATE_MISMATCH',
            'OptimizerState: a parameter group with no parameters needs exactly one such group in the state dict',
          )
        }
        groupOf.set(empty[0], groups.length - 1)
      }
    }
    for (const lg of optim.param_groups) {
      const gi = groupOf.get(lg)
      if (gi === undefined) continue
      const { params } = groups[gi]
      const merged: ParamGroupState = { params: [] }
      delete (merged as { params?: number[] }).params
      for (const [k, v] of Object.entries(lg)) if (k !== 'params') merged[k] = v
      merged.params = params
      groups[gi] = merged
    }
    return { state, param_groups: groups }
  }
}
