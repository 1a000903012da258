import { awaitNative, callNative, DistcpError } from './errors.js'
import { native, type NativeCheckpoint, type CheckpointSummary, type CheckpointLayout } from './native.js'
import type { NestedTree } from '../binding.cjs'
import { elementSize, numel, type DType, type Tensor } from './tensor.js'
import { isDeviceRead, readToDevice, type DeviceReadOptions, type DeviceTarget, type DeviceTensor } from './cuda.js'
import { decodeValue, hasLoneSurrogate, type PyValue } from './values.js'

export type { CheckpointSummary, CheckpointLayout, DeviceReadOptions }

/** One stored chunk of a tensor: a box in global coordinates, and where its record lies. */
export interface ChunkInfo {
  offsets: number[]
  sizes: number[]
  file: string
  byteOffset: number
  byteLength: number
}

export interface TensorInfo {
  key: string
  kind: 'tensor'
  dtype: DType
  shape: number[]
  /** Bytes of the whole tensor. */
  nbytes: number
  chunks: ChunkInfo[]
  files: string[]
}

export interface ObjectInfo {
  key: string
  kind: 'object'
  /** Bytes of the stored record. */
  nbytes: number
  files: string[]
}

export interface ReadOptions {
  /**
   * Read into this memory instead of a new buffer; it must hold exactly the requested bytes. Do not read or
   * write it until the promise settles: the read runs on another thread. Nor transfer its buffer (`postMessage`,
   * `structuredClone` with `transfer`) meanwhile: the read would write into memory that is freed once the new
   * owner is collected, which no check can see. A resizable ArrayBuffer is refused.
   */
  into?: ArrayBufferView
  /** Start of the box to read, per dimension (default: 0). */
  offsets?: number[]
  /** Size of the box to read, per dimension (default: to the end). */
  sizes?: number[]
}

export interface ObjectReadOptions {
  /** Keep Python's types: floats as PyFloat, tuples as PyTuple, dicts as Map. */
  exact?: boolean
}

/** A nested state dict as torch saved it: dicts, lists, tensors and plain values. */
export type StateDict = { [key: string]: StateValue }
export type StateValue = PyValue | Tensor | DeviceTensor | StateValue[] | StateDict

function describe(v: unknown): string {
  if (v === null) return 'null'
  if (Array.isArray(v)) return 'an array'
  return typeof v === 'object' ? `a ${(v as object).constructor?.name ?? 'object'}` : `${typeof v} ${String(v)}`
}

function badArgument(name: string, expected: string, got: unknown): DistcpError {
  return new DistcpError('ERR_DISTCP_BAD_REQUEST', `\`${name}\` must be ${expected}, got ${describe(got)}`)
}

/** Argument checks for the public methods: wrong JS types become coded errors naming the argument. */
function checkString(v: unknown, name: string): asserts v is string {
  if (typeof v !== 'string') throw badArgument(name, 'a string', v)
  if (hasLoneSurrogate(v)) {
    throw new DistcpError('ERR_DISTCP_BAD_REQUEST', `\`${name}\` holds a lone surrogate (not valid Unicode), which would name another ${name}`)
  }
}

function checkOptions(v: unknown, name = 'options'): asserts v is Record<string, unknown> | undefined {
  if (v !== undefined && (v === null || typeof v !== 'object' || Array.isArray(v))) throw badArgument(name, 'an object', v)
}

function checkDims(v: unknown, name: string): asserts v is number[] | undefined {
  if (v === undefined) return
  // a loop that stops at the first bad entry: `every` would walk a sparse array's 2**32 - 1 holes
  const ok = (a: unknown[]): boolean => {
    // the length read once: an array that grows as it is read would never let the loop end
    const n = a.length
    for (let i = 0; i < n; i++) if (!(i in a) || !Number.isSafeInteger(a[i]) || (a[i] as number) < 0) return false
    return true
  }
  if (!Array.isArray(v) || !ok(v)) throw badArgument(name, 'an array of non-negative integers', v)
}

/** An open DCP checkpoint folder. Reads run on worker threads; only the chunks a read needs are touched. */
export class Checkpoint {
  readonly #native: NativeCheckpoint
  readonly path: string

  /** @internal use {@link openCheckpoint} */
  constructor(nativeCheckpoint: NativeCheckpoint, path: string) {
    this.#native = nativeCheckpoint
    this.path = path
  }

  /** Flat keys (`model.layers.0.weight`, `optim.param_groups.0.lr`, …) in `.metadata` order. */
  keys(): string[] {
    return callNative(() => this.#native.keys())
  }

  /** dtype, shape and chunks of a tensor, or the size of a non-tensor value. */
  info(key: string): TensorInfo | ObjectInfo {
    checkString(key, 'key')
    return callNative(() => this.#native.info(key))
  }

  /** Files, ranks and format details recorded in `.metadata`. */
  summary(): CheckpointSummary {
    return callNative(() => this.#native.summary())
  }

  /**
   * Reads a tensor, or a box of it (`offsets`/`sizes`), gathering bytes from every stored chunk whatever
   * dimension it was sharded on. The result is always a fresh buffer, read with positional reads: a file changed
   * under an open checkpoint gives an error, never a crash.
   */
  async read(key: string, options: DeviceReadOptions & ({ device: string } | { into: DeviceTarget })): Promise<DeviceTensor>
  async read(key: string, options?: ReadOptions): Promise<Tensor>
  async read(key: string, options: ReadOptions | DeviceReadOptions = {}): Promise<Tensor | DeviceTensor> {
    checkString(key, 'key')
    checkOptions(options)
    checkDims(options.offsets, 'offsets')
    checkDims(options.sizes, 'sizes')
    if (!isDeviceRead(options) && options.into !== undefined && !ArrayBuffer.isView(options.into)) {
      throw badArgument('into', 'an ArrayBufferView (a Buffer or typed array) or a device target { device, ptr, byteLength }', options.into)
    }
    const info = this.info(key)
    if (info.kind !== 'tensor') throw new DistcpError('ERR_DISTCP_BAD_REQUEST', `key \`${key}\` is not a tensor`)
    const { offsets, sizes } = options
    const shape = sizes ?? (offsets ? info.shape.map((n, d) => n - (offsets[d] ?? 0)) : info.shape)
    if (isDeviceRead(options)) return readToDevice(this.#native, key, info.dtype, shape, options)
    if ((options as DeviceReadOptions).dtype !== undefined) {
      throw new DistcpError('ERR_DISTCP_BAD_REQUEST', `key \`${key}\`: \`dtype\` casts apply to device reads only`)
    }
    const into = (options as ReadOptions).into
    if (into) {
      // the read writes from another thread: memory that shrinks under it (resize) is a segfault, not an error
      if ((into.buffer as { resizable?: boolean }).resizable === true) {
        throw badArgument('into', 'a view of a fixed-length buffer (a resizable ArrayBuffer may shrink under the read)', into)
      }
      const want = numel(shape) * elementSize(info.dtype)
      if (into.byteLength !== want) {
        throw new DistcpError(
          'ERR_DISTCP_BAD_REQUEST',
          `key \`${key}\`: \`into\` holds ${into.byteLength} bytes, the ${info.dtype} box [${shape}] needs ${want}`,
        )
      }
      // a view of a detached buffer holds 0 bytes, and no view can be made over it (V8 throws a TypeError)
      const bytes = want === 0 ? new Uint8Array(0) : new Uint8Array(into.buffer, into.byteOffset, into.byteLength)
      await awaitNative(() => this.#native.readInto(key, bytes, offsets, sizes))
      return { dtype: info.dtype, shape, data: bytes }
    }
    const data = await awaitNative(() => this.#native.read(key, offsets, sizes))
    return { dtype: info.dtype, shape, data }
  }

  /** Reads a non-tensor value (an int, a float, a list, a dict, …). */
  async readObject(key: string, options: ObjectReadOptions = {}): Promise<PyValue> {
    checkString(key, 'key')
    checkOptions(options)
    if (options.exact !== undefined && typeof options.exact !== 'boolean') throw badArgument('exact', 'a boolean', options.exact)
    const { value, buffers } = await awaitNative(() => this.#native.readObject(key))
    return decodeValue(value, buffers, options.exact ?? false)
  }

  /** Each key's path in the nested state dict, from `planner_data` (a key without one is its own path). */
  paths(): Map<string, (string | number)[]> {
    const keys = this.keys()
    const { lengths, elements } = callNative(() => this.#native.plannerPaths())
    const out = new Map<string, (string | number)[]>()
    let at = 0
    for (let i = 0; i < keys.length; i++) {
      out.set(keys[i], elements.slice(at, at + lengths[i]))
      at += lengths[i]
    }
    return out
  }

  /**
   * Reads everything into the nested state dict torch saved, unflattened through `planner_data` (works for
   * both the torch ≤ 2.3 and ≥ 2.4 key layouts). The nesting comes from the core before anything is read.
   */
  async readAll(options: ObjectReadOptions = {}): Promise<StateDict> {
    checkOptions(options)
    const keys = this.keys()
    const nested = callNative(() => this.#native.nested())
    const values: StateValue[] = []
    for (const key of keys) {
      values.push(this.info(key).kind === 'tensor' ? await this.read(key) : await this.readObject(key, options))
    }
    return fill(nested, values) as StateDict
  }

  /** @internal the native handle, for other parts of distcp */
  nativeHandle(): NativeCheckpoint {
    return this.#native
  }

  /** Releases the metadata and file mappings. Tensors already read stay valid. */
  close(): void {
    this.#native.close()
  }
}

/**
 * The core's nesting (`NativeCheckpoint.nested`, a preorder list of nodes) with each leaf, an index into `values`,
 * replaced by its value; a hole in a list is `null`.
 */
function fill(tree: NestedTree, values: StateValue[]): StateValue {
  const { kinds, values: counts, names } = tree
  const NestedKind = native.NestedKind
  let node = 0
  let name = 0
  // recursion depth is the nesting depth, which the core bounds (MAX_NESTING)
  const build = (): StateValue => {
    const i = node++
    const n = counts[i]
    switch (kinds[i]) {
      case NestedKind.Leaf:
        return values[n]
      case NestedKind.Hole:
        return null
      case NestedKind.List: {
        const list: StateValue[] = new Array<StateValue>(n)
        for (let c = 0; c < n; c++) list[c] = build()
        return list
      }
      case NestedKind.Dict: {
        // fromEntries defines own properties, so a key like `__proto__` stays a key
        const entries: [string, StateValue][] = new Array<[string, StateValue]>(n)
        for (let c = 0; c < n; c++) {
          const k = names[name++]
          entries[c] = [k, build()]
        }
        return Object.fromEntries(entries)
      }
    }
  }
  return build()
}

export interface OpenOptions {
  /** For checkpoints saved without collectives: read the rank-local `__{rank}.metadata`. */
  rank?: number
}

/** Opens a DCP checkpoint folder (the one holding `.metadata`). */
export async function openCheckpoint(path: string, options: OpenOptions = {}): Promise<Checkpoint> {
  checkString(path, 'path')
  checkOptions(options)
  if (options.rank !== undefined && !(Number.isInteger(options.rank) && options.rank >= 0 && options.rank < 2 ** 32)) {
    throw badArgument('rank', 'a non-negative integer', options.rank)
  }
  const n = await awaitNative(() => native.openNativeCheckpoint(path, options.rank))
  return new Checkpoint(n, path)
}

/** Options of {@link retarget}. */
export interface RetargetOptions {
  /** The torch version that must load the checkpoint, e.g. `'2.13'`. */
  torch: string
  /** Keep the original as `.metadata.orig` (default true; an existing `.metadata.orig` is an error, never replaced). */
  keepOriginal?: boolean
}

/** What {@link retarget} did. */
export interface RetargetResult {
  /** The oldest torch that loaded the checkpoint before, and after (`'2.15'`, `'2.0'`). */
  before: string
  after: string
  /** False when the checkpoint already loaded on that torch: nothing was written. */
  rewritten: boolean
  /** Where the original `.metadata` was kept (without one: the first rank-local file's original). */
  original?: string
  /**
   * Every metadata file that was rewritten: `.metadata` and the rank-local `__{rank}.metadata` that torch writes
   * when it saves without rank coordination (`use_collectives=False`); each original is kept beside it as `.orig`.
   */
  files: string[]
}

/**
 * Rewrites only the metadata files of the DCP checkpoint in `path` (`.metadata` and any rank-local
 * `__{rank}.metadata`) so that an older torch loads it (torch 2.15 writes 6-value `TensorProperties` that torch ≤ 2.14
 * cannot unpickle). The data files are untouched; each new file describes the same keys, chunks and storage, and
 * replaces the old one atomically; all are checked and written aside before the first replaces its original.
 */
export function retarget(path: string, options: RetargetOptions): RetargetResult {
  checkString(path, 'path')
  if (typeof options !== 'object' || options === null) throw new DistcpError('ERR_DISTCP_BAD_REQUEST', 'retarget: options.torch is required')
  checkString(options.torch, 'torch')
  if (options.keepOriginal !== undefined && typeof options.keepOriginal !== 'boolean') {
    throw badArgument('keepOriginal', 'a boolean', options.keepOriginal)
  }
  const r = callNative(() => native.retargetCheckpoint(path, options.torch, options.keepOriginal ?? true))
  return { before: r.before, after: r.after, rewritten: r.rewritten, ...(r.original ? { original: r.original } : {}), files: r.files }
}
