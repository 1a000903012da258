import { awaitNative, DistcpError } from './errors.js'
import { bindingTarget, native, type SaveResult } from './native.js'
import { elementSize, type DType } from './tensor.js'
import { stagingPool, type StageSource, type StagingLease, type StagingPool } from './staging.js'
import { floatBits, hasLoneSurrogate, PyFloat, PyTuple, sparseArray, type Encoded } from './values.js'
import { asDeviceLeaf, deviceLeavesOf, type DeviceLeaf } from './cuda.js'
import type { ProcessGroup } from './distributed/group.js'
import { saveRanks } from './distributed/save.js'

/** What `save` needs of a top-level value to replace it by its state dict: a `stateDict()` (see `Stateful`). */
export interface HasStateDict {
  stateDict(): unknown
}

/**
 * A state dict to save: plain objects (or Maps) and arrays whose leaves are tensors and Python-like values.
 * - tensor: `{ dtype, shape, data }`, row-major little-endian bytes in any ArrayBufferView (copied when `save` is called);
 * - device tensor: a `DeviceTensor`, or `{ dtype, shape, device, ptr, byteLength }` in CUDA memory (copied to the
 *   host through pinned staging first; the files are the same as a host save's);
 * - `null` → None, booleans → bool, strings → str, `Uint8Array`/`Buffer` → bytes;
 * - numbers: integers → int, others (and NaN, ±Infinity, -0) → float; `pyFloat(1)` forces a float (`1.0`);
 * - bigint → int of any size; `pyTuple(a, b)` / `new PyTuple([...])` → tuple; arrays → lists;
 * - plain objects → dicts with str keys, in JS property order (integer-like keys first, ascending); a `Map`
 *   keeps its order and may use int, float, bool or null keys.
 * Top-level values with a `stateDict()` method are replaced by its result, as `dcp.save` does.
 */
export type SaveStateDict = Record<string, unknown> | Map<unknown, unknown>

export interface SaveOptions {
  /** The checkpoint folder (created if needed; a checkpoint already there is replaced, crash-safely). */
  checkpointId: string
  /**
   * Which torch's flat keys to write: `'2.4'` (default; what torch ≥ 2.4 writes and reads, and 2.4.1+ also
   * reads back the old way) or `'2.3'` (a container without tensors is one item, for torch ≤ 2.3 readers).
   */
  layout?: '2.4' | '2.3'
  /**
   * Save together with the other ranks of this group (see `initProcessGroup`): tensors may be a rank's slice
   * (`{ dtype, shape, data, globalShape, globalOffsets }`), replicated tensors are written once, each rank writes
   * `__{rank}_0.distcp` and rank 0 writes `.metadata` last, after every rank succeeded (`src/distributed/save.ts`).
   */
  processGroup?: ProcessGroup
  /**
   * With `processGroup`: `false` saves without coordination, as torch's `dcp.save(..., use_collectives=False)`:
   * each rank writes `__{rank}_0.distcp` and its own `__{rank}.metadata` (no `.metadata`; `load` with the group
   * reads each rank's own file), replacing only its own files. A folder holding a `.metadata` is refused
   * (`ERR_DISTCP_GLOBAL_METADATA`: readers would load that instead). Unlike torch, no barrier is waited at the end.
   * Default `true`.
   */
  useCollectives?: boolean
  /** @internal test hook: stop the save at a point, with an error or (abort: true) by killing the process. */
  _testFailAt?: { point: string; abort?: boolean }
}

// What a save wrote (flat keys, counts, the data file `.metadata` names, sizes): the binding's type, re-exported as
// it is so that the API reference documents it
export type { SaveResult }

/** Marks a number as a Python float, so that `pyFloat(1)` is saved as `1.0`, not `1`. */
export function pyFloat(x: number): PyFloat {
  return new PyFloat(x)
}

/** A Python tuple (saved as one item: torch never recurses into tuples). */
export function pyTuple(...items: unknown[]): PyTuple {
  return new PyTuple(items as ConstructorParameters<typeof PyTuple>[0])
}

/** `options.checkpointId` of `save` / `load` (`fn`): a folder path, as a string that names one folder. @internal */
export function checkCheckpointId(fn: string, checkpointId: unknown): asserts checkpointId is string {
  if (typeof checkpointId !== 'string' || checkpointId === '') {
    throw new DistcpError('ERR_DISTCP_INVALID_INPUT', `${fn}: options.checkpointId must be a folder path`)
  }
  if (hasLoneSurrogate(checkpointId)) {
    throw new DistcpError(
      'ERR_DISTCP_INVALID_INPUT',
      `${fn}: options.checkpointId holds a lone surrogate (not valid Unicode), which would name another folder`,
    )
  }
}

/** Deeper than this is refused: the core's limit (`limits::MAX_NESTING`), one value for every layer. */
const MAX_DEPTH = native.maxNesting()

function describe(v: unknown): string {
  if (typeof v === 'function') return 'a function'
  if (typeof v === 'symbol') return 'a symbol'
  if (v === undefined) return 'undefined'
  if (typeof v === 'object' && v !== null) return `an instance of ${v.constructor?.name ?? 'an unknown class'}`
  return typeof v
}

function isPlainObject(v: object): boolean {
  const proto = Object.getPrototypeOf(v)
  return proto === Object.prototype || proto === null
}

function looksLikeTensor(v: object): v is { dtype: unknown; shape: unknown; data: ArrayBufferView } {
  const t = v as { dtype?: unknown; shape?: unknown; data?: unknown }
  return typeof t.dtype === 'string' && Array.isArray(t.shape) && ArrayBuffer.isView(t.data)
}

/**
 * A plain object meant as a tensor: it has `data` and a `dtype` or a `shape`. Saving it as a dict
 * (`w.dtype`, `w.shape`, `w.data`) would silently write something else than the user meant, so a malformed one
 * is an error; a dict that really has such keys can be a `Map`.
 */
function meantAsTensor(v: object): boolean {
  return Object.hasOwn(v, 'data') && (Object.hasOwn(v, 'dtype') || Object.hasOwn(v, 'shape'))
}

/**
 * The bytes of `view`. They are copied into staging memory (`stagingPool`) before `save` returns its promise: a
 * save runs on a worker thread, and bytes it only borrowed could be changed or freed under it (an ArrayBuffer
 * transferred away with `structuredClone(…, { transfer })` and collected), so after the copy the caller may
 * change or transfer its buffers.
 */
function bytesOf(view: ArrayBufferView): Uint8Array {
  // a view of a detached buffer has no bytes, and a view cannot be made over it (V8 throws a TypeError)
  if (view.byteLength === 0) return new Uint8Array(0)
  return new Uint8Array(view.buffer, view.byteOffset, view.byteLength)
}

/**
 * A state dict as the tagged tree the native layer reads (`distcp_core::value::from_tagged_json`). `lenient` is for
 * load targets, whose leaves are only placeholders: any leaf that cannot be saved (a class instance, undefined…)
 * becomes `null` (still a leaf, which is all flattening needs), and tensors are not checked against their bytes.
 * @internal
 */
export class Encoder {
  /** The bytes each `$tensor` / `$b` index names: host views, or device tensors (staged device-to-host). */
  readonly buffers: StageSource[] = []
  readonly #ancestors = new Set<object>()

  /** `deviceLeaves`: the device tensors in the tree (see {@link deviceLeavesOf}), encoded as tensors. */
  constructor(
    readonly checkpointId: string,
    readonly lenient = false,
    readonly deviceLeaves: Map<object, DeviceLeaf> = new Map(),
  ) {}

  fail(path: string, reason: string): never {
    throw new DistcpError('ERR_DISTCP_INVALID_INPUT', `${this.checkpointId}: cannot save key \`${path}\`: ${reason}`)
  }

  number(x: number): Encoded {
    if (Number.isInteger(x) && !Object.is(x, -0)) {
      return Number.isSafeInteger(x) ? x : { $i: BigInt(x).toString() }
    }
    return { $f: floatBits(x) }
  }

  key(k: unknown, path: string): Encoded {
    if (typeof k === 'string' || typeof k === 'boolean' || k === null) return k
    if (typeof k === 'number') return this.number(k)
    if (typeof k === 'bigint') return { $i: k.toString() }
    if (k instanceof PyFloat) return { $f: floatBits(k.value) }
    if (k instanceof PyTuple) return this.value(k, path, 0)
    return this.fail(path, `a Map key must be a string, number, bigint, boolean, null or tuple, not ${describe(k)}`)
  }

  tensor(t: { dtype: unknown; shape: unknown[]; data: ArrayBufferView | DeviceLeaf }, path: string): Encoded {
    const dtype = t.dtype as DType
    const shape: number[] = []
    // the length read once: a getter or a Proxy that grows the array as it is read would never let the walk end
    const dims = t.shape.length
    for (let i = 0; i < dims; i++) {
      const d = t.shape[i]
      if (!(i in t.shape)) return this.fail(path, sparseArray('its shape', i, dims).message)
      if (typeof d === 'number' && Number.isSafeInteger(d) && d >= 0) shape.push(d)
      else if (this.lenient) shape.push(0)
      else {
        const shown = t.shape.length > 8 ? `${t.shape.slice(0, 8).map(String)},… (${t.shape.length})` : t.shape.map(String)
        return this.fail(path, `shape [${shown}] must hold non-negative integers`)
      }
    }
    if (this.lenient) {
      this.buffers.push(new Uint8Array(0))
      return { $tensor: this.buffers.length - 1, dtype, shape }
    }
    const size = elementSize(dtype)
    if (typeof size !== 'number') return this.fail(path, `unknown dtype \`${String(t.dtype)}\``)
    let n = 1
    for (const d of shape) n *= d
    const want = n * size
    if (t.data.byteLength !== want) {
      return this.fail(
        path,
        `a ${dtype} tensor of shape [${t.shape}] needs ${want} bytes (shape × ${size}), its data has ${t.data.byteLength}`,
      )
    }
    this.buffers.push(ArrayBuffer.isView(t.data) ? bytesOf(t.data) : t.data)
    return { $tensor: this.buffers.length - 1, dtype, shape }
  }

  /** A list's or tuple's items; a hole is refused, never walked past (see `mapItems`), lenient or not. */
  items(a: readonly unknown[], path: string, depth: number): Encoded[] {
    const out: Encoded[] = []
    // the length read once: a getter or a Proxy that grows the list as it is walked would never let the walk end
    const n = a.length
    for (let i = 0; i < n; i++) {
      if (!(i in a)) return this.fail(`${path}.${i}`, sparseArray('this list', i, n).message)
      out.push(this.value(a[i], `${path}.${i}`, depth + 1))
    }
    return out
  }

  value(v: unknown, path: string, depth: number): Encoded {
    if (depth > MAX_DEPTH) return this.fail(path, `nested more than ${MAX_DEPTH} levels deep`)
    switch (typeof v) {
      case 'boolean':
      case 'string':
        return v
      case 'number':
        return this.number(v)
      case 'bigint':
        return { $i: v.toString() }
      case 'undefined':
        if (this.lenient) return null
        return this.fail(path, 'undefined has no Python equivalent (use null for None)')
      case 'function':
      case 'symbol':
        if (this.lenient) return null
        return this.fail(path, `${describe(v)} cannot be saved`)
    }
    if (v === null) return null
    const o = v as object
    if (o instanceof PyFloat) {
      if (typeof o.value !== 'number') return this.fail(path, 'a PyFloat must hold a number')
      return { $f: floatBits(o.value) }
    }
    if (this.#ancestors.has(o)) return this.fail(path, 'a cycle: this value contains itself')
    this.#ancestors.add(o)
    try {
      if (o instanceof PyTuple) {
        if (!Array.isArray(o.items)) return this.fail(path, `a PyTuple must hold an array of items, not ${describe(o.items)}`)
        return { $t: this.items(o.items, path, depth) }
      }
      if (o instanceof Uint8Array) {
        this.buffers.push(o)
        return { $b: this.buffers.length - 1 }
      }
      if (ArrayBuffer.isView(o)) {
        return this.fail(path, `a bare ${o.constructor.name} is ambiguous: wrap it as a tensor { dtype, shape, data }`)
      }
      if (Array.isArray(o)) return this.items(o, path, depth)
      if (o instanceof Map) {
        const pairs: [Encoded, Encoded][] = []
        // the entries as they are now: a Map iterator also visits entries added during the walk (by a getter below)
        for (const [k, x] of [...o]) {
          const label = k instanceof PyFloat ? String(k.value) : String(k)
          pairs.push([this.key(k, path), this.value(x, path ? `${path}.${label}` : label, depth + 1)])
        }
        return { $d: pairs }
      }
      if (this.lenient && asDeviceLeaf(o)) return this.tensor(o as { dtype: unknown; shape: unknown[]; data: ArrayBufferView }, path)
      const onDevice = this.deviceLeaves.get(o)
      if (onDevice) return this.tensor({ dtype: onDevice.dtype, shape: onDevice.shape, data: onDevice }, path)
      if (looksLikeTensor(o)) return this.tensor(o as { dtype: unknown; shape: unknown[]; data: ArrayBufferView }, path)
      if (!this.lenient && isPlainObject(o) && meantAsTensor(o)) {
        const t = o as { dtype?: unknown; shape?: unknown; data?: unknown }
        const wrong = [
          typeof t.dtype !== 'string' && `dtype must be a dtype name (e.g. 'float32'), not ${describe(t.dtype)}`,
          !Array.isArray(t.shape) && `shape must be an array of sizes, not ${describe(t.shape)}`,
          !ArrayBuffer.isView(t.data) && `data must be an ArrayBufferView (a typed array or Buffer), not ${Array.isArray(t.data) ? 'a plain array' : describe(t.data)}`,
        ].filter(Boolean)
        return this.fail(path, `looks like a tensor but ${wrong.join('; ')} (a dict with these keys can be saved as a Map)`)
      }
      if (this.lenient && !isPlainObject(o)) return null
      if (typeof (o as Partial<HasStateDict>).stateDict === 'function') {
        return this.fail(path, 'a Stateful below the top level: dcp.save only calls state_dict() on top-level values')
      }
      if (isPlainObject(o)) {
        const pairs: [Encoded, Encoded][] = []
        for (const k of Object.keys(o)) {
          pairs.push([k, this.value((o as Record<string, unknown>)[k], path ? `${path}.${k}` : k, depth + 1)])
        }
        return { $d: pairs }
      }
      return this.fail(path, `${describe(o)} cannot be saved (only plain objects, Maps, arrays, tensors and scalars)`)
    } finally {
      this.#ancestors.delete(o)
    }
  }
}

/**
 * A state dict whose bytes are copied into staging memory and that is ready to be written: what `save` and
 * `saveAsync` make when they are called. {@link writeStaged} writes it and gives its staging memory back.
 * @internal
 */
export interface StagedSave {
  checkpointId: string
  layout?: '2.4' | '2.3'
  tree: Encoded
  buffers: Uint8Array[]
  lease: StagingLease
  failAt?: SaveOptions['_testFailAt']
}

/** A state dict encoded for the native layer, its tensors' bytes still the caller's (in host or device memory). */
interface EncodedSave {
  checkpointId: string
  layout?: '2.4' | '2.3'
  tree: Encoded
  sources: StageSource[]
  failAt?: SaveOptions['_testFailAt']
}

/**
 * Checks the options and the state dict, calls top-level `stateDict()`s and encodes the tree. Returns a promise
 * only when a Stateful's `stateDict()` has to be awaited: otherwise it runs to the end in the call, which is what
 * lets `save` copy every host tensor before it returns.
 */
function encodeSave(stateDict: SaveStateDict, options: SaveOptions): EncodedSave | Promise<EncodedSave> {
  const { checkpointId, layout } = options ?? ({} as SaveOptions)
  checkCheckpointId('save', checkpointId)
  if (layout !== undefined && layout !== '2.4' && layout !== '2.3') {
    throw new DistcpError('ERR_DISTCP_INVALID_INPUT', `save: layout must be '2.4' or '2.3', not ${String(layout)}`)
  }
  const encode = (top: Map<unknown, unknown>): EncodedSave => {
    const enc = new Encoder(checkpointId, false, deviceLeavesOf(top))
    const tree = enc.value(top, '', 0)
    return { checkpointId, layout, tree, sources: enc.buffers, failAt: options._testFailAt }
  }
  const top = topLevel(stateDict, checkpointId)
  return top instanceof Promise ? top.then(encode) : encode(top)
}

/**
 * The state dict's top level, checked (a plain object or a Map), with Stateful values replaced by their
 * `stateDict()` as `dcp.save` does. A promise only when a `stateDict()` has to be awaited. @internal
 */
export function topLevel(stateDict: SaveStateDict, checkpointId: string): Map<unknown, unknown> | Promise<Map<unknown, unknown>> {
  const isMap = stateDict instanceof Map
  if (typeof stateDict !== 'object' || stateDict === null || (!isMap && !isPlainObject(stateDict))) {
    throw new DistcpError(
      'ERR_DISTCP_INVALID_INPUT',
      `${checkpointId}: the state dict must be a plain object or a Map, not ${describe(stateDict)}`,
    )
  }
  const entries: [unknown, unknown][] = isMap ? [...stateDict.entries()] : Object.entries(stateDict)
  const isStateful = (v: unknown): v is HasStateDict =>
    typeof v === 'object' && v !== null && typeof (v as Partial<HasStateDict>).stateDict === 'function'
  if (!entries.some(([, v]) => isStateful(v))) return new Map(entries)
  return (async () => {
    const top = new Map<unknown, unknown>()
    for (const [k, v] of entries) top.set(k, isStateful(v) ? await v.stateDict() : v)
    return top
  })()
}

/**
 * Checks the options and the state dict, calls top-level `stateDict()`s, and copies every tensor's bytes into
 * staging blocks of `pool` (reused across saves). When no top-level value is Stateful this runs to the end before
 * the returned promise exists: the copy is done when the call returns.
 * @internal
 */
export async function stageSave(stateDict: SaveStateDict, options: SaveOptions, pool: StagingPool = stagingPool): Promise<StagedSave> {
  const e = encodeSave(stateDict, options)
  const { checkpointId, layout, tree, sources, failAt } = e instanceof Promise ? await e : e
  const staged = pool.stage(sources)
  const { copies, lease } = staged instanceof Promise ? await staged : staged
  return { checkpointId, layout, tree, buffers: copies, lease, failAt }
}

/** The writer is told how far the copy has got after at least this many bytes (and at the end). */
const ADVANCE_BYTES = 8 << 20

/**
 * `save` for one process: the copy into staging memory and the write overlap. The writer (a worker thread) starts
 * first, on staging views that are still empty, and writes each item once the copy (on this thread, in the
 * call, as before) has filled it — a `StagingGate` tells it how far the copy has got. The copy is still complete
 * before `save` returns its promise, and the writer only ever reads distcp's own staging memory.
 */
async function saveOverlapped(stateDict: SaveStateDict, options: SaveOptions, pool: StagingPool = stagingPool): Promise<SaveResult> {
  const e = encodeSave(stateDict, options)
  const s = e instanceof Promise ? await e : e
  const { copies, lease, fill } = pool.reserve(s.sources)
  const gate = new native.StagingGate()
  let written: Promise<SaveResult>
  try {
    written = awaitNative(() =>
      native.writeStateDict(s.checkpointId, s.tree, copies, { layout: s.layout, failAt: s.failAt?.point, failAbort: s.failAt?.abort }, gate),
    )
  } catch (err) {
    lease.release()
    throw err
  }
  try {
    let since = 0
    let last = 0
    // device tensors are copied as the writer goes (their device-to-host transfers overlap the file writes)
    const filling = fill((filled) => {
      since += s.sources[filled - 1].byteLength
      if (since >= ADVANCE_BYTES) {
        gate.advance(filled)
        since = 0
        last = filled
      }
    })
    if (filling) await filling
    if (last < s.sources.length) gate.advance(s.sources.length)
  } catch (err) {
    gate.abort()
    await written.catch(() => undefined)
    lease.release()
    throw err
  }
  try {
    return await written
  } finally {
    lease.release()
  }
}

/**
 * Writes a staged save (on a worker thread) and gives its staging memory back when it settles. `background`
 * (saveAsync) writes at a lower CPU priority, so that the trainer running meanwhile keeps its cores. @internal
 */
export async function writeStaged(s: StagedSave, { background = false }: { background?: boolean } = {}): Promise<SaveResult> {
  try {
    return await awaitNative(() =>
      native.writeStateDict(s.checkpointId, s.tree, s.buffers, {
        layout: s.layout,
        failAt: s.failAt?.point,
        failAbort: s.failAt?.abort,
        background,
      }),
    )
  } finally {
    s.lease.release()
  }
}

/**
 * Saves a state dict as a DCP checkpoint that `torch.distributed.checkpoint.load` reads (torch's `dcp.save` for
 * one rank): one data file `__0_0.distcp` and `.metadata`, written and fsynced in torch's commit order. Tensor
 * bytes are copied when `save` is called (before it returns its promise), into staging memory that distcp reuses
 * across saves (see `stagingPool`), so the caller may change, reuse or transfer its buffers at once. For a save
 * that lets the caller go on while it writes, see `saveAsync`.
 */
export async function save(stateDict: SaveStateDict, options: SaveOptions): Promise<SaveResult> {
  if (options?.processGroup) {
    const { checkpointId, layout, processGroup, useCollectives } = options
    checkCheckpointId('save', checkpointId)
    return saveRanks(stateDict, { checkpointId, layout, processGroup, useCollectives })
  }
  // the WASM fallback sees a copy of each staging view, made when the writer is called: it must be filled first
  if (bindingTarget !== 'native') return writeStaged(await stageSave(stateDict, options))
  return saveOverlapped(stateDict, options)
}
