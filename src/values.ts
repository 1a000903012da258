import { DistcpError } from './errors.js'
import type { Tensor } from './tensor.js'
import type { TaggedValue } from './native.js'

/**
 * `f` of each item of a caller's array, in order, refusing a sparse array at its first hole
 * (`ERR_DISTCP_INVALID_INPUT` naming `what` and the index). A hole is never walked past: an array may claim a length
 * of up to 2**32 - 1 while holding a few items, and walking it to that length takes a minute, and copying it aborts
 * V8 ("invalid size error"), which no caller can catch. @internal
 */
export function mapItems<T, R>(a: readonly T[], what: string, f: (x: T, i: number) => R): R[] {
  const out: R[] = []
  // the length read once: an array that grows as it is read (a getter, a Proxy) would never let the walk end
  const n = a.length
  for (let i = 0; i < n; i++) {
    if (!(i in a)) throw sparseArray(what, i, n)
    out.push(f(a[i], i))
  }
  return out
}

/**
 * Whether `s` holds a lone surrogate (not valid Unicode). Native string arguments (paths, keys) reach the binding as
 * UTF-8, where each lone surrogate silently becomes U+FFFD: a save would go to another folder, a read to another
 * key. (The tagged tree of a state dict refuses them natively, `crates/distcp-node/src/tagged.rs`.) @internal
 */
export function hasLoneSurrogate(s: string): boolean {
  return /[\uD800-\uDBFF](?![\uDC00-\uDFFF])|(?<![\uD800-\uDBFF])[\uDC00-\uDFFF]/.test(s)
}

/** The error {@link mapItems} throws. @internal */
export function sparseArray(what: string, index: number, length: number): DistcpError {
  return new DistcpError('ERR_DISTCP_INVALID_INPUT', `${what}: a sparse array (index ${index} of its ${length} was never set)`)
}

/** A Python float, kept distinct from an int (only in `exact` mode; otherwise floats are plain numbers). */
export class PyFloat {
  constructor(readonly value: number) {}
  valueOf(): number {
    return this.value
  }
}

/** A Python tuple (only in `exact` mode; otherwise tuples are arrays). */
export class PyTuple {
  constructor(readonly items: PyValue[]) {}
}

/**
 * A non-tensor value from a checkpoint. Plain mode: None → null, int → number (bigint beyond 2^53), float →
 * number, str → string, bytes → Uint8Array, list/tuple → array, dict → plain object (keys stringified), tensor →
 * Tensor. Exact mode keeps Python's types: PyFloat, PyTuple, and dicts as Map with their original keys.
 */
export type PyValue =
  | null
  | boolean
  | number
  | bigint
  | string
  | Uint8Array
  | Tensor
  | PyFloat
  | PyTuple
  | PyValue[]
  | Map<PyValue, PyValue>
  | { [key: string]: PyValue }

/**
 * A value as the tagged tree exchanged with the native layer (`distcp_core::value`'s codec), both directions, as JS
 * objects and arrays (the binding converts them; no JSON text crosses). Its one definition is the binding's typings.
 */
export type Encoded = TaggedValue

/** The 16 hex digits of a float64's bits (exact for NaN payloads, ±0, ±∞). */
export function floatBits(x: number): string {
  const view = new DataView(new ArrayBuffer(8))
  view.setFloat64(0, x)
  return view.getBigUint64(0).toString(16).padStart(16, '0')
}

function floatFromBits(hex: string): number {
  const view = new DataView(new ArrayBuffer(8))
  view.setBigUint64(0, BigInt('0x' + hex))
  return view.getFloat64(0)
}

/** Decodes the tagged tree the native layer produces (`distcp_core::value::to_tagged_json`). */
export function decodeValue(value: Encoded, buffers: Uint8Array[], exact: boolean): PyValue {
  const walk = (e: Encoded): PyValue => {
    if (e === null || typeof e === 'boolean' || typeof e === 'number' || typeof e === 'string') return e
    if (Array.isArray(e)) return e.map(walk)
    if ('$f' in e) {
      const f = floatFromBits(e.$f)
      return exact ? new PyFloat(f) : f
    }
    if ('$i' in e) return BigInt(e.$i)
    if ('$t' in e) {
      const items = e.$t.map(walk)
      return exact ? new PyTuple(items) : items
    }
    if ('$b' in e) return buffers[e.$b]
    if ('$tensor' in e) return { dtype: e.dtype, shape: e.shape, data: buffers[e.$tensor] }
    if ('$d' in e) {
      if (exact) return new Map(e.$d.map(([k, v]) => [walk(k), walk(v)] as [PyValue, PyValue]))
      const out: { [key: string]: PyValue } = {}
      // a non-str key comes with Python's str(key) from the core (the one owner of that rule)
      // own properties: `out[k] = …` with k `__proto__` would set the prototype (the key lost, or a value's keys
      // showing through it)
      for (const [k, v, str] of e.$d) {
        Object.defineProperty(out, str ?? String(walk(k)), { value: walk(v), writable: true, enumerable: true, configurable: true })
      }
      return out
    }
    throw new Error('distcp: unknown value encoding from the native layer')
  }
  return walk(value)
}
