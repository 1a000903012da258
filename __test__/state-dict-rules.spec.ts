import test from 'ava'
import { mkdtempSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

import { save, load, openCheckpoint, flattenStateDict, pyFloat, type LoadStateDict } from '../src/index.js'
import { runPython } from './helpers.js'

// Python's str(key) has one owner (the Rust core). Float keys are where copies of that rule used to disagree: JS
// wrote 1e-5 as "0.00001" and 1e16 as "10000000000000000.0", so a state dict saved by distcp was "missing" on
// distcp's own load. The expected strings come from Python itself, not from this file.
const FLOATS = [1e-5, 1e16, 0.1, 2.5, 1, -0, 1e-300, 123456789012345680000, Number.NaN, Number.POSITIVE_INFINITY]

function pythonStr(xs: number[]): string[] {
  const arg = JSON.stringify(xs.map((x) => (Number.isNaN(x) ? 'nan' : x === Infinity ? 'inf' : Object.is(x, -0) ? '-0.0' : x)))
  const code = `import json,sys; print(json.dumps([str(float(x)) for x in json.loads(sys.argv[1])]))`
  return JSON.parse(runPython(['-c', code, arg]).trim()) as string[]
}

function f32(v: number): { dtype: 'float32'; shape: number[]; data: Float32Array } {
  return { dtype: 'float32', shape: [1], data: new Float32Array([v]) }
}

test('float dict keys: flat keys are Python str(); save → load and readAll round-trip', async (t) => {
  const want = pythonStr(FLOATS)
  const inner = new Map<unknown, unknown>(FLOATS.map((x, i) => [pyFloat(x), f32(i)]))
  const flat = flattenStateDict({ m: inner } as Record<string, unknown>, '2.4')
  t.deepEqual([...flat.keys()], want.map((s) => `m.${s}`))

  const dir = join(mkdtempSync(join(tmpdir(), 'distcp-keys-')), 'ck')
  await save({ m: inner }, { checkpointId: dir })
  const ck = await openCheckpoint(dir)
  t.deepEqual(ck.keys(), want.map((s) => `m.${s}`))
  ck.close()

  // distcp's own load finds every key (it used to report them missing) and fills the targets
  const target = new Map<unknown, unknown>(FLOATS.map((x) => [pyFloat(x), f32(-1)]))
  const report = await load({ m: target } as unknown as LoadStateDict, { checkpointId: dir })
  t.deepEqual(report.missing, [])
  t.deepEqual(report.unexpected, [])
  t.deepEqual([...target.values()].map((v) => (v as ReturnType<typeof f32>).data[0]), FLOATS.map((_, i) => i))
})

test('non-str keys of a value read in plain mode are Python str() of the key', async (t) => {
  const want = pythonStr([1e-5, 1e16])
  const dir = join(mkdtempSync(join(tmpdir(), 'distcp-keys-')), 'ck')
  // a dict without tensors inside a tuple is one item: its keys come back through readObject
  await save({ v: { $: 0 }, o: [new Map<unknown, unknown>([[pyFloat(1e-5), 1], [pyFloat(1e16), 2], [true, 3], [null, 4], [7, 5]])] }, { checkpointId: dir, layout: '2.3' })
  const ck = await openCheckpoint(dir)
  const v = (await ck.readObject('o')) as unknown as Record<string, number>[]
  t.deepEqual(Object.keys(v[0]).sort(), [...want, 'True', 'None', '7'].sort())
  t.is(v[0][want[0]], 1)
  t.is(v[0][want[1]], 2)
  ck.close()
})
