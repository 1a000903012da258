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

/** Python's str() of each Python expression, from Python. */
function pythonStrOf(exprs: string[]): string[] {
  const code = `import json,sys; print(json.dumps([str(eval(e)) for e in json.loads(sys.argv[1])]))`
  return JSON.parse(runPython(['-c', code, JSON.stringify(exprs)]).trim()) as string[]
}

/** The first float32 of a tensor, whatever view holds its bytes. */
function first(v: unknown): number {
  const d = (v as { data: ArrayBufferView }).data
  return new DataView(d.buffer, d.byteOffset, 4).getFloat32(0, true)
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

test('readAll rebuilds the nesting from planner_data in the core: float, int, bool and None keys, keys that look like tuples or paths', async (t) => {
  const [f1, f2, i3, yes, none] = pythonStrOf(['1e-5', '1e16', '3', 'True', 'None'])
  const m = new Map<unknown, unknown>([
    [pyFloat(1e-5), f32(1)],
    [pyFloat(1e16), f32(2)],
    [3, f32(3)],
    [true, f32(4)],
    [null, f32(5)],
    ['(1, 2)', f32(6)],
  ])
  const dir = join(mkdtempSync(join(tmpdir(), 'distcp-keys-')), 'ck')
  await save({ m, 'a.b': { c: f32(7) } }, { checkpointId: dir })
  const ck = await openCheckpoint(dir)
  const all = (await ck.readAll()) as Record<string, Record<string, unknown>>
  ck.close()
  t.deepEqual(Object.keys(all.m).sort(), [f1, f2, i3, yes, none, '(1, 2)'].sort())
  t.deepEqual([f1, f2, i3, yes, none, '(1, 2)'].map((k) => first(all.m[k])), [1, 2, 3, 4, 5, 6])
  // a dotted top-level key is one step of its planner_data path, not two
  t.is(first(all['a.b'].c), 7)

  // load puts values back into the caller's Map under its own key objects
  const keys = [...m.keys()]
  const target = new Map<unknown, unknown>(keys.map((k) => [k, f32(-1)]))
  const report = await load({ m: target, 'a.b': { c: f32(-1) } } as unknown as LoadStateDict, { checkpointId: dir })
  t.deepEqual([report.missing, report.unexpected, report.mismatched], [[], [], []])
  t.deepEqual(keys.map((k) => first(target.get(k))), [1, 2, 3, 4, 5, 6])
})

test('nested lists: save → load fills tensors and replaces non-tensor leaves in place; readAll rebuilds the lists', async (t) => {
  const dir = join(mkdtempSync(join(tmpdir(), 'distcp-lists-')), 'ck')
  await save({ l: [[f32(1), f32(2)], [f32(3), { x: f32(4), n: 5 }], 'a', null, pyFloat(0.5)] }, { checkpointId: dir })

  const inner = [f32(0), f32(0)]
  const target = { l: [inner, [f32(0), { x: f32(0), n: 0 }], 'b', 1, 0] as unknown[] }
  const report = await load(target as unknown as LoadStateDict, { checkpointId: dir })
  t.deepEqual([report.missing, report.unexpected, report.mismatched], [[], [], []])
  t.is(target.l[0], inner, 'containers stay the caller\'s')
  t.deepEqual(inner.map(first), [1, 2])
  const second = target.l[1] as [unknown, { x: unknown; n: unknown }]
  t.is(first(second[0]), 3)
  t.is(first(second[1].x), 4)
  t.is(second[1].n, 5)
  t.deepEqual(target.l.slice(2, 4), ['a', null])
  t.is((target.l[4] as { value: number }).value, 0.5)

  const ck = await openCheckpoint(dir)
  const all = (await ck.readAll()) as { l: unknown[] }
  ck.close()
  t.is(all.l.length, 5)
  t.deepEqual((all.l[0] as unknown[]).map(first), [1, 2])
  const back = all.l[1] as [unknown, { x: unknown; n: unknown }]
  t.is(first(back[0]), 3)
  t.is(first(back[1].x), 4)
  t.is(back[1].n, 5)
  t.deepEqual(all.l.slice(2), ['a', null, 0.5])
})
