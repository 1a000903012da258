import test, { type ExecutionContext } from 'ava'
import { spawnSync } from 'node:child_process'
import { mkdtempSync, readdirSync, symlinkSync, writeFileSync, readFileSync, mkdirSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

import { save, pyFloat, pyTuple, openCheckpoint, DistcpError, PyFloat, PyTuple, type SaveStateDict } from '../src/index.js'
import { native, type TaggedValue } from '../src/native.js'
import { checkFixture, diffTyped, loadExpected, root, runPython } from './helpers.js'
import { fullState, smallState, tensor, toExact } from './save-child.js'

// Node saves, real torch (the pinned one, `DISTCP_PYTHON` or .venv) loads with torch.distributed.checkpoint — both
// dcp.load and format_utils.dcp_to_torch_save — and exports what it sees (interop/load_with_torch.py); everything
// must equal what Node saved, bit for bit, and distcp's own reader must read the same.

const out = mkdtempSync(join(tmpdir(), 'distcp-save-'))

function listing(dir: string): string[] {
  return readdirSync(dir).sort()
}

interface LoadSummary {
  torch_version: string
  methods: Record<string, string>
  resave?: { metadata_differences?: string[]; files?: Record<string, string>; error?: string }
}

function loadWithTorch(ckpt: string, name: string, resave = false): { summary: LoadSummary; dir: string } {
  const dir = join(out, `torch-${name}`)
  const stdout = runPython(['interop/load_with_torch.py', ckpt, dir, ...(resave ? ['--resave'] : [])])
  return { summary: JSON.parse(stdout.trim().split('\n').at(-1)!) as LoadSummary, dir }
}

/** torch's view (one load method) against the state dict Node saved, then distcp's reader against torch's view. */
async function compareWithTorch(
  t: ExecutionContext,
  ckpt: string,
  methodDir: string,
  sd: SaveStateDict,
  keys: string[],
  layout: '2.4' | '2.3' = '2.4',
) {
  const { expected, bytes } = loadExpected(methodDir)
  t.deepEqual([...Object.keys(expected.tensors), ...Object.keys(expected.objects)].sort(), [...keys].sort())
  const errors: string[] = []
  diffTyped(toExact(sd, layout), expected.tree, bytes, 'saved', errors)
  t.deepEqual(errors, [], `torch ${expected.torch_version} (${methodDir}) sees something else than what Node saved`)
  symlinkSync(ckpt, join(methodDir, 'ckpt'))
  await checkFixture(t, methodDir)
}

test('every dtype, scalars, empties, nested containers and Python values load in torch bit for bit', async (t) => {
  const ckpt = join(out, 'full')
  const sd = fullState()
  const r = await save(sd, { checkpointId: ckpt })
  t.deepEqual(listing(ckpt), ['.metadata', '__0_0.distcp'])
  t.false(r.replaced)
  t.is(r.dataFile, '__0_0.distcp')
  // torch ≥ 2.4's flat keys: dicts always recursed, lists only when they hold tensors or dicts, tuples whole
  for (const k of [
    'dtypes.complex32',
    'nested.list.2.x',
    'nested.list.3',
    'nested.a.b',
    'nested.list_of_dicts.1.b',
    'objects.empty_list',
    'tuple_with_tensors',
    'optim.param_groups.0.betas',
    'optim.param_groups.0.params',
  ]) {
    t.true(r.keys.includes(k), k)
  }
  t.false(r.keys.some((k) => k.startsWith('objects.empty_dict')), 'an empty dict has no key (torch ≥ 2.4)')

  const { summary, dir } = loadWithTorch(ckpt, 'full', true)
  t.deepEqual(summary.methods, { dcp_load: 'ok', dcp_to_torch_save: 'ok' }, JSON.stringify(summary))
  // torch saving what it loaded writes the very same data file, and equivalent metadata
  t.deepEqual(summary.resave, { metadata_differences: [], files: { '__0_0.distcp': 'identical' } })
  await compareWithTorch(t, ckpt, join(dir, 'dcp_load'), sd, r.keys)
  await compareWithTorch(t, ckpt, join(dir, 'dcp_to_torch_save'), sd, r.keys)
})

test("layout '2.3' stores tensor-free containers whole, and current torch still loads it", async (t) => {
  const ckpt = join(out, 'layout23')
  const sd = fullState()
  const r = await save(sd, { checkpointId: ckpt, layout: '2.3' })
  t.true(r.keys.includes('optim.param_groups'))
  t.true(r.keys.includes('objects'))
  t.true(r.keys.includes('nested.list_of_dicts'))
  t.true(r.keys.includes('optim.state.layer.weight.exp_avg'))
  const { summary, dir } = loadWithTorch(ckpt, 'layout23')
  t.deepEqual(summary.methods, { dcp_load: 'ok', dcp_to_torch_save: 'ok' }, JSON.stringify(summary))
  await compareWithTorch(t, ckpt, join(dir, 'dcp_load'), sd, r.keys, '2.3')
})

test('top-level Stateful values are replaced by their stateDict()', async (t) => {
  const ckpt = join(out, 'stateful')
  const model = { stateDict: () => ({ w: tensor('float32', [2]) }), loadStateDict: () => undefined }
  const sched = { stateDict: async () => ({ last_epoch: 3, base_lrs: [0.1] }) }
  const r = await save({ model, sched, step: 1 }, { checkpointId: ckpt })
  t.deepEqual(r.keys, ['model.w', 'sched.last_epoch', 'sched.base_lrs', 'step'])
  const ck = await openCheckpoint(ckpt)
  t.deepEqual(await ck.readObject('sched.base_lrs'), [0.1])
})

test('saving over a checkpoint replaces it and leaves exactly .metadata and __0_0.distcp', async (t) => {
  const ckpt = join(out, 'replace')
  const a = await save(smallState(1), { checkpointId: ckpt })
  t.false(a.replaced)
  const b = await save(smallState(2), { checkpointId: ckpt })
  t.true(b.replaced)
  t.is(b.dataFile, '__0_0.distcp')
  t.deepEqual(listing(ckpt), ['.metadata', '__0_0.distcp'])
  const ck = await openCheckpoint(ckpt)
  t.is(await ck.readObject('step'), 2)
  const { summary } = loadWithTorch(ckpt, 'replace')
  t.deepEqual(summary.methods, { dcp_load: 'ok', dcp_to_torch_save: 'ok' })
})

async function stepOf(ckpt: string): Promise<unknown> {
  const ck = await openCheckpoint(ckpt)
  const step = await ck.readObject('step')
  // every tensor must read too
  for (const k of ck.keys()) if (ck.info(k).kind === 'tensor') await ck.read(k)
  ck.close()
  return step
}

test('a save that fails midway leaves the old checkpoint loadable and nothing else behind', async (t) => {
  const ckpt = join(out, 'fail')
  await save(smallState(1), { checkpointId: ckpt })
  for (const point of ['afterFirstItem', 'beforeCommit']) {
    const e = await t.throwsAsync(save(smallState(2), { checkpointId: ckpt, _testFailAt: { point } }), {
      instanceOf: DistcpError,
    })
    t.is(e?.code, 'ERR_DISTCP_IO')
    t.regex(e?.message ?? '', /injected failure/)
    t.deepEqual(listing(ckpt), ['.metadata', '__0_0.distcp'], point)
    t.is(await stepOf(ckpt), 1, point)
  }
  // tensor data found too short by the native layer (bypassing the TypeScript checks): nothing is touched
  const tree: TaggedValue = { $d: [['w', { $tensor: 0, dtype: 'float32', shape: [3] }]] }
  const e = await t.throwsAsync(native.writeStateDict(ckpt, tree, [new Uint8Array(11)]))
  t.is((e as { code?: unknown } | undefined)?.code, 'ERR_DISTCP_INVALID_INPUT')
  t.regex(e?.message ?? '', /needs 12 bytes, its data has 11/)
  t.deepEqual(listing(ckpt), ['.metadata', '__0_0.distcp'])
  t.is(await stepOf(ckpt), 1)
  const { summary } = loadWithTorch(ckpt, 'fail')
  t.deepEqual(summary.methods, { dcp_load: 'ok', dcp_to_torch_save: 'ok' })
})

function crashingSave(ckpt: string, variant: number, point: string): void {
  const r = spawnSync(
    process.execPath,
    ['--import', '@oxc-node/core/register', join(root, '__test__', 'save-child.ts'), ckpt, String(variant), point, 'abort'],
    { cwd: root, encoding: 'utf8', env: process.env, timeout: 60_000 },
  )
  if (r.signal !== 'SIGABRT') throw new Error(`the child should have aborted at ${point}: ${r.status} ${r.stderr}`)
}

test('a save killed at any point leaves a loadable checkpoint: the old one before the commit, the new one after', async (t) => {
  const cases: [string, number][] = [
    ['afterFirstItem', 1],
    ['beforeCommit', 1],
    ['afterCommit', 2],
    ['afterLink', 2],
    ['afterFinalCommit', 2],
  ]
  for (const [point, want] of cases) {
    const ckpt = join(out, `crash-${point}`)
    await save(smallState(1), { checkpointId: ckpt })
    crashingSave(ckpt, 2, point)
    t.true(listing(ckpt).includes('.metadata'), point)
    t.is(await stepOf(ckpt), want, `after a crash at ${point}`)
    if (point === 'afterFirstItem' || point === 'afterCommit') {
      // torch loads it too (after afterCommit, .metadata names the temporary data file)
      const { summary, dir } = loadWithTorch(ckpt, `crash-${point}`)
      t.deepEqual(summary.methods, { dcp_load: 'ok', dcp_to_torch_save: 'ok' }, point)
      const { expected } = loadExpected(join(dir, 'dcp_load'))
      t.deepEqual(expected.objects.step, { t: 'int', v: String(want) })
    }
    // the next save cleans up what the crash left
    await save(smallState(3), { checkpointId: ckpt })
    t.deepEqual(listing(ckpt), ['.metadata', '__0_0.distcp'], point)
    t.is(await stepOf(ckpt), 3)
  }
})

test('a new folder is created; a failed first save leaves it empty', async (t) => {
  const ckpt = join(out, 'deep', 'er', 'ckpt')
  await t.throwsAsync(save(smallState(1), { checkpointId: ckpt, _testFailAt: { point: 'afterFirstItem' } }))
  t.deepEqual(listing(ckpt), [])
  await save(smallState(1), { checkpointId: ckpt })
  t.deepEqual(listing(ckpt), ['.metadata', '__0_0.distcp'])
})

async function rejects(t: ExecutionContext, p: Promise<unknown>, code: string, ...mentions: (string | RegExp)[]) {
  const e = await t.throwsAsync(p, { instanceOf: DistcpError })
  t.is(e?.code as string | undefined, code, e?.message)
  for (const m of mentions) {
    if (typeof m === 'string') t.true(e?.message.includes(m), `message should mention ${m}: ${e?.message}`)
    else t.regex(e?.message ?? '', m)
  }
}

test('bad input is refused with a clear error before anything is written', async (t) => {
  const ckpt = join(out, 'bad')
  const bad = (sd: unknown, ...rest: (string | RegExp)[]) =>
    rejects(t, save(sd as SaveStateDict, { checkpointId: ckpt }), 'ERR_DISTCP_INVALID_INPUT', ...rest)
  await bad({ a: { f: () => 1 } }, 'key `a.f`', 'a function')
  await bad({ a: [1, Symbol('s')] }, 'key `a.1`', 'a symbol')
  const cyc: Record<string, unknown> = { x: 1 }
  cyc.self = cyc
  await bad({ c: cyc }, 'key `c.self`', 'a cycle')
  await bad({ w: { dtype: 'float32', shape: [3], data: new Uint8Array(11) } }, 'key `w`', 'needs 12 bytes', 'has 11')
  await bad({ w: { dtype: 'float128', shape: [1], data: new Uint8Array(16) } }, 'key `w`', 'unknown dtype `float128`')
  await bad({ w: { dtype: 'float32', shape: [-1], data: new Uint8Array(0) } }, 'non-negative integers')
  await bad({ u: undefined }, 'key `u`', 'undefined')
  await bad({ d: new Date(0) }, 'key `d`', 'Date')
  await bad({ f: new Float32Array(2) }, 'key `f`', 'Float32Array')
  await bad({ a: { m: { stateDict: () => ({}) } } }, 'key `a.m`', 'Stateful')
  await bad({ 'a.b': 1, a: { b: 2 } }, 'key `a.b`', 'duplicated')
  await bad([1, 2], 'must be a plain object or a Map')
  await rejects(
    t,
    save({ a: 1 }, { checkpointId: ckpt, layout: '2.2' as '2.3' }),
    'ERR_DISTCP_INVALID_INPUT',
    "layout must be '2.4' or '2.3'",
  )
  t.throws(() => readdirSync(ckpt), { code: 'ENOENT' }, 'no folder was created')

  const file = join(out, 'a-file')
  writeFileSync(file, 'not a folder')
  await rejects(t, save({ a: 1 }, { checkpointId: file }), 'ERR_DISTCP_NOT_A_DIRECTORY', file)
  t.is(readFileSync(file, 'utf8'), 'not a folder')
})

test('Python values round-trip through distcp exactly (ints stay ints, floats stay floats)', async (t) => {
  const ckpt = join(out, 'values')
  mkdirSync(ckpt)
  await save(
    { i: 1, f: pyFloat(1), g: 1.5, b: 2n ** 64n, s: 'x', n: null, t: pyTuple(1, pyFloat(2)), l: [true, 'y'] },
    { checkpointId: ckpt },
  )
  const ck = await openCheckpoint(ckpt)
  const exact = await ck.readAll({ exact: true })
  t.is(exact.i, 1)
  t.true(exact.f instanceof PyFloat && exact.f.value === 1)
  t.true(exact.g instanceof PyFloat && exact.g.value === 1.5)
  t.is(exact.b, 2n ** 64n)
  t.true(exact.t instanceof PyTuple)
  t.deepEqual(exact.l, [true, 'y'])
})

// The copy into staging memory and the write overlap (the writer starts first and waits for each item's bytes);
// the copy still completes before `save` returns its promise.
test('buffers changed right after save returns do not change the checkpoint, though the write overlaps the copy', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'distcp-save-overlap-'))
  const model: Record<string, unknown> = {}
  const want = new Map<string, Buffer>()
  for (let i = 0; i < 48; i++) {
    const data = new Uint8Array((1 << 20) + i * 4)
    for (let j = 0; j < data.length; j += 4093) data[j] = (i * 31 + j) & 0xff
    model[`layer${i}.weight`] = { dtype: 'float32', shape: [data.length / 4], data }
    want.set(`model.layer${i}.weight`, Buffer.from(data))
  }
  const extra = new Uint8Array([1, 2, 3, 4, 5])
  model.blob = extra // a bytes value inside an object item: written first, gated too
  const done = save({ model }, { checkpointId: dir })
  for (const v of Object.values(model)) {
    if (v instanceof Uint8Array) v.fill(0xee)
    else (v as { data: Uint8Array }).data.fill(0xee)
  }
  await done
  const ck = await openCheckpoint(dir)
  for (const [k, bytes] of want) {
    const got = await ck.read(k)
    t.true(Buffer.from(got.data).equals(bytes), k)
  }
  t.deepEqual([...((await ck.readObject('model.blob')) as Uint8Array)], [1, 2, 3, 4, 5])
  ck.close()
})

test('the native writer waits for the staging gate, and an aborted gate fails the save and leaves nothing', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'distcp-save-gate-'))
  const tree: TaggedValue = { $d: [['w', { $tensor: 0, dtype: 'float32', shape: [4] }]] }
  const buf = new Uint8Array(16)
  const gate = new native.StagingGate()
  let settled = false
  const p = native.writeStateDict(join(dir, 'a'), tree, [buf], {}, gate).finally(() => (settled = true))
  await new Promise((r) => setTimeout(r, 300))
  t.false(settled, 'the writer finished before the gate let it read the buffer')
  buf.set(new Uint8Array(new Float32Array([1, 2, 3, 4]).buffer))
  gate.advance(1)
  await p
  const ck = await openCheckpoint(join(dir, 'a'))
  t.deepEqual([...new Float32Array((await ck.read('w')).data.slice().buffer)], [1, 2, 3, 4])
  ck.close()

  const gate2 = new native.StagingGate()
  const p2 = native.writeStateDict(join(dir, 'b'), tree, [buf], {}, gate2)
  gate2.abort()
  await t.throwsAsync(p2, { message: /staging/ })
  t.deepEqual(readdirSync(join(dir, 'b')).filter((f) => f !== '.distcp.lock'), [])
})

test('the tagged tree crosses napi as JS values: ints past 2^32, deep dicts and bad leaves', async (t) => {
  const dir = join(out, 'tagged-values')
  // ints beyond 2^32 (napi-rs's own serde conversion made them floats) and a dict 60 levels deep (180 JSON
  // levels: beyond the 128 that serde_json's parser allowed the old JSON text)
  let deep: Record<string, unknown> = { leaf: 7 }
  for (let i = 0; i < 59; i++) deep = { d: deep }
  const big = [2 ** 40 + 1, -(2 ** 40), Number.MAX_SAFE_INTEGER, 2 ** 31, -(2 ** 31) - 1]
  // strings around the binding's 64-byte first read, a multi-byte character at its edge (one that does not fit
  // whole must not end the string early)
  const texts: string[] = []
  for (let n = 56; n <= 66; n++) for (const c of ['é', '€', '𝄞']) texts.push('a'.repeat(n) + c + 'z')
  await save({ big, deep, texts }, { checkpointId: dir })
  const ck = await openCheckpoint(dir)
  t.deepEqual(await ck.readObject('big'), big)
  t.deepEqual(await ck.readObject('texts'), texts)
  t.is(await ck.readObject(`deep${'.d'.repeat(59)}.leaf`), 7)
  ck.close()
  // what the encoder never makes is refused at the boundary with the binding's code, the checkpoint untouched
  for (const [leaf, what] of [
    [undefined, /undefined cannot be part of a tagged value/],
    [() => 1, /function cannot be part of a tagged value/],
    [1.5, /untagged non-integer number/],
    [Infinity, /inf is not a finite number/],
    ['a\ud800b', /lone surrogate/],
  ] as [unknown, RegExp][]) {
    const e = await t.throwsAsync(async () => native.writeStateDict(dir, { $d: [['x', leaf]] } as unknown as TaggedValue, []))
    t.is((e as { code?: unknown } | undefined)?.code, 'ERR_DISTCP_INVALID_INPUT')
    t.regex(e?.message ?? '', what)
  }
  const cyclic: unknown[] = []
  cyclic.push(cyclic)
  const e = await t.throwsAsync(async () => native.writeStateDict(dir, { $d: [['x', cyclic]] } as unknown as TaggedValue, []))
  t.is((e as { code?: unknown } | undefined)?.code, 'ERR_DISTCP_INVALID_INPUT')
  t.regex(e?.message ?? '', /nested more than 100 levels deep/)
  t.deepEqual(await (await openCheckpoint(dir)).readObject('big'), big)
})
