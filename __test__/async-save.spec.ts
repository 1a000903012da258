import test from 'ava'
import { spawnSync } from 'node:child_process'
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, symlinkSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

import { AsyncSaver, DistcpError, PyTuple, StagingPool, loadCheckpoint, openCheckpoint, saveAsync, saveCheckpoint, stagingPool, save } from '../src/index.js'
import { Adam, StepLR, TinyMLP } from '../examples/tiny-trainer/index.js'
import { native } from '../src/native.js'
import { checkFixture, diffTyped, loadExpected, root, runPython } from './helpers.js'
import { fullState, smallState, toExact } from './save-child.js'

// saveAsync: the call copies (stages) and returns; the write runs behind, one writer at a time. What torch loads
// from an async checkpoint is what was staged, bit for bit, whatever the caller did to its buffers afterwards.

const work = mkdtempSync(join(tmpdir(), 'distcp-async-'))
test.after.always(() => {
  if (!process.env.DISTCP_KEEP_TMP) rmSync(work, { recursive: true, force: true })
})

function f32(values: number[]): { dtype: 'float32'; shape: number[]; data: Float32Array } {
  return { dtype: 'float32', shape: [values.length], data: new Float32Array(values) }
}

/** A deep copy that copies tensor bytes and keeps class instances (PyFloat, PyTuple) as they are. */
function cloneState<T>(v: T): T {
  if (ArrayBuffer.isView(v)) return (v as unknown as Uint8Array).slice() as T
  if (v instanceof PyTuple) return new PyTuple(v.items.map(cloneState) as PyTuple['items']) as T
  if (v instanceof Map) return new Map([...v].map(([k, x]) => [k, cloneState(x)])) as T
  if (Array.isArray(v)) return v.map(cloneState) as T
  if (v && typeof v === 'object' && Object.getPrototypeOf(v) === Object.prototype) {
    return Object.fromEntries(Object.entries(v).map(([k, x]) => [k, cloneState(x)])) as T
  }
  return v
}

async function readF32(ckpt: string, key: string): Promise<number[]> {
  const ck = await openCheckpoint(ckpt)
  try {
    const t = await ck.read(key)
    return [...new Float32Array(new Uint8Array(t.data).slice().buffer)]
  } finally {
    ck.close()
  }
}

test('staged settles before committed, and the copy is done when saveAsync returns', async (t) => {
  const w = f32([1, 2, 3, 4])
  const events: string[] = []
  const h = saveAsync({ w, step: 7 }, { checkpointId: join(work, 'order') })
  // the caller changes its buffer at once, without awaiting anything: the checkpoint has the values of the call
  w.data[0] = 99
  h.staged.then(() => events.push('staged'))
  h.committed.then(() => events.push('committed'))
  const info = await h.staged
  t.is(info.bytes, 16)
  const r = await h.committed
  t.deepEqual(events, ['staged', 'committed'])
  t.deepEqual(r.keys, ['w', 'step'])
  t.deepEqual(await readF32(join(work, 'order'), 'w'), [1, 2, 3, 4])
})

test('buffers changed after staged do not change the checkpoint; torch loads it bit for bit', async (t) => {
  const ckpt = join(work, 'full')
  const sd = fullState()
  // what the checkpoint must hold: the state as it was at the call
  const before = cloneState(sd)
  const h = saveAsync(sd, { checkpointId: ckpt })
  await h.staged
  // scribble over every tensor the caller owns while the write may still run
  const scribble = (v: unknown): void => {
    if (v && typeof v === 'object') {
      if (ArrayBuffer.isView(v)) new Uint8Array(v.buffer, v.byteOffset, v.byteLength).fill(0xa5)
      else for (const x of v instanceof Map ? v.values() : Object.values(v)) scribble(x)
    }
  }
  scribble(sd)
  await h.committed
  const dir = join(work, 'torch-full')
  const summary = JSON.parse(runPython(['interop/load_with_torch.py', ckpt, dir]).trim().split('\n').at(-1)!) as { methods: Record<string, string> }
  t.is(summary.methods.dcp_load, 'ok')
  const methodDir = join(dir, 'dcp_load')
  const { expected, bytes } = loadExpected(methodDir)
  const errors: string[] = []
  diffTyped(toExact(before), expected.tree, bytes, 'saved', errors)
  t.deepEqual(errors, [], `torch ${expected.torch_version} sees something else than what was staged`)
  symlinkSync(ckpt, join(methodDir, 'ckpt'))
  await checkFixture(t, methodDir)
})

/**
 * Makes the core's pause hook (DISTCP_TEST_PAUSE_AT) wait until the returned function is called, or two minutes;
 * the variables are read by the writer thread when it reaches the point.
 */
function pauseRelease(name: string): () => void {
  const file = join(work, `release-${name}`)
  rmSync(file, { force: true })
  process.env.DISTCP_TEST_PAUSE_RELEASE = file
  process.env.DISTCP_TEST_PAUSE_MS = '120000'
  return () => {
    writeFileSync(file, '')
    delete process.env.DISTCP_TEST_PAUSE_RELEASE
    delete process.env.DISTCP_TEST_PAUSE_MS
  }
}

test.serial('a second save waits for the first: one writer, commits in call order', async (t) => {
  // the first save sleeps holding its folder lock (the core's pause hook), long enough to see the second wait
  // it waits there until this test releases it (or two minutes): a loaded machine's slow timers cannot end the wait
  // before the test has looked
  const release = pauseRelease('wait')
  process.env.DISTCP_TEST_PAUSE_AT = 'save:locked'
  const saver = new AsyncSaver()
  const a = join(work, 'wait-a')
  const b = join(work, 'wait-b')
  const events: string[] = []
  try {
    const ha = saver.save(smallState(1), { checkpointId: a })
    const hb = saver.save(smallState(2), { checkpointId: b })
    // both staged at once (maxStaged 1: one writes, one waits staged)
    await Promise.all([ha.staged, hb.staged])
    ha.committed.then(() => events.push('a'))
    hb.committed.then(() => events.push('b'))
    await new Promise((r) => setTimeout(r, 700))
    t.true(saver.stats().writing)
    t.is(saver.stats().inFlight, 2)
    // the second writer has not started: its folder does not exist yet
    t.true(existsSync(a))
    t.false(existsSync(b))
    delete process.env.DISTCP_TEST_PAUSE_AT
    release()
    await Promise.all([ha.committed, hb.committed])
  } finally {
    delete process.env.DISTCP_TEST_PAUSE_AT
    release()
  }
  t.deepEqual(events, ['a', 'b'])
  t.deepEqual(saver.stats(), { inFlight: 0, writing: false, committed: 2, failed: 0, cancelled: 0 })
})

test.serial("ifBusy: 'reject' refuses while a save is in flight, and writes nothing", async (t) => {
  const saver = new AsyncSaver()
  const first = saver.save(smallState(1), { checkpointId: join(work, 'busy-a') })
  const second = saver.save(smallState(2), { checkpointId: join(work, 'busy-b'), ifBusy: 'reject' })
  const e = await t.throwsAsync(second.committed, { instanceOf: DistcpError })
  t.is(e?.code, 'ERR_DISTCP_BUSY')
  await t.throwsAsync(second.staged, { instanceOf: DistcpError })
  await first.committed
  t.false(existsSync(join(work, 'busy-b')))
  // idle again: accepted
  await saver.save(smallState(3), { checkpointId: join(work, 'busy-b'), ifBusy: 'reject' }).committed
  t.deepEqual(await readF32(join(work, 'busy-b'), 'model.b'), [1.5])
})

test('staging buffers are reused across saves: no allocation once warm', async (t) => {
  const pool = new StagingPool()
  const saver = new AsyncSaver({ pool })
  const w = f32(Array.from({ length: 1000 }, (_, i) => i))
  for (let i = 0; i < 4; i++) {
    w.data[0] = i
    await saver.save({ w }, { checkpointId: join(work, 'reuse') }).committed
    t.deepEqual((await readF32(join(work, 'reuse'), 'w')).slice(0, 2), [i, 1])
  }
  const s = pool.stats()
  t.is(s.allocations, 1)
  t.is(s.reuses, 3)
  t.is(s.blocksInUse, 0)
  // the blocking save shares the process-wide pool: warm after one save
  const before = stagingPool.stats().allocations
  await save({ w }, { checkpointId: join(work, 'reuse-sync') })
  const warm = stagingPool.stats().allocations
  await save({ w }, { checkpointId: join(work, 'reuse-sync') })
  t.true(warm >= before)
  t.is(stagingPool.stats().allocations, warm)
})

test('the staging copy runs on several threads and copies every byte: odd sizes, odd offsets, a tensor split across threads', (t) => {
  const pool = new StagingPool()
  // 40 MiB + change: more than two threads' minimum share, so the copy is split (also inside the big view)
  const big = new Uint8Array(40 * 1024 * 1024 + 13)
  for (let i = 0; i < big.length; i += 4096) big[i] = (i / 4096) & 255
  big[big.length - 1] = 7
  const backing = new Uint8Array(1001).map((_, i) => i * 31)
  const views = [new Uint8Array(backing.buffer, 3, 997), new Uint8Array(0), big, new Uint8Array([1, 2, 3])]
  const staged = pool.stage(views)
  if (staged instanceof Promise) return t.fail('host bytes must be copied in the call')
  const { copies, lease } = staged
  try {
    t.is(copies.length, views.length)
    for (let i = 0; i < views.length; i++) {
      t.is(copies[i].byteLength, views[i].byteLength)
      t.true(Buffer.from(copies[i].buffer, copies[i].byteOffset, copies[i].byteLength).equals(Buffer.from(views[i].buffer, views[i].byteOffset, views[i].byteLength)), `view ${i}`)
    }
    t.not(copies[2].buffer, big.buffer)
  } finally {
    lease.release()
  }
  // the native copy refuses what would alias: a destination inside a source, pairs of different lengths
  const buf = new Uint8Array(64)
  t.throws(() => native.copyStaging([buf.subarray(0, 32)], [buf.subarray(16, 48)]), { code: 'ERR_DISTCP_INVALID_INPUT' })
  t.throws(() => native.copyStaging([buf.subarray(0, 8)], [new Uint8Array(9)]), { code: 'ERR_DISTCP_INVALID_INPUT' })
  // sources may share memory (two views of one tensor are read, never written)
  const dst = new Uint8Array(16)
  native.copyStaging([backing.subarray(0, 8), backing.subarray(4, 12)], [dst.subarray(0, 8), dst.subarray(8, 16)])
  t.deepEqual([...dst], [...backing.subarray(0, 8), ...backing.subarray(4, 12)])
})

test('device tensors stage into the same blocks, in order with host bytes; a failed transfer gives the blocks back', async (t) => {
  // a host stand-in for the device-to-host transfer: the device "memory" is a host array found by its pointer, and
  // each transfer completes on a later turn of the event loop, as a native copy does
  const deviceMemory = new Map<bigint, Uint8Array>()
  const transfers: bigint[] = []
  const download = async (leaf: { ptr: bigint; byteLength: number }, into: Uint8Array): Promise<void> => {
    await new Promise((r) => setImmediate(r))
    const mem = deviceMemory.get(leaf.ptr)
    if (!mem) throw new DistcpError('ERR_DISTCP_CUDA', `no device memory at ${leaf.ptr}`)
    transfers.push(leaf.ptr)
    into.set(mem.subarray(0, leaf.byteLength))
  }
  const pool = new StagingPool(4, download)
  const leaf = (ptr: bigint, bytes: number[]) => {
    deviceMemory.set(ptr, new Uint8Array(bytes))
    return { dtype: 'uint8' as const, shape: [bytes.length], device: 'cuda:0', ptr, byteLength: bytes.length }
  }
  const sources = [new Uint8Array([1, 2]), leaf(4096n, [3, 4, 5]), new Uint8Array([6]), leaf(8192n, [7, 8]), new Uint8Array(0)]
  const want = [[1, 2], [3, 4, 5], [6], [7, 8], []]
  // stage(): a promise (there are device sources), every copy right
  const staged = pool.stage(sources)
  t.true(staged instanceof Promise)
  const { copies, lease } = await staged
  t.deepEqual(copies.map((c) => [...c]), want)
  t.deepEqual(transfers, [4096n, 8192n])
  lease.release()
  // fill(onFilled): in index order, each source reported once its copy is done
  const r = pool.reserve(sources)
  const seen: number[][] = []
  const filling = r.fill((filled) => seen.push(r.copies.slice(0, filled).flatMap((c) => [...c])))
  t.true(filling instanceof Promise)
  t.deepEqual(seen, [[1, 2]], 'reported at once up to the first device source')
  t.deepEqual([...r.copies[2]], [6], 'every host source is copied in the call, also after a device source')
  await filling
  t.deepEqual(seen, [[1, 2], [1, 2, 3, 4, 5], [1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 5, 6, 7, 8]])
  r.lease.release()
  // a transfer that fails: stage rejects with its error and the blocks go back to the pool
  const bad = [new Uint8Array([1]), { dtype: 'uint8' as const, shape: [1], device: 'cuda:0', ptr: 1n, byteLength: 1 }]
  await t.throwsAsync(Promise.resolve(pool.stage(bad)), { code: 'ERR_DISTCP_CUDA' })
  t.is(pool.stats().blocksInUse, 0)
})

test.serial('close({ cancel: true }) rejects the saves not yet writing, lets the writing one commit, refuses new ones', async (t) => {
  const saver = new AsyncSaver({ maxStaged: 2 })
  const release = pauseRelease('cancel')
  process.env.DISTCP_TEST_PAUSE_AT = 'save:locked'
  let closing: Promise<void>
  const h1 = saver.save(smallState(1), { checkpointId: join(work, 'cancel-1') })
  const h2 = saver.save(smallState(2), { checkpointId: join(work, 'cancel-2') })
  const h3 = saver.save(smallState(3), { checkpointId: join(work, 'cancel-3') })
  try {
    while (!saver.stats().writing) await new Promise((r) => setImmediate(r))
    closing = saver.close({ cancel: true })
  } finally {
    delete process.env.DISTCP_TEST_PAUSE_AT
    release()
  }
  await h1.committed
  for (const h of [h2, h3]) t.is((await t.throwsAsync(h.committed, { instanceOf: DistcpError }))?.code, 'ERR_DISTCP_CANCELLED')
  await closing
  t.false(existsSync(join(work, 'cancel-2')))
  t.false(existsSync(join(work, 'cancel-3')))
  t.is((await t.throwsAsync(saver.save(smallState(4), { checkpointId: join(work, 'cancel-4') }).committed, { instanceOf: DistcpError }))?.code, 'ERR_DISTCP_CLOSED')
  t.deepEqual(saver.stats(), { inFlight: 0, writing: false, committed: 1, failed: 0, cancelled: 2 })
  t.is(saver.pool.stats().blocksInUse, 0)
})

test('an invalid state dict rejects staged and committed with the save error', async (t) => {
  const saver = new AsyncSaver()
  const h = saver.save({ w: { dtype: 'float32', shape: [3], data: new Float32Array(2) } }, { checkpointId: join(work, 'bad') })
  t.is((await t.throwsAsync(h.staged, { instanceOf: DistcpError }))?.code, 'ERR_DISTCP_INVALID_INPUT')
  t.is((await t.throwsAsync(h.committed, { instanceOf: DistcpError }))?.code, 'ERR_DISTCP_INVALID_INPUT')
  t.false(existsSync(join(work, 'bad')))
  // the queue goes on
  await saver.save(smallState(5), { checkpointId: join(work, 'after-bad') }).committed
  t.deepEqual(saver.stats().failed, 1)
})

test('saveCheckpoint(…, { async: true }): weights and optimizer staged at once, loadCheckpoint reads what was staged', async (t) => {
  const model = new TinyMLP({ inFeatures: 4, hidden: 4, outFeatures: 1, seed: 3 })
  const optimizer = new Adam(model.namedParameters().map(([, p]) => p), { lr: 0.001 })
  const scheduler = new StepLR(optimizer, { stepSize: 1, gamma: 0.1 })
  const dir = join(work, 'ckpt-async')
  const snapshot = model.namedParameters().map(([n, p]) => [n, new Uint8Array(p.data.buffer, p.data.byteOffset, p.data.byteLength).slice()] as const)
  const h = saveCheckpoint(model, join(dir, 'weights'), { async: true, optimizer, scheduler, optimizerPath: join(dir, 'optimizer') })
  const staged = await h.staged
  t.is(staged.length, 2)
  // the trainer goes on: every parameter changes before the write is done
  for (const [, p] of model.namedParameters()) new Uint8Array(p.data.buffer, p.data.byteOffset, p.data.byteLength).fill(0x3f)
  await h.committed
  const fresh = new TinyMLP({ inFeatures: 4, hidden: 4, outFeatures: 1, seed: 9 })
  const freshOpt = new Adam(fresh.namedParameters().map(([, p]) => p), { lr: 0.5 })
  const freshSched = new StepLR(freshOpt, { stepSize: 1, gamma: 0.1 })
  await loadCheckpoint(fresh, join(dir, 'weights'), { optimizer: freshOpt, scheduler: freshSched, optimizerPath: join(dir, 'optimizer') })
  for (const [[n, want], [m, p]] of snapshot.map((s, i) => [s, fresh.namedParameters()[i]] as const)) {
    t.is(n, m)
    t.deepEqual(new Uint8Array(p.data.buffer, p.data.byteOffset, p.data.byteLength), want)
  }
  // a missing optimizerPath rejects both promises; the weights are still written (as the seed)
  const bad = saveCheckpoint(model, join(dir, 'weights2'), { async: true, optimizer })
  t.is((await t.throwsAsync(bad.committed, { instanceOf: DistcpError }))?.message, 'optimizerPath must be provided when saving optimizer state')
  t.true(existsSync(join(dir, 'weights2', '.metadata')))
})

// kill -9 during an async save (at each of the core's crash points): the folder holds the previous checkpoint or
// the new one, complete — distcp and torch agree on which.
const CHILD = join(root, '__test__', 'async-child.ts')
for (const point of ['save:locked', 'save:afterFirstItem', 'save:beforeCommit', 'save:afterCommit', 'save:afterLink', 'save:afterFinalCommit']) {
  test(`kill -9 at ${point} of an async save leaves a complete checkpoint`, async (t) => {
    const ckpt = join(work, `kill-${point.replace(':', '-')}`)
    await save(smallState(1), { checkpointId: ckpt })
    const r = spawnSync(process.execPath, ['--import', '@oxc-node/core/register', CHILD, 'saveAsync', ckpt, '2'], {
      cwd: root,
      encoding: 'utf8',
      env: { ...process.env, DISTCP_TEST_CRASH_AT: point },
      timeout: 120_000,
    })
    t.is(r.signal, 'SIGKILL', r.stderr)
    t.true(r.stdout.includes('staged'), 'the child was killed after staging, while writing')
    const step = Number(await (await openCheckpoint(ckpt)).readObject('step'))
    // before the commit point the old checkpoint, after it the new one
    const committedAt = ['save:afterCommit', 'save:afterLink', 'save:afterFinalCommit'].includes(point)
    t.is(step, committedAt ? 2 : 1)
    const dir = join(work, `torch-kill-${point.replace(':', '-')}`)
    runPython(['interop/load_with_torch.py', ckpt, dir])
    const exp = JSON.parse(readFileSync(join(dir, 'dcp_load', 'expected.json'), 'utf8')) as { objects: { step: { v: string } } }
    t.is(Number(exp.objects.step.v), step)
  })
}

// the write behind the trainer runs on a thread of its own at nice 10 (crates/distcp-node/src/background.rs); a
// blocking save's write does not. Seen from /proc while the write runs (Linux).
// serial: it looks at every thread of the process, and another test's saveAsync running beside it has a writer
// thread of the same name (CI on session 10's final commit saw one during the blocking save)
test.serial('saveAsync writes on a lower-priority thread of its own; save does not', async (t) => {
  if (process.platform !== 'linux') return t.pass()
  const threads = (): { name: string; nice: number }[] =>
    readdirSync('/proc/self/task').flatMap((tid) => {
      try {
        const name = readFileSync(`/proc/self/task/${tid}/comm`, 'utf8').trim()
        // field 19 of stat is the nice value; the command name (field 2) may hold spaces, so count after its ')'
        const stat = readFileSync(`/proc/self/task/${tid}/stat`, 'utf8')
        return [{ name, nice: Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[16]) }]
      } catch {
        return []
      }
    })
  // the process may itself run niced (a CI runner): the writer's nice is max(the process's, 10)
  const base = threads()[0].nice
  const big = { w: { dtype: 'float32' as const, shape: [64, 1024, 1024], data: new Uint8Array(256 * 2 ** 20) } }
  const watch = async (p: Promise<unknown>) => {
    const seen = new Map<string, number>()
    let done = false
    void p.finally(() => (done = true))
    while (!done) {
      for (const th of threads()) if (th.name.startsWith('distcp-backgrou')) seen.set(th.name, th.nice)
      await new Promise((r) => setTimeout(r, 2))
    }
    await p
    return seen
  }
  const bg = await watch(saveAsync(big, { checkpointId: join(work, 'prio-async') }).committed)
  t.deepEqual([...bg.values()], [Math.max(base, 10)], `threads seen: ${JSON.stringify([...bg])}`)
  // the async writer's thread has been joined, but its /proc entry can outlive the join for a moment on a loaded
  // machine: wait until it is gone, so that what is seen next belongs to the blocking save
  for (let i = 0; i < 500 && threads().some((th) => th.name.startsWith('distcp-backgrou')); i++) await new Promise((r) => setTimeout(r, 10))
  const fg = await watch(save(big, { checkpointId: join(work, 'prio-blocking') }))
  t.is(fg.size, 0, `background threads seen during the blocking save: ${JSON.stringify([...fg])}`)
  t.true(threads().every((th) => th.nice === base || th.name.startsWith('distcp-backgrou')), 'no other thread was made nicer')
})
