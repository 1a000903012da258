// Hostile and careless input at the JavaScript API: each case once crashed the process, hung it, grew its memory
// without bound, wrote what distcp cannot read back, silently used another folder or key, or threw an uncoded
// error. Each must now give a coded DistcpError naming what is wrong, or the correct result.
import test from 'ava'
import { spawnSync } from 'node:child_process'
import { existsSync, mkdtempSync, readdirSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

import {
  convertDcpToHf,
  load,
  openCheckpoint,
  PyTuple,
  resolveModel,
  retarget,
  save,
  saveAsync,
  StagingPool,
  typedArray,
  type Tensor,
  type TensorInfo,
} from '../src/index.js'
import { root, runPython } from './helpers.js'

const tmp = (): string => mkdtempSync(join(tmpdir(), 'distcp-hostile-'))

/** A view whose buffer has been transferred away (detached): its byteLength reads 0. */
function detached(n: number): Uint8Array {
  const u = new Uint8Array(n)
  structuredClone(u.buffer, { transfer: [u.buffer] })
  return u
}

const f32 = (n: number, fill = 0): Tensor => ({ dtype: 'float32', shape: [n], data: new Uint8Array(new Float32Array(n).fill(fill).buffer) })

test('lists and Maps that grow while they are walked: each walk takes the items there when it starts, no V8 abort or endless walk', (t) => {
  // in a child: before, the Proxy case aborted V8 ("invalid size error") and the getter / Map cases ran out of heap
  const dir = tmp()
  const script = `
    const d = await import(${JSON.stringify(new URL('../src/index.js', import.meta.url).href)})
    const dir = ${JSON.stringify(dir)}
    const out = {}
    // a Proxy that appends an item whenever an index is read
    const target = [5]
    const proxy = new Proxy(target, { get(tg, k) { if (typeof k === 'string' && /^\\d+$/.test(k)) tg.push(0); return Reflect.get(tg, k) } })
    await d.save({ p: proxy }, { checkpointId: dir + '/proxy' })
    out.proxy = await (await d.openCheckpoint(dir + '/proxy')).readObject('p')
    // getters that define the next index each time one is read
    const a = []
    const add = () => { const i = a.length; Object.defineProperty(a, i, { enumerable: true, configurable: true, get() { add(); return 7 } }) }
    add()
    await d.save({ a }, { checkpointId: dir + '/getter' })
    out.getter = await (await d.openCheckpoint(dir + '/getter')).readObject('a')
    // a Map that a getter below it fills as it is read
    const m = new Map([[0, 1]])
    let k = 1
    const o = {}
    Object.defineProperty(o, 'x', { enumerable: true, get() { m.set(k++, 2); return 3 } })
    m.set('o', o)
    await d.save({ m }, { checkpointId: dir + '/map' })
    out.map = (await d.openCheckpoint(dir + '/map')).keys()
    console.log(JSON.stringify(out))
  `
  const r = spawnSync(process.execPath, ['--import', '@oxc-node/core/register', '--input-type=module', '-e', script], {
    cwd: root,
    encoding: 'utf8',
    timeout: 60_000,
    env: { ...process.env, NODE_OPTIONS: '--max-old-space-size=512' },
  })
  t.is(r.status, 0, `status ${r.status} signal ${r.signal}\n${r.stderr.slice(-2000)}`)
  const out = JSON.parse(r.stdout.trim().split('\n').pop() ?? '{}') as Record<string, unknown>
  // save walks the tree twice (device leaves first, then the encoder), each over the items there when it starts:
  // the first walk's reads add one item, which the second walk (the one saved) takes, and nothing more
  t.deepEqual(out, { proxy: [5, 0], getter: [7, 7], map: ['m.0', 'm.o.x', 'm.1'] })
})

test('a tensor with more dimensions than distcp reads is refused by save, not written unreadable', async (t) => {
  const dir = tmp()
  const shape = Array<number>(65).fill(1)
  const e = await t.throwsAsync(save({ t: { dtype: 'float32', shape, data: new Uint8Array(4) } }, { checkpointId: join(dir, 'a') }), {
    code: 'ERR_DISTCP_INVALID_INPUT',
  })
  t.regex(e?.message ?? '', /key `t`: a tensor with 65 dimensions \(distcp reads up to 64\)/)
  // inside a non-tensor value too (a tuple is pickled whole)
  await t.throwsAsync(save({ u: new PyTuple([{ dtype: 'float32', shape, data: new Uint8Array(4) }]) }, { checkpointId: join(dir, 'b') }), {
    code: 'ERR_DISTCP_INVALID_INPUT',
    message: /key `u`: a tensor with 65 dimensions/,
  })
  t.false(existsSync(join(dir, 'a', '.metadata')))
  t.false(existsSync(join(dir, 'b', '.metadata')))
  // 64 is the limit, and reads back
  const ok = join(dir, 'ok')
  await save({ t: { dtype: 'float32', shape: Array<number>(64).fill(1), data: new Uint8Array(new Float32Array([1.5]).buffer) } }, { checkpointId: ok })
  const r = await (await openCheckpoint(ok)).read('t')
  t.is(r.shape.length, 64)
  t.deepEqual([...new Float32Array(r.data.buffer, r.data.byteOffset, 1)], [1.5])
})

test('detached buffers: an empty tensor saves and loads, a read into one is a coded error naming `into`', async (t) => {
  const dir = tmp()
  const id = join(dir, 'ck')
  // before: V8's TypeError "Cannot perform Construct on a detached ArrayBuffer" from save, saveAsync, load and read
  await save({ w: f32(4, 2), e: { dtype: 'float32', shape: [0, 3], data: detached(8) } }, { checkpointId: id })
  const ck = await openCheckpoint(id)
  t.deepEqual((ck.info('e') as TensorInfo).shape, [0, 3])
  t.is((await ck.read('e')).data.byteLength, 0)
  await saveAsync({ e: { dtype: 'int64', shape: [0], data: detached(16) } }, { checkpointId: join(dir, 'async') }).committed
  t.deepEqual((await openCheckpoint(join(dir, 'async'))).keys(), ['e'])

  const sd = { w: f32(4), e: { dtype: 'float32', shape: [0, 3], data: detached(4) } as Tensor }
  t.deepEqual(await load(sd, { checkpointId: id }), { missing: [], unexpected: [], mismatched: [], layout: '2.4' })
  t.deepEqual([...new Float32Array(sd.w.data.buffer)], [2, 2, 2, 2])

  await t.throwsAsync(ck.read('w', { into: detached(16) }), { code: 'ERR_DISTCP_BAD_REQUEST', message: /key `w`: `into` holds 0 bytes, the float32 box \[4\] needs 16/ })
  await t.throwsAsync(load({ w: { dtype: 'float32', shape: [4], data: detached(16) }, e: null }, { checkpointId: id }), {
    code: 'ERR_DISTCP_INVALID_INPUT',
    message: /key `w`: the state dict's float32 \[4\] tensor holds 0 bytes, not 16/,
  })
  t.is((await ck.read('e', { into: detached(4) })).data.byteLength, 0)
})

test('a read into a resizable ArrayBuffer is refused: shrunk while the read runs, it was a segfault', async (t) => {
  const dir = tmp()
  await save({ w: f32(4, 3) }, { checkpointId: join(dir, 'ck') })
  const ck = await openCheckpoint(join(dir, 'ck'))
  // before: accepted, and `buffer.resize(0)` during the read (a box: copied in user space) killed the process
  // (ES2024's constructor: the test tsconfig's lib predates it)
  const Resizable = ArrayBuffer as unknown as new (n: number, o: { maxByteLength: number }) => ArrayBuffer
  const rab = new Resizable(16, { maxByteLength: 1 << 20 })
  for (const into of [new Uint8Array(rab), new Float32Array(rab, 0, 4), new DataView(rab)]) {
    await t.throwsAsync(ck.read('w', { into }), { code: 'ERR_DISTCP_BAD_REQUEST', message: /`into` must be a view of a fixed-length buffer/ })
  }
  await t.throwsAsync(load({ w: { dtype: 'float32', shape: [4], data: new Uint8Array(rab) } }, { checkpointId: join(dir, 'ck') }), {
    code: 'ERR_DISTCP_BAD_REQUEST',
    message: /`into` must be a view of a fixed-length buffer/,
  })
  t.deepEqual([...new Uint8Array(rab)], Array<number>(16).fill(0))
  // a fixed-length buffer (and a SharedArrayBuffer) still reads
  const fixed = new Float32Array(4)
  await ck.read('w', { into: fixed })
  t.deepEqual([...fixed], [3, 3, 3, 3])
  const shared = new Float32Array(new SharedArrayBuffer(16))
  await ck.read('w', { into: shared })
  t.deepEqual([...shared], [3, 3, 3, 3])
})

test('a lone surrogate in a path or key is refused, not turned into U+FFFD (another folder, another key)', async (t) => {
  const dir = tmp()
  const id = join(dir, 'a\uD800b')
  // before: saved into `a\uFFFDb`
  await t.throwsAsync(save({ x: 1 }, { checkpointId: id }), { code: 'ERR_DISTCP_INVALID_INPUT', message: /save: options\.checkpointId holds a lone surrogate/ })
  await t.throwsAsync(saveAsync({ x: 1 }, { checkpointId: id }).committed, { code: 'ERR_DISTCP_INVALID_INPUT', message: /options\.checkpointId holds a lone surrogate/ })
  t.deepEqual(readdirSync(dir), [])

  const ok = join(dir, 'ok')
  await save({ '\uFFFD': 1, x: 2 }, { checkpointId: ok })
  await t.throwsAsync(load({ x: null }, { checkpointId: ok + '\uDC00' }), { code: 'ERR_DISTCP_INVALID_INPUT', message: /load: options\.checkpointId holds a lone surrogate/ })
  await t.throwsAsync(openCheckpoint(ok + '\uDC00'), { code: 'ERR_DISTCP_BAD_REQUEST', message: /`path` holds a lone surrogate/ })
  const ck = await openCheckpoint(ok)
  // before: both read the value saved under U+FFFD
  await t.throwsAsync(ck.readObject('\uD800'), { code: 'ERR_DISTCP_BAD_REQUEST', message: /`key` holds a lone surrogate/ })
  t.throws(() => ck.info('\uDFFF'), { code: 'ERR_DISTCP_BAD_REQUEST', message: /`key` holds a lone surrogate/ })
  // a well-formed pair is a character like any other
  t.is(await ck.readObject('\uFFFD'), 1)
  await save({ '\uD83D\uDE00': 3 }, { checkpointId: join(dir, '\uD83D\uDE00') })
  t.is(await (await openCheckpoint(join(dir, '\uD83D\uDE00'))).readObject('\uD83D\uDE00'), 3)
})

test('a PyTuple must hold an array: not saved as an empty tuple, not a TypeError', async (t) => {
  const dir = tmp()
  // before: `new PyTuple(5)` was saved as `()`, `new PyTuple(null)` threw a TypeError
  for (const items of [5, null, 'ab', { length: 2 }]) {
    await t.throwsAsync(save({ t: new PyTuple(items as never) }, { checkpointId: join(dir, 'a') }), {
      code: 'ERR_DISTCP_INVALID_INPUT',
      message: /cannot save key `t`: a PyTuple must hold an array of items/,
    })
    await t.throwsAsync(save(new Map([[new PyTuple(items as never), 1]]), { checkpointId: join(dir, 'b') }), {
      code: 'ERR_DISTCP_INVALID_INPUT',
      message: /a PyTuple must hold an array of items/,
    })
  }
  t.deepEqual(readdirSync(dir), [])
})

test('helpers and options with the wrong type: coded errors naming them', async (t) => {
  const dir = tmp()
  const ok = join(dir, 'ok')
  await save({ x: 1 }, { checkpointId: ok })
  // before: napi's "Failed to convert napi value into rust type `bool`", naming nothing
  t.throws(() => retarget(ok, { torch: '2.13', keepOriginal: 'no' as never }), { code: 'ERR_DISTCP_BAD_REQUEST', message: /`keepOriginal` must be a boolean/ })
  // before: accepted, then a RangeError ("Invalid array length") when a save gave its blocks back, after it wrote
  for (const n of [-1, 1.5, NaN, '4', {}]) {
    t.throws(() => new StagingPool(n as never), { code: 'ERR_DISTCP_INVALID_INPUT', message: /StagingPool: maxIdleBlocks must be a non-negative integer/ }, String(n))
  }
  t.is(new StagingPool(0).maxIdleBlocks, 0)
  // before: 7 bytes as float32 gave one element, the last 3 bytes silently dropped
  t.throws(() => typedArray({ dtype: 'float32', shape: [2], data: new Uint8Array(7) }), {
    code: 'ERR_DISTCP_INVALID_INPUT',
    message: /a float32 tensor's data must hold whole 4-byte elements, it has 7 bytes/,
  })
  t.deepEqual([...typedArray({ dtype: 'int16', shape: [2], data: new Uint8Array([1, 0, 255, 255]) })], [1, -1])
  // before: TypeError "nameOrPath.split is not a function"
  t.throws(() => resolveModel(5 as never), { code: 'ERR_DISTCP_BAD_REQUEST', message: /a model must be named by a folder path or a hub name, not number/ })
})

test('convertDcpToHf: an onProgress that throws fails the conversion instead of ending the process', (t) => {
  // in a child: before, the throw escaped the progress timer as an uncaught exception and killed the process
  const dir = tmp()
  t.teardown(() => rmSync(dir, { recursive: true, force: true }))
  const script = `
    const d = await import(${JSON.stringify(new URL('../src/index.js', import.meta.url).href)})
    const { mkdirSync, writeFileSync, existsSync, readdirSync, rmSync } = await import('node:fs')
    const dir = ${JSON.stringify(dir)}
    mkdirSync(dir + '/model')
    writeFileSync(dir + '/model/config.json', '{}')
    // bigger until the progress timer (every 100 ms) fires during the run at least once
    for (const mb of [32, 128, 512]) {
      rmSync(dir + '/dcp', { recursive: true, force: true })
      rmSync(dir + '/hf', { recursive: true, force: true })
      const n = mb << 20
      await d.save({ 'model.a': { dtype: 'uint8', shape: [n], data: new Uint8Array(n) } }, { checkpointId: dir + '/dcp' })
      let calls = 0
      const boom = new Error('boom from onProgress')
      try {
        await d.convertDcpToHf(dir + '/dcp', dir + '/hf', dir + '/model', undefined, {
          // only a report from the timer throws (the last one, after the run, comes from the awaited call)
          overwrite: true, onWarning: () => {}, onProgress: (p) => { if (p.tensorsDone < p.tensorsTotal) { calls++; throw boom } },
        })
      } catch (e) {
        const weights = existsSync(dir + '/hf') ? readdirSync(dir + '/hf').filter((f) => f.endsWith('.safetensors')) : []
        console.log(JSON.stringify({ mb, calls, code: e.code, message: e.message, cause: e.cause === boom, weights }))
        process.exit(0)
      }
    }
    console.log(JSON.stringify({ never: true }))
  `
  const r = spawnSync(process.execPath, ['--import', '@oxc-node/core/register', '--input-type=module', '-e', script], {
    cwd: root,
    encoding: 'utf8',
    timeout: 150_000,
  })
  t.is(r.status, 0, `status ${r.status} signal ${r.signal}\n${r.stderr.slice(-2000)}`)
  const out = JSON.parse(r.stdout.trim().split('\n').pop() ?? '{}') as Record<string, unknown>
  t.like(out, { calls: 1, code: 'ERR_DISTCP_IO', cause: true, weights: [] }, JSON.stringify(out))
  t.regex(String(out.message), /failed: boom from onProgress; nothing was written/)
})

test('convertDcpToHf: callbacks and the signal must be what they are called as', async (t) => {
  const dir = tmp()
  await save({ 'model.a': f32(2) }, { checkpointId: join(dir, 'dcp') })
  for (const [options, message] of [
    [{ onProgress: true }, /onProgress: expected a function, not boolean/],
    [{ onWarning: 'log' }, /onWarning: expected a function, not string/],
    [{ onPlan: {} }, /onPlan: expected a function, not object/],
    [{ signal: true }, /signal: expected an AbortSignal/],
  ] as const) {
    await t.throwsAsync(convertDcpToHf(join(dir, 'dcp'), join(dir, 'hf'), join(dir, 'model'), undefined, options as never), { code: 'ERR_DISTCP_BAD_REQUEST', message })
  }
  t.false(existsSync(join(dir, 'hf')))
})

test('a `__proto__` key (JSON.parse makes one) saves, reads and loads as a key, never as a prototype', async (t) => {
  const dir = tmp()
  const id = join(dir, 'ck')
  const sd = JSON.parse('{"__proto__": {"x": 1}, "cfg": {"__proto__": 7, "y": 2}}') as Record<string, unknown>
  t.deepEqual((await save(sd, { checkpointId: id })).keys, ['__proto__.x', 'cfg.__proto__', 'cfg.y'])
  // before: load set the target's prototype and then refused the whole state dict ("must be a dict, not a None")
  const target = JSON.parse('{"__proto__": {"x": null}, "cfg": {"__proto__": null, "y": null}}') as Record<string, unknown>
  t.deepEqual(await load(target as never, { checkpointId: id }), { missing: [], unexpected: [], mismatched: [], layout: '2.4' })
  t.is(Object.getPrototypeOf(target), Object.prototype)
  t.deepEqual(Object.getOwnPropertyDescriptor(target, '__proto__')?.value, { x: 1 })
  t.deepEqual(Object.keys(target.cfg as object), ['__proto__', 'y'])
  t.is(Object.getOwnPropertyDescriptor(target.cfg, '__proto__')?.value, 7)

  // a dict stored whole (torch ≤ 2.3 layout): before, readObject dropped the key (or made its value the prototype)
  const old = join(dir, 'old')
  await save({ m: new Map<unknown, unknown>([['__proto__', { z: 3 }], ['a', 2]]) }, { checkpointId: old, layout: '2.3' })
  const ck = await openCheckpoint(old)
  t.deepEqual(ck.keys(), ['m'])
  const v = (await ck.readObject('m')) as Record<string, unknown>
  t.is(Object.getPrototypeOf(v), Object.prototype)
  t.deepEqual(Object.keys(v), ['__proto__', 'a'])
  t.deepEqual(Object.getOwnPropertyDescriptor(v, '__proto__')?.value, { z: 3 })
  t.is((v as { z?: unknown }).z, undefined)
  // load (exact mode, then plain dicts) too
  const into = { m: null } as Record<string, unknown>
  await load(into as never, { checkpointId: old })
  t.deepEqual(Object.keys(into.m as object), ['__proto__', 'a'])
  t.is(Object.getPrototypeOf(into.m), Object.prototype)
})

test("load: a target tensor's shape must hold integers, as save's must (a bigint threw a TypeError, a string passed)", async (t) => {
  const dir = tmp()
  const id = join(dir, 'ck')
  await save({ w: f32(4, 1) }, { checkpointId: id })
  for (const [d, shown] of [[4n, '4n'], ['4', '"4"'], [4.5, '4.5'], [-4, '-4'], [NaN, 'NaN']] as const) {
    const target = { w: { dtype: 'float32', shape: [d], data: new Uint8Array(16) } }
    await t.throwsAsync(load(target as never, { checkpointId: id }), {
      code: 'ERR_DISTCP_INVALID_INPUT',
      message: `${id}: key \`w\`: the state dict's tensor shape must hold non-negative integers, its dimension 0 is ${shown}`,
    })
    t.deepEqual([...target.w.data], Array<number>(16).fill(0), 'nothing loaded')
  }
  const ok = { w: f32(4) }
  await load(ok, { checkpointId: id })
  t.deepEqual([...new Float32Array(ok.w.data.buffer)], [1, 1, 1, 1])
})

test('huge ints: refused past MAX_INT_DIGITS / MAX_INT_BYTES, where their decimal conversion took seconds to hours', async (t) => {
  const dir = tmp()
  // before: 7n ** 300000n (253,530 digits) took 15 s to save and 18 s to read back, quadratic beyond
  const id = join(dir, 'ck')
  const largest = 10n ** 19658n // 19,659 digits: the limit
  for (const x of [largest, -largest]) {
    await save({ x }, { checkpointId: id })
    t.is(await (await openCheckpoint(id)).readObject('x'), x)
  }
  await t.throwsAsync(save({ x: 10n * largest }, { checkpointId: join(dir, 'a') }), {
    code: 'ERR_DISTCP_INVALID_INPUT',
    message: /at x: an int of 19660 digits \(distcp saves ints up to 19659 digits\)/,
  })
  const started = Date.now()
  await t.throwsAsync(save({ y: 7n ** 300000n }, { checkpointId: join(dir, 'b') }), { code: 'ERR_DISTCP_INVALID_INPUT', message: /at y: an int of 253530 digits/ })
  t.true(Date.now() - started < 2000, `${Date.now() - started} ms`)
  t.false(existsSync(join(dir, 'a')) && readdirSync(join(dir, 'a')).length > 0)

  // what torch saves: a LONG4 longer than MAX_INT_BYTES is a coded error naming the key; one within reads back
  const fromTorch = join(dir, 'torch')
  runPython(['-c', "import sys, torch.distributed.checkpoint as dcp; dcp.save({'big': 1 << 72000, 'ok': -(7 ** 23000)}, checkpoint_id=sys.argv[1], no_dist=True)", fromTorch])
  const ck = await openCheckpoint(fromTorch)
  t.is(await ck.readObject('ok'), -(7n ** 23000n))
  await t.throwsAsync(ck.readObject('big'), { code: 'ERR_DISTCP_RECORD', message: /key `big`: .*an int of 9001 bytes \(distcp reads ints up to 8192 bytes/ })
})
