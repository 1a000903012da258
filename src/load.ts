// torch's `dcp.load` for one process: flatten the target state dict the way torch does, look every flat key up in
// `.metadata`, read tensors into the target's own memory and put non-tensor values in place of the leaves.
import { openCheckpoint, type Checkpoint, type StateDict, type StateValue, type TensorInfo } from './checkpoint.js'
import { DistcpError } from './errors.js'
import { elementSize, numel, type DType, type Tensor } from './tensor.js'
import { PyTuple, type Encoded, type PyValue } from './values.js'
import { callNative } from './errors.js'
import { native } from './native.js'
import { checkCheckpointId, Encoder } from './save.js'
import type { Stateful } from './stateful.js'
import { asDeviceLeaf, requireCuda, type DeviceLeaf } from './cuda.js'
import type { ProcessGroup } from './distributed/group.js'
import { loadRanks } from './distributed/load.js'
import { shardOf } from './distributed/save.js'

/** What {@link load} accepts: a state dict whose top-level values may be {@link Stateful} objects. */
export type LoadStateDict = { [key: string]: StateValue | Stateful }

/** Options of {@link load} (torch's `dcp.load(state_dict, checkpoint_id=…)`). */
export interface LoadOptions {
  /** The checkpoint folder (the one holding `.metadata`). */
  checkpointId: string
  /**
   * `true` (default): any key of the state dict missing from the checkpoint, any checkpoint key the state dict
   * does not have, and any tensor whose dtype or shape differs is an error, raised before anything is loaded.
   * `false`: load what matches and report the rest.
   */
  strict?: boolean
  /**
   * `cuda:N`: tensors that replace non-tensor leaves are read into new device memory there ({@link DeviceTensor}s).
   * Leaves that already are device tensors (or `{ dtype, shape, device, ptr, byteLength }` targets) are always
   * filled on their device, whatever this says; host leaves stay on the host.
   */
  device?: string
  /**
   * Load together with the other ranks of this group (see `initProcessGroup`): each rank reads its own slices
   * (tensors with `globalShape`/`globalOffsets` read that box of the whole tensor, whatever number of ranks wrote
   * it), and if any rank fails every rank rejects with the same `CheckpointError` naming it.
   */
  processGroup?: ProcessGroup
}

/** One tensor (or value) that could not be loaded as it is. */
export interface Mismatch {
  key: string
  /** e.g. `checkpoint has float32 [8, 4], the state dict has float32 [16, 4]` */
  reason: string
}

/** What {@link load} found. With `strict` (the default) a load that returns has all three lists empty. */
export interface LoadReport {
  /** Flat keys of the state dict that the checkpoint does not have (left untouched). */
  missing: string[]
  /** Flat keys of the checkpoint that the state dict does not have (not read). */
  unexpected: string[]
  /** Keys present on both sides whose tensors differ in dtype or shape, or tensor vs non-tensor (left untouched). */
  mismatched: Mismatch[]
  /** Which torch flattening matched the checkpoint: `'2.4'` (torch ≥ 2.4) or `'2.3'` (older, spec §3.3). */
  layout: '2.4' | '2.3'
}

/** The strict-load error: every problem at once, in `report`. Nothing has been loaded when it is thrown. */
export class LoadMismatchError extends DistcpError {
  readonly report: LoadReport

  constructor(message: string, report: LoadReport) {
    super('ERR_DISTCP_STATE_MISMATCH', message)
    this.name = 'LoadMismatchError'
    this.report = report
  }
}

/** A step of a path: a dict key (a Map's key object as it is) or a list index. */
type PathItem = unknown
type Flat = Map<string, { path: PathItem[]; value: unknown }>

/** A tensor as a target: any `{ dtype, shape, data: ArrayBufferView }`. */
function asTensor(v: unknown): (Tensor & { data: ArrayBufferView }) | null {
  if (typeof v !== 'object' || v === null) return null
  const t = v as { dtype?: unknown; shape?: unknown; data?: unknown }
  return typeof t.dtype === 'string' && Array.isArray(t.shape) && ArrayBuffer.isView(t.data) ? (v as Tensor) : null
}

/**
 * torch's `flatten_state_dict` (the rules live in the Rust core, `distcp_core::write::flatten`): `'2.4'` is
 * `traverse_state_dict` (mappings always recursed, a list only when it holds a tensor, a mapping or a non-terminal
 * list; tuples never), `'2.3'` is `traverse_state_dict_v_2_3` (a mapping or list holding no tensor and no
 * non-terminal container is one item). Keys are Python's `str()` of each dict key, joined with dots; `path` holds
 * the original JS keys (Map keys as they are) and list indices.
 */
export function flattenStateDict(stateDict: Record<string, unknown>, layout: '2.4' | '2.3'): Flat {
  return new Map([...flattenLeaves(stateDict, layout)].map(([key, l]) => [key, { path: l.path, value: l.value }]))
}

/** {@link flattenStateDict}'s leaves by flat key, each with its setter. */
function flattenLeaves(stateDict: Record<string, unknown>, layout: '2.4' | '2.3'): Map<string, FlatLeaf> {
  const enc = new Encoder('flatten', true)
  const tree = enc.value(stateDict, '', 0)
  return new Map(flattenEncoded(stateDict, tree, enc.buffers.length, layout).map((l) => [l.key, l]))
}

/** One leaf of a flattened state dict. @internal */
export interface FlatLeaf {
  key: string
  /** The original JS keys (Map keys as they are) and list indices. */
  path: PathItem[]
  value: unknown
  /** Whether the core saw a tensor there. */
  tensor: boolean
  /** The path as torch records it in `planner_data` (dict keys and list indices). */
  plannerPath: (string | number)[]
  /** Replaces the leaf in its container (the Map, array or object that holds it) by `value`. */
  set(value: unknown): void
}

/** Puts `value` at `key` of `container` as an own property (a key like `__proto__` included). */
function setIn(container: unknown, key: PathItem, value: unknown): void {
  if (container instanceof Map) container.set(key, value)
  else Object.defineProperty(container, key as PropertyKey, { value, writable: true, enumerable: true, configurable: true })
}

/**
 * Flattens `root` given the tagged tree `tree` the {@link Encoder} made of it (with `tensorCount` buffers): the
 * core decides the keys, and each leaf is found in `root` by position, so no JS code re-derives `str(key)`.
 * @internal
 */
export function flattenEncoded(root: object, tree: Encoded, tensorCount: number, layout: '2.4' | '2.3'): FlatLeaf[] {
  const keys = callNative(() => native.flattenStateDictKeys(tree, tensorCount, layout))
  // children of each container in the order the encoder walked them (Object.keys / Map order / indices)
  const children = new Map<object, [PathItem, unknown][]>()
  const childrenOf = (c: object): [PathItem, unknown][] => {
    let list = children.get(c)
    if (!list) {
      if (Array.isArray(c)) list = c.map((v, i) => [i, v])
      else if (c instanceof Map) list = [...c.entries()]
      else list = Object.entries(c)
      children.set(c, list)
    }
    return list
  }
  return keys.map(({ key, positions, plannerPath, tensor }) => {
    let parent: object = root
    let cur: unknown = root
    const path: PathItem[] = []
    for (const p of positions) {
      parent = cur as object
      const [k, v] = childrenOf(parent)[p]
      path.push(k)
      cur = v
    }
    const slot = path[path.length - 1]
    return { key, path, value: cur, tensor, plannerPath, set: (value: unknown) => setIn(parent, slot, value) }
  })
}

/**
 * A value read in exact mode, with dicts whose keys are all strings turned into plain objects (torch ≤ 2.3 stores
 * whole containers, e.g. `optim.param_groups` or `optim.sched`, as one item).
 */
function plainDicts(v: PyValue): PyValue {
  if (v instanceof Map) {
    if ([...v.keys()].every((k) => typeof k === 'string')) {
      const o: { [key: string]: PyValue } = {}
      for (const [k, x] of v) setIn(o, k, plainDicts(x))
      return o
    }
    return new Map([...v].map(([k, x]) => [k, plainDicts(x)] as [PyValue, PyValue]))
  }
  if (Array.isArray(v)) return v.map(plainDicts)
  if (v instanceof PyTuple) return new PyTuple(v.items.map(plainDicts))
  return v
}

/** True for an object with `stateDict()` and `loadStateDict()`, like torch's runtime-checkable `Stateful`. */
export function isStateful(v: unknown): v is Stateful {
  return (
    typeof v === 'object' &&
    v !== null &&
    typeof (v as Stateful).stateDict === 'function' &&
    typeof (v as Stateful).loadStateDict === 'function'
  )
}

/** The whole tensor's shape: a rank's slice gives it as `globalShape` (checked by `shardOf`). */
function wholeShape(t: Tensor | DeviceLeaf, key: string, checkpointId: string): readonly number[] {
  const s = shardOf(t, key, checkpointId)
  return s ? s.globalShape : t.shape
}

const fmtTensor = (dtype: DType | string, shape: readonly number[]): string => `${dtype} [${shape.join(', ')}]`

/** @internal extra knobs for the checkpointing layer */
export interface InternalLoadOptions extends LoadOptions {
  /** Checkpoint keys that are not an error when the state dict lacks them (the seed ignores a saved scheduler). */
  ignoreUnexpected?: (key: string) => boolean
  /** Which rank-local `__{rank}.metadata` to read when there is no `.metadata` (a load with a process group). */
  rank?: number
}

/**
 * Loads a DCP checkpoint into `stateDict`, like torch's `dcp.load` in one process:
 * 1. every top-level {@link Stateful} value is replaced by its `stateDict()`;
 * 2. the tree is flattened the torch ≥ 2.4 way; when the checkpoint has keys that flattening does not produce and
 *    the torch ≤ 2.3 flattening does, the old one is used for the whole load (torch's fallback, spec §3.3);
 * 3. every key is checked first (presence, tensor dtype and shape): with `strict` any problem throws one
 *    {@link LoadMismatchError} listing all of them, before anything is read;
 * 4. non-tensor values are read and put in place of the leaves (exact Python types: `PyFloat`, `PyTuple`), then
 *    tensors are read straight into the existing tensors' memory (no cast: dtype and shape must match);
 * 5. `loadStateDict(sd)` is called on every Stateful value with its loaded state dict; other top-level values of
 *    `stateDict` are replaced by the loaded ones.
 *
 * Validation happens before any byte is written, so a strict load that throws leaves everything as it was; an I/O
 * error in the middle of step 4 can leave some tensors loaded.
 */
export async function load(stateDict: LoadStateDict, options: LoadOptions): Promise<LoadReport> {
  if (options?.processGroup) return loadRanks(stateDict, options, load)
  const { checkpointId, strict = true, ignoreUnexpected, device, rank } = options as InternalLoadOptions
  checkCheckpointId('load', checkpointId)
  if (typeof stateDict !== 'object' || stateDict === null) {
    throw new DistcpError('ERR_DISTCP_INVALID_INPUT', `${checkpointId}: load needs a state dict (a plain object)`)
  }
  const keys = Object.keys(stateDict).sort()
  const sd: StateDict = {}
  for (const k of keys) {
    const v = stateDict[k]
    // as an own property: `sd[k] = …` with k `__proto__` would set sd's prototype (and the key would vanish)
    setIn(sd, k, isStateful(v) ? await v.stateDict() : (v as StateValue))
  }

  const ck = await openCheckpoint(checkpointId, { rank })
  let report: LoadReport
  try {
    const ckKeys = ck.keys()
    const inCk = new Set(ckKeys)
    let layout: '2.4' | '2.3' = '2.4'
    let flat = flattenLeaves(sd, '2.4')
    const extra = ckKeys.filter((k) => !flat.has(k))
    if (extra.length > 0) {
      const old = flattenLeaves(sd, '2.3')
      if (extra.some((k) => old.has(k))) {
        flat = old
        layout = '2.3'
      }
    }

    report = { missing: [], unexpected: [], mismatched: [], layout }
    const tensorReads: { key: string; target: Tensor & { data: ArrayBufferView } }[] = []
    const deviceReads: { key: string; target: DeviceLeaf }[] = []
    const objectReads: { key: string; leaf: FlatLeaf; tensor: TensorInfo | null }[] = []
    for (const [key, leaf] of flat) {
      const { value } = leaf
      if (!inCk.has(key)) {
        report.missing.push(key)
        continue
      }
      const info = ck.info(key)
      const target = asTensor(value) ?? asDeviceLeaf(value)
      if (target) {
        // as save checks a tensor's shape (compared as text below, `[4n]` or `['4']` would otherwise pass, or throw
        // a TypeError in the byte count)
        const dims = target.shape.length
        for (let d = 0; d < dims; d++) {
          const n = target.shape[d]
          if (!(Number.isSafeInteger(n) && n >= 0)) {
            throw new DistcpError(
              'ERR_DISTCP_INVALID_INPUT',
              `${checkpointId}: key \`${key}\`: the state dict's tensor shape must hold non-negative integers, its dimension ${d} is ${typeof n === 'bigint' ? `${n}n` : typeof n === 'string' ? JSON.stringify(n) : String(n)}`,
            )
          }
        }
        if (info.kind !== 'tensor') {
          report.mismatched.push({ key, reason: `checkpoint has a non-tensor value, the state dict has a tensor` })
        } else if (info.dtype !== target.dtype || info.shape.join(',') !== wholeShape(target, key, checkpointId).join(',')) {
          report.mismatched.push({
            key,
            reason: `checkpoint has ${fmtTensor(info.dtype, info.shape)}, the state dict has ${fmtTensor(target.dtype, wholeShape(target, key, checkpointId))}`,
          })
        } else {
          const want = numel(target.shape) * elementSize(info.dtype)
          const have = 'data' in target ? target.data.byteLength : target.byteLength
          if (have !== want) {
            throw new DistcpError(
              'ERR_DISTCP_INVALID_INPUT',
              `${checkpointId}: key \`${key}\`: the state dict's ${fmtTensor(target.dtype, target.shape)} tensor holds ${have} bytes, not ${want}`,
            )
          }
          if ('data' in target) tensorReads.push({ key, target })
          else deviceReads.push({ key, target })
        }
      } else {
        // a non-tensor leaf is replaced by whatever the checkpoint holds (a tensor becomes a new tensor)
        objectReads.push({ key, leaf, tensor: info.kind === 'tensor' ? info : null })
      }
    }
    const inFlat = new Set(flat.keys())
    report.unexpected = ckKeys.filter((k) => !inFlat.has(k) && !(ignoreUnexpected?.(k) ?? false))

    if (strict && (report.missing.length || report.unexpected.length || report.mismatched.length)) {
      const lines = [`${checkpointId}: the state dict does not match the checkpoint (strict load; nothing was loaded)`]
      if (report.missing.length) lines.push(`  missing from the checkpoint (${report.missing.length}): ${report.missing.join(', ')}`)
      if (report.unexpected.length) {
        lines.push(`  in the checkpoint but not in the state dict (${report.unexpected.length}): ${report.unexpected.join(', ')}`)
      }
      if (report.mismatched.length) {
        lines.push(`  mismatched (${report.mismatched.length}):`)
        for (const m of report.mismatched) lines.push(`    ${m.key}: ${m.reason}`)
      }
      throw new LoadMismatchError(lines.join('\n'), report)
    }

    // no device, no load: found before any tensor is overwritten
    for (const d of new Set([...deviceReads.map((r) => r.target.device), ...(device !== undefined ? [device] : [])])) {
      requireCuda(d)
    }
    // values first (a bad record fails before any tensor is overwritten), then tensors into their buffers
    const values: { leaf: FlatLeaf; value: unknown }[] = []
    for (const r of objectReads) {
      const value = r.tensor
        ? device !== undefined
          ? await ck.read(r.key, { device })
          : await ck.read(r.key)
        : plainDicts(await ck.readObject(r.key, { exact: true }))
      values.push({ leaf: r.leaf, value })
    }
    await readTensors(ck, tensorReads)
    for (const { key, target } of deviceReads) {
      await ck.read(key, { into: { device: target.device, ptr: target.ptr, byteLength: target.byteLength } })
    }
    for (const { leaf, value } of values) leaf.set(value)
  } finally {
    ck.close()
  }

  for (const k of keys) {
    const v = stateDict[k]
    if (isStateful(v)) await v.loadStateDict(sd[k] as StateDict)
    else setIn(stateDict, k, sd[k])
  }
  return report
}

/** Reads tensors into their targets, a few at a time (each read runs on the native thread pool). */
async function readTensors(ck: Checkpoint, reads: { key: string; target: Tensor & { data: ArrayBufferView } }[]): Promise<void> {
  const width = 4
  let next = 0
  const worker = async (): Promise<void> => {
    while (next < reads.length) {
      const { key, target } = reads[next++]
      // a rank's slice (`globalOffsets`, see src/distributed/save.ts) is a box of the whole tensor: resharding
      const offsets = (target as { globalOffsets?: number[] }).globalOffsets
      await ck.read(key, offsets ? { into: target.data, offsets, sizes: target.shape } : { into: target.data })
    }
  }
  await Promise.all(Array.from({ length: Math.min(width, reads.length) }, worker))
}
