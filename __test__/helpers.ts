import { spawn, spawnSync } from 'node:child_process'
import { readFileSync, existsSync, cpSync, mkdirSync, mkdtempSync } from 'node:fs'
import { createServer } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import type { ExecutionContext } from 'ava'

import { openCheckpoint, DistcpError, PyFloat, PyTuple, isTensor, elementSize, type PyValue, type Tensor, type DType } from '../src/index.js'

export const root = new URL('..', import.meta.url).pathname

export function pythonPath(): string {
  return process.env.DISTCP_PYTHON ?? join(root, '.venv', 'bin', 'python')
}

/** Runs a Python script with the pinned torch; returns stdout, throws with stderr on failure. */
export function runPython(args: string[], timeoutMs = 240_000): string {
  const r = spawnSync(pythonPath(), args, { cwd: root, encoding: 'utf8', timeout: timeoutMs, maxBuffer: 1 << 26 })
  if (r.error) throw r.error
  if (r.status !== 0) throw new Error(`python ${args.join(' ')} failed (${r.status}):\n${r.stderr}`)
  return r.stdout
}

/** Tensors of a safetensors file (torch wrote them as flat uint8 views of the original bytes). */
export function readSafetensors(path: string): Map<string, Uint8Array> {
  const buf = readFileSync(path)
  const n = Number(buf.readBigUInt64LE(0))
  const header = JSON.parse(buf.subarray(8, 8 + n).toString('utf8')) as Record<string, { data_offsets: [number, number] }>
  const out = new Map<string, Uint8Array>()
  for (const [k, v] of Object.entries(header)) {
    if (k === '__metadata__') continue
    out.set(k, new Uint8Array(buf.subarray(8 + n + v.data_offsets[0], 8 + n + v.data_offsets[1])))
  }
  return out
}

/** Python's float.hex() back to a number, exactly. */
export function floatFromHex(s: string): number {
  if (s === 'nan') return NaN
  if (s === 'inf') return Infinity
  if (s === '-inf') return -Infinity
  const m = /^(-)?0x([01])\.([0-9a-f]*)p([+-]\d+)$/.exec(s)
  if (!m) throw new Error(`not a float.hex() string: ${s}`)
  const mantissa = Number(BigInt('0x' + m[2] + (m[3] || '0')))
  const exp = Number(m[4]) - 4 * Math.max(m[3].length, 1)
  // two steps so subnormals and large exponents stay exact
  const half = Math.trunc(exp / 2)
  const v = mantissa * 2 ** half * 2 ** (exp - half)
  return m[1] ? -v : v
}

export type Typed =
  | { t: 'none' }
  | { t: 'bool'; v: boolean }
  | { t: 'int'; v: string }
  | { t: 'float'; v: string }
  | { t: 'str'; v: string }
  | { t: 'bytes'; v: string }
  | { t: 'list' | 'tuple'; v: Typed[] }
  | { t: 'dict'; v: [Typed, Typed][] }
  | { t: 'tensor'; key: string }
  | { t: 'tensor'; dtype: DType; shape: number[]; hex: string }

export interface Expected {
  torch_version: string
  world_size: number
  tensors: Record<string, { dtype: DType; shape: number[] }>
  objects: Record<string, Typed>
  tree: Typed
}

export function loadExpected(dir: string): { expected: Expected; bytes: Map<string, Uint8Array> } {
  const expected = JSON.parse(readFileSync(join(dir, 'expected.json'), 'utf8')) as Expected
  const st = join(dir, 'expected.safetensors')
  return { expected, bytes: existsSync(st) ? readSafetensors(st) : new Map() }
}

function sameBytes(a: Uint8Array, b: Uint8Array): boolean {
  return a.byteLength === b.byteLength && Buffer.compare(Buffer.from(a.buffer, a.byteOffset, a.byteLength), Buffer.from(b.buffer, b.byteOffset, b.byteLength)) === 0
}

/** Compares a value read in exact mode with torch's typed export; returns a list of differences. */
export function diffTyped(actual: unknown, want: Typed, tensors: Map<string, Uint8Array>, at: string, out: string[]): void {
  const fail = (msg: string): void => {
    out.push(`${at}: ${msg}`)
  }
  switch (want.t) {
    case 'none':
      if (actual !== null) fail(`expected None, got ${String(actual)}`)
      return
    case 'bool':
      if (actual !== want.v) fail(`expected ${want.v}, got ${String(actual)}`)
      return
    case 'int':
      if (!(typeof actual === 'bigint' || (typeof actual === 'number' && Number.isInteger(actual))) || BigInt(actual) !== BigInt(want.v)) {
        fail(`expected int ${want.v}, got ${typeof actual} ${String(actual)}`)
      }
      return
    case 'float':
      if (!(actual instanceof PyFloat) || !Object.is(actual.value, floatFromHex(want.v))) {
        fail(`expected float ${want.v}, got ${actual instanceof PyFloat ? `float ${actual.value}` : `${typeof actual} ${String(actual)}`}`)
      }
      return
    case 'str':
      if (actual !== want.v) fail(`expected ${JSON.stringify(want.v)}, got ${String(actual)}`)
      return
    case 'bytes':
      if (!(actual instanceof Uint8Array) || isTensor(actual) || !sameBytes(actual, Buffer.from(want.v, 'base64'))) fail('bytes differ')
      return
    case 'list':
    case 'tuple': {
      const items = want.t === 'tuple' && actual instanceof PyTuple ? actual.items : actual
      if (want.t === 'tuple' && !(actual instanceof PyTuple)) return fail(`expected a tuple, got ${describe(actual)}`)
      if (!Array.isArray(items)) return fail(`expected a ${want.t}, got ${describe(actual)}`)
      if (items.length !== want.v.length) return fail(`expected ${want.v.length} items, got ${items.length}`)
      want.v.forEach((w, i) => diffTyped(items[i], w, tensors, `${at}[${i}]`, out))
      return
    }
    case 'dict': {
      let entries: [unknown, unknown][]
      if (actual instanceof Map) entries = [...actual.entries()]
      else if (typeof actual === 'object' && actual !== null && !Array.isArray(actual) && !isTensor(actual)) entries = Object.entries(actual)
      else if (actual === undefined && want.v.length === 0) return // torch >= 2.4 stores no key for an empty dict
      else return fail(`expected a dict, got ${describe(actual)}`)
      const wantKeys = want.v.map(([k]) => (k.t === 'str' ? k.v : k.t === 'int' ? k.v : JSON.stringify(k)))
      // an empty dict nested in a recursed dict has no key in torch >= 2.4, so it may be absent here
      const absentEmpty = want.v.filter(([, v], i) => v.t === 'dict' && v.v.length === 0 && !entries.some(([k]) => String(k) === wantKeys[i])).length
      if (entries.length !== want.v.length - absentEmpty) fail(`expected keys [${wantKeys}], got [${entries.map(([k]) => String(k))}]`)
      want.v.forEach(([k, v], i) => {
        const e = entries.find(([ak]) => (actual instanceof Map ? sameKey(ak, k) : ak === wantKeys[i]))
        diffTyped(e?.[1], v, tensors, `${at}.${wantKeys[i]}`, out)
      })
      return
    }
    case 'tensor': {
      if (!isTensor(actual)) return fail(`expected a tensor, got ${describe(actual)}`)
      if ('key' in want) {
        const b = tensors.get(want.key)
        if (!b) return fail(`no expected bytes for ${want.key}`)
        if (!sameBytes(actual.data, b)) fail(`tensor bytes differ from torch's (${want.key})`)
      } else {
        if (actual.dtype !== want.dtype || JSON.stringify(actual.shape) !== JSON.stringify(want.shape)) fail('tensor dtype/shape differ')
        if (!sameBytes(actual.data, Buffer.from(want.hex, 'hex'))) fail('tensor bytes differ')
      }
      return
    }
  }
}

function sameKey(a: unknown, k: Typed): boolean {
  const errs: string[] = []
  diffTyped(a, k, new Map(), 'key', errs)
  return errs.length === 0
}

function describe(v: unknown): string {
  if (v === null) return 'None'
  if (Array.isArray(v)) return 'a list'
  if (v instanceof Map) return 'a dict'
  if (isTensor(v)) return 'a tensor'
  return `${typeof v} ${String(v)}`
}

/** The bytes of box (offsets, sizes) of a row-major tensor. */
export function sliceBox(t: { dtype: DType; shape: number[] }, data: Uint8Array, offsets: number[], sizes: number[]): Uint8Array {
  const es = elementSize(t.dtype)
  const total = sizes.reduce((a, b) => a * b, 1)
  const out = new Uint8Array(total * es)
  const strides = t.shape.map((_, d) => t.shape.slice(d + 1).reduce((a, b) => a * b, 1))
  const idx = new Array(sizes.length).fill(0)
  for (let n = 0; n < total; n++) {
    let src = 0
    for (let d = 0; d < sizes.length; d++) src += (offsets[d] + idx[d]) * strides[d]
    out.set(data.subarray(src * es, src * es + es), n * es)
    for (let d = sizes.length - 1; d >= 0; d--) {
      if (++idx[d] < sizes[d]) break
      idx[d] = 0
    }
  }
  return out
}

/** Reads a fixture with distcp and compares everything with what torch exported. */
export async function checkFixture(t: ExecutionContext, dir: string): Promise<void> {
  const { expected, bytes } = loadExpected(dir)
  const ck = await openCheckpoint(join(dir, 'ckpt'))
  const keys = ck.keys()
  t.deepEqual([...keys].sort(), [...Object.keys(expected.tensors), ...Object.keys(expected.objects)].sort(), 'key set')
  const errors: string[] = []
  for (const [key, meta] of Object.entries(expected.tensors)) {
    const info = ck.info(key)
    if (info.kind !== 'tensor') {
      errors.push(`${key}: not a tensor`)
      continue
    }
    if (info.dtype !== meta.dtype || JSON.stringify(info.shape) !== JSON.stringify(meta.shape)) {
      errors.push(`${key}: ${info.dtype} [${info.shape}] vs torch ${meta.dtype} [${meta.shape}]`)
      continue
    }
    const want = bytes.get(key)
    if (!want) {
      errors.push(`${key}: missing from expected.safetensors`)
      continue
    }
    const got = await ck.read(key)
    if (!sameBytes(got.data, want)) errors.push(`${key}: bytes differ from torch's`)
    // into caller memory
    const into = new Uint8Array(want.byteLength)
    await ck.read(key, { into })
    if (!sameBytes(into, want)) errors.push(`${key}: read into caller memory differs`)
    // a box in the middle, crossing chunk boundaries where there are several
    if (meta.shape.length > 0 && meta.shape.every((n) => n > 1)) {
      const offsets = meta.shape.map((n) => Math.floor(n / 3))
      const sizes = meta.shape.map((n, d) => Math.max(1, n - offsets[d] - Math.floor(n / 4)))
      const box = await ck.read(key, { offsets, sizes })
      if (!sameBytes(box.data, sliceBox(meta, want, offsets, sizes))) errors.push(`${key}: box ${offsets}+${sizes} differs`)
    }
  }
  for (const [key, want] of Object.entries(expected.objects)) {
    diffTyped(await ck.readObject(key, { exact: true }), want, bytes, key, errors)
  }
  diffTyped(await ck.readAll({ exact: true }), expected.tree, bytes, 'readAll()', errors)
  ck.close()
  t.deepEqual(errors, [], `${dir} (torch ${expected.torch_version}, ${expected.world_size} ranks)`)
}

/**
 * The bad inputs of `interop/make_bad_inputs.py`: torch writes a good checkpoint into a fresh temp folder and the
 * script derives damaged variants from it. `copyOfBase(name)` is a fresh copy of torch's good one to damage.
 */
export function badInputs<V extends { ckpt: string }>(prefix: string): {
  out: string
  manifest: Record<string, V>
  copyOfBase: (name: string) => string
} {
  const out = mkdtempSync(join(tmpdir(), prefix))
  const manifest = JSON.parse(runPython(['interop/make_bad_inputs.py', out])) as Record<string, V>
  const copyOfBase = (name: string): string => {
    const dst = join(out, 'copies', name)
    mkdirSync(dst, { recursive: true })
    cpSync(manifest.base.ckpt, dst, { recursive: true })
    return dst
  }
  return { out, manifest, copyOfBase }
}

/** `p` rejects with a `DistcpError` of `code` whose message mentions every one of `mentions`. */
export async function rejectsWith(t: ExecutionContext, p: Promise<unknown>, code: string, ...mentions: string[]) {
  const e = await t.throwsAsync(p, { instanceOf: DistcpError })
  t.is(e?.code as string | undefined, code, e?.message)
  for (const m of mentions) t.true(e?.message.includes(m), `message should mention ${m}: ${e?.message}`)
  return e
}

/** A TCP port free on 127.0.0.1 right now (for a store or a rendezvous). */
export async function freePort(): Promise<number> {
  return new Promise((resolve) => {
    const s = createServer().listen(0, '127.0.0.1', () => {
      const port = (s.address() as { port: number }).port
      s.close(() => resolve(port))
    })
  })
}

/**
 * N Node ranks of the child `worker` (node arguments) started directly, as any launcher that sets the torchrun
 * variables would (torchrun itself tears the others down when one dies): rank 0 hosts the store, collectives time
 * out after 4 s. Resolves with every rank's exit code (null: killed by a signal).
 */
export async function startRanks(worker: string[], n: number, args: string[], env: Record<string, string> = {}): Promise<(number | null)[]> {
  const port = await freePort()
  const procs = Array.from({ length: n }, (_, r) =>
    spawn(process.execPath, [...worker, ...args], {
      cwd: root,
      stdio: 'ignore',
      env: { ...process.env, OMP_NUM_THREADS: '1', RANK: String(r), WORLD_SIZE: String(n), LOCAL_RANK: String(r), MASTER_ADDR: '127.0.0.1', MASTER_PORT: String(port), DISTCP_TEST_TIMEOUT_MS: '4000', ...env },
    }),
  )
  return Promise.all(procs.map((p) => new Promise<number | null>((res) => p.on('exit', (code) => res(code)))))
}
