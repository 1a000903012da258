import test from 'ava'
import { spawnSync } from 'node:child_process'
import { mkdtempSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

import { save, openCheckpoint, DistcpError } from '../src/index.js'
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
