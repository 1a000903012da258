import test from 'ava'
import { spawnSync } from 'node:child_process'
import { mkdtempSync, readdirSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

import { save, saveAsync, load, openCheckpoint, DistcpError, CheckpointManager, OptimizerState, PyTuple } from '../src/index.js'
import { Adam, TinyMLP } from '../examples/tiny-trainer/index.js'
import { root } from './helpers.js'
import { callNative } from '../src/errors.js'
import { native } from '../src/native.js'

const out = mkdtempSync(join(tmpdir(), 'distcp-save-input-'))

// Objects that look like tensors but are malformed used to be saved silently as dicts (`w.dtype`, `w.shape`, `w.data`).
test('a malformed tensor-like object is a coded error naming the key and what is wrong', async (t) => {
  const data = new Float32Array(3)
  const cases: [unknown, RegExp][] = [
    [{ dtype: 'float32', shape: 3, data }, /shape must be an array/],
    [{ dtype: 'float32', shape: [3], data: [1, 2, 3] }, /data must be an ArrayBufferView .*plain array/],
    [{ dtype: 7, shape: [3], data }, /dtype must be a dtype name/],
    [{ shape: [3], data }, /dtype must be a dtype name/],
  ]
  for (const [i, [w, why]] of cases.entries()) {
    const e = await t.throwsAsync(save({ layer: { w } }, { checkpointId: join(out, `bad-${i}`) }), { instanceOf: DistcpError })
    t.is(e?.code, 'ERR_DISTCP_INVALID_INPUT')
    t.regex(e?.message ?? '', /key `layer\.w`/)
    t.regex(e?.message ?? '', why)
  }
  // a real dict with such keys is still savable as a Map
  await save({ cfg: new Map<string, unknown>([['dtype', 'x'], ['shape', [1]], ['data', 'y']]) }, { checkpointId: join(out, 'map') })
  const ck = await openCheckpoint(join(out, 'map'))
  t.deepEqual(ck.keys().sort(), ['cfg.data', 'cfg.dtype', 'cfg.shape'])
  ck.close()
})

// A buffer transferred away (and collected) while a save runs used to crash Node with SIGSEGV in 8 of 11 runs: the
// save now owns a copy from the moment it is called. Each run is a child process, so a crash fails the test.
test('transferring a tensor buffer away during a save neither crashes nor changes what is saved', (t) => {
  const script = `
    const { save, openCheckpoint } = require(${JSON.stringify(join(root, 'dist', 'index.js'))})
    const dir = process.argv[1]
    const n = 8 << 20
    const data = new Float32Array(n)
    for (let i = 0; i < n; i++) data[i] = i
    const p = save({ w: { dtype: 'float32', shape: [n], data } }, { checkpointId: dir })
    structuredClone(data.buffer, { transfer: [data.buffer] })
    for (let i = 0; i < 5; i++) { new ArrayBuffer(64 << 20); globalThis.gc() }
    p.then(async () => {
      const ck = await openCheckpoint(dir)
      const w = await ck.read('w')
      const f = new Float32Array(w.data.buffer, w.data.byteOffset, n)
      let bad = 0
      for (let i = 0; i < n; i++) if (f[i] !== i) bad++
      console.log(data.byteLength === 0 ? 'detached' : 'attached', bad)
    })`
  for (let run = 0; run < 6; run++) {
    const r = spawnSync('node', ['--expose-gc', '-e', script, join(out, `detach-${run}`)], { encoding: 'utf8', timeout: 60_000 })
    t.is(r.signal, null, `run ${run} died with ${r.signal}`)
    t.is(r.status, 0, r.stderr)
    t.is(r.stdout.trim(), 'detached 0')
  }
})

// napi's own type checks used to surface as `StringExpected` / `NumberExpected` with no ERR_DISTCP_* code.
test('a wrong JS type that reaches the binding is ERR_DISTCP_INVALID_ARGUMENT', (t) => {
  const e = t.throws(() => callNative(() => native.parseSize(5 as unknown as string)), { instanceOf: DistcpError })
  t.is(e?.code, 'ERR_DISTCP_INVALID_ARGUMENT')
  t.regex(e?.message ?? '', /String/)
})

test('a sparse array (length 2**32 - 1, one item) is refused at its first hole by save, saveAsync, load, a scheduler state and training info, never walked to its length', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'distcp-sparse-'))
  const ok = join(dir, 'ok')
  await save({ x: [1, 2] }, { checkpointId: ok })
  // before: `load` aborted V8 ("invalid size error") filling a list to that length, `save` walked it for a minute
  const sparse = (first = 7): number[] => {
    const a: number[] = [first]
    a.length = 2 ** 32 - 1
    return a
  }
  const at = /sparse array \(index 1 of its 4294967295 was never set\)/
  const started = Date.now()
  const cases: [string, () => Promise<unknown>, string][] = [
    ['save', () => save({ x: sparse() }, { checkpointId: join(dir, 'a') }), 'key `x.1`'],
    ['save of a tuple', () => save({ x: new PyTuple(sparse() as never) }, { checkpointId: join(dir, 'b') }), 'key `x.1`'],
    ['saveAsync', () => saveAsync({ x: sparse() }, { checkpointId: join(dir, 'c') }).committed, 'key `x.1`'],
    ['load', () => load({ x: sparse() }, { checkpointId: ok }), 'key `x.1`'],
    [
      'a scheduler whose state holds one',
      async () => {
        const model = new TinyMLP({ inFeatures: 2, hidden: 2, outFeatures: 1, seed: 0 })
        const optimizer = new Adam(model.namedParameters().map(([, p]) => p), { lr: 0.001 })
        const scheduler = { stateDict: () => ({ base_lrs: sparse() }), loadStateDict: () => undefined }
        return new OptimizerState(model, optimizer, scheduler as never).stateDict()
      },
      'optimizer state',
    ],
    [
      "an optimizer's param_groups params",
      async () => {
        const model = new TinyMLP({ inFeatures: 2, hidden: 2, outFeatures: 1, seed: 0 })
        const optimizer = new Adam(model.namedParameters().map(([, p]) => p), { lr: 0.001 })
        const real = optimizer.stateDict.bind(optimizer)
        optimizer.stateDict = () => {
          const r = real()
          return { ...r, param_groups: [{ ...r.param_groups[0], params: sparse(0) }] }
        }
        return new OptimizerState(model, optimizer).stateDict()
      },
      'param_groups[0].params',
    ],
    ['training info', async () => new CheckpointManager({ dir: join(dir, 'runs') }).begin(1, { losses: sparse() }), 'training info'],
    ['a tensor shape', () => save({ w: { dtype: 'uint8', shape: sparse(), data: new Uint8Array(7) } }, { checkpointId: join(dir, 'd') }), 'its shape'],
    ['a load target’s shape', () => load({ x: { dtype: 'uint8', shape: sparse(), data: new Uint8Array(7) } }, { checkpointId: ok }), 'its shape'],
  ]
  for (const [what, run, where] of cases) {
    const e = await t.throwsAsync(Promise.resolve().then(run), { code: 'ERR_DISTCP_INVALID_INPUT' }, what)
    t.regex(e?.message ?? '', at, what)
    t.true(e?.message.includes(where), `${what}: ${e?.message}`)
  }
  // a read's box: a bad-request error, not a walk
  const ck = await openCheckpoint(ok)
  await t.throwsAsync(ck.read('x', { offsets: sparse() }), { code: 'ERR_DISTCP_BAD_REQUEST', message: /offsets/ })
  // every case together: a walk to 2**32 - 1 alone takes about a minute on this machine
  t.true(Date.now() - started < 20_000, `${Date.now() - started} ms`)
  // a cycle in training info is refused as json.dump refuses it, not a stack overflow
  const cyc: Record<string, unknown> = { a: 1 }
  cyc.self = cyc
  await t.throwsAsync(new CheckpointManager({ dir: join(dir, 'runs2') }).begin(1, { cyc }), { code: 'ERR_DISTCP_INVALID_INPUT', message: /training info: a cycle/ })
  // nothing was written for any of them
  t.deepEqual(readdirSync(dir).sort(), ['ok', ...readdirSync(dir).filter((n) => n.startsWith('runs'))].sort())
  for (const r of readdirSync(dir).filter((n) => n.startsWith('runs'))) t.deepEqual(readdirSync(join(dir, r)).filter((n) => !n.startsWith('.')), [], r)
})
