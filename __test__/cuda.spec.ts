import test from 'ava'
import { spawnSync } from 'node:child_process'
import { existsSync, mkdtempSync, readFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

import { createServer } from 'node:net'

import { openCheckpoint, cudaInfo, CheckpointError, DeviceTensor, DistcpError, flattenStateDict, initProcessGroup, load, save } from '../src/index.js'
import { native } from '../src/native.js'
import { root } from './helpers.js'

const example = join(root, 'examples', 'tiny-llama', 'dcp')
const key = 'model.model.embed_tokens.weight'
const shard1 = join(root, 'fixtures', 'torch-2.15.0', 'dtensor-2rank', 'ckpt')
const info = cudaInfo()
const gpu = info.available

test('cudaInfo reports the driver or, without one, why not', (t) => {
  if (gpu) {
    t.true(info.devices.length > 0)
    t.regex(info.driverVersion ?? '', /^\d+\.\d+$/)
    t.is(info.reason, undefined)
  } else {
    t.deepEqual(info.devices, [])
    t.regex(info.reason ?? '', /no CUDA: .*(libcuda|no device|initialise)/)
    t.is(info.driverVersion, undefined)
  }
})

const noCuda = { instanceOf: DistcpError, code: 'ERR_DISTCP_NO_CUDA' } as const

test('without a GPU every device read rejects with ERR_DISTCP_NO_CUDA and the reason', async (t) => {
  if (gpu) return t.pass('this machine has a GPU')
  const ck = await openCheckpoint(example)
  const whole = await t.throwsAsync(ck.read(key, { device: 'cuda:0' }), noCuda)
  t.true(whole?.message.includes(info.reason!.replace(/^no CUDA: /, '')))
  await t.throwsAsync(ck.read(key, { device: 'cuda', offsets: [1, 2], sizes: [3, 4] }), noCuda)
  await t.throwsAsync(ck.read(key, { device: 'cuda:3' }), noCuda)
  const host = await ck.read(key)
  await t.throwsAsync(ck.read(key, { into: { device: 'cuda:0', ptr: 1n << 40n, byteLength: host.data.byteLength } }), noCuda)
  // host reads are unaffected
  t.deepEqual(Buffer.from((await ck.read(key)).data), Buffer.from(host.data))
  ck.close()
})

test('device requests are checked before any device work', async (t) => {
  const ck = await openCheckpoint(example)
  const bad = { instanceOf: DistcpError, code: 'ERR_DISTCP_BAD_REQUEST' } as const
  await t.throwsAsync(ck.read(key, { device: 'gpu:0' }), bad)
  const e = await t.throwsAsync(ck.read(key, { into: { device: 'cuda:0', ptr: 1n << 40n, byteLength: 3 } }), bad)
  t.regex(e?.message ?? '', /holds 3 bytes/)
  await t.throwsAsync(ck.read(key, { device: 'cuda:0', offsets: [0, 0], sizes: [9999, 1] }), {
    instanceOf: DistcpError,
    code: 'ERR_DISTCP_BAD_REQUEST',
  })
  ck.close()
})

// serial: the hook is process-wide, and ava runs serial tests before the concurrent ones
test.serial('a panic inside the CUDA layer surfaces as a coded error, not a crash', async (t) => {
  const ck = await openCheckpoint(example)
  native.cudaInjectPanicForTest(true)
  try {
    const e = await t.throwsAsync(ck.read(key, { device: 'cuda:0' }), { instanceOf: DistcpError, code: 'ERR_DISTCP_INTERNAL' })
    t.regex(e?.message ?? '', /panic injected by the test hook/)
    const i = cudaInfo()
    t.false(i.available)
    t.regex(i.reason ?? '', /panic injected/)
  } finally {
    native.cudaInjectPanicForTest(false)
  }
  t.is(cudaInfo().available, gpu)
  t.true((await ck.read(key)).data.byteLength > 0)
  ck.close()
})

test('a DeviceTensor over caller memory: DLPack fields, dispose twice, use after dispose is a coded error', (t) => {
  const d = new DeviceTensor('bfloat16', [2, 3, 4], 'cuda:1', 48, undefined, 0x7f00_0000_1000n)
  t.deepEqual(d.toDLPack(), {
    data: 0x7f00_0000_1000n,
    device: { deviceType: 2, deviceId: 1 },
    dtype: { code: 4, bits: 16, lanes: 1 },
    shape: [2, 3, 4],
    strides: [12, 4, 1],
    byteOffset: 0,
  })
  t.is(new DeviceTensor('float8_e4m3fn', [], 'cuda', 1, undefined, 1n).toDLPack().dtype.code, 10)
  t.is(new DeviceTensor('complex64', [5], 'cuda:0', 40, undefined, 1n).toDLPack().dtype.bits, 64)
  d.dispose()
  d.dispose()
  t.true(d.disposed)
  t.throws(() => d.ptr, { instanceOf: DistcpError, code: 'ERR_DISTCP_DISPOSED' })
  t.throws(() => d.toDLPack(), { instanceOf: DistcpError, code: 'ERR_DISTCP_DISPOSED' })
})

test('on a GPU: device reads equal host reads (whole, boxes, Shard(1)); dispose frees once', async (t) => {
  if (!gpu) return t.pass('no GPU on this machine')
  const cases: [string, string, { offsets: number[]; sizes: number[] }][] = [
    [example, key, { offsets: [3, 5], sizes: [7, 11] }],
    [shard1, 'shard1', { offsets: [1, 3], sizes: [2, 4] }],
  ]
  for (const [dir, k, box] of cases) {
    const ck = await openCheckpoint(dir)
    const host = await ck.read(k)
    const dev = await ck.read(k, { device: 'cuda:0' })
    t.deepEqual(dev.shape, host.shape)
    t.deepEqual(Buffer.from(await dev.toHost()), Buffer.from(host.data))
    const hb = await ck.read(k, box)
    const db = await ck.read(k, { device: 'cuda:0', ...box })
    t.deepEqual(Buffer.from(await db.toHost()), Buffer.from(hb.data))
    dev.dispose()
    dev.dispose()
    t.throws(() => dev.ptr, { code: 'ERR_DISTCP_DISPOSED' })
    await t.throwsAsync(dev.toHost(), { code: 'ERR_DISTCP_DISPOSED' })
    // into caller memory: the box lands in distcp-owned memory used as a caller target
    await ck.read(k, { into: { device: 'cuda:0', ptr: db.ptr, byteLength: db.byteLength }, ...box })
    t.deepEqual(Buffer.from(await db.toHost()), Buffer.from(hb.data))
    db.dispose()
    ck.close()
  }
})

test('load and save with device leaves: without a GPU they reject with ERR_DISTCP_NO_CUDA before any work', async (t) => {
  if (gpu) return t.pass('this machine has a GPU')
  const target = { data: new Uint8Array(320 * 64 * 4).fill(7), dtype: 'float32' as const, shape: [320, 64] }
  const devLeaf = { dtype: 'float32' as const, shape: [320, 64], device: 'cuda:0', ptr: 1n << 40n, byteLength: 320 * 64 * 4 }
  // a device leaf: nothing is read, not even the host tensor beside it
  const sd = { model: { model: { embed_tokens: { weight: devLeaf } }, lm_head: { weight: target } } }
  await t.throwsAsync(load(sd, { checkpointId: example, strict: false }), noCuda)
  t.true(target.data.every((b) => b === 7))
  // device: 'cuda:0' for tensors that replace non-tensor leaves
  await t.throwsAsync(load({ model: { model: { embed_tokens: { weight: null } } } }, { checkpointId: example, strict: false, device: 'cuda:0' }), noCuda)
  // a save of a device tensor: no folder is created
  const dir = join(mkdtempSync(join(tmpdir(), 'distcp-cuda-')), 'ck')
  await t.throwsAsync(save({ w: devLeaf }, { checkpointId: dir }), noCuda)
  await t.throwsAsync(save({ w: new DeviceTensor('float32', [2], 'cuda:0', 8, undefined, 1n << 40n) }, { checkpointId: dir }), noCuda)
  t.false(existsSync(dir))
})

test('device leaves flatten like host tensors (a list of them is walked into)', (t) => {
  const dev = (i: number) => new DeviceTensor('bfloat16', [2], 'cuda:0', 4, undefined, BigInt(4096 * (i + 1)))
  const host = (i: number) => ({ dtype: 'bfloat16' as const, shape: [2], data: new Uint8Array(4).fill(i) })
  for (const layout of ['2.4', '2.3'] as const) {
    const d = [...flattenStateDict({ a: [dev(0), dev(1)], b: { c: dev(2) } }, layout).keys()]
    const h = [...flattenStateDict({ a: [host(0), host(1)], b: { c: host(2) } }, layout).keys()]
    t.deepEqual(d, h)
    t.deepEqual(d, ['a.0', 'a.1', 'b.c'])
  }
})

test('on a GPU: load fills device leaves and a save of device tensors equals the host save', async (t) => {
  if (!gpu) return t.pass('no GPU on this machine')
  const ck = await openCheckpoint(example)
  const host = await ck.read(key)
  const dev = await ck.read(key, { device: 'cuda:0' })
  const empty = await ck.read(key, { device: 'cuda:0', sizes: [320, 64] })
  await load({ model: { model: { embed_tokens: { weight: empty } } } }, { checkpointId: example, strict: false })
  t.deepEqual(Buffer.from(await empty.toHost()), Buffer.from(host.data))
  const base = mkdtempSync(join(tmpdir(), 'distcp-cuda-'))
  await save({ w: dev }, { checkpointId: join(base, 'dev') })
  await save({ w: host }, { checkpointId: join(base, 'host') })
  for (const f of ['.metadata', '__0_0.distcp']) {
    t.deepEqual(readFileSync(join(base, 'dev', f)), readFileSync(join(base, 'host', f)))
  }
  dev.dispose()
  empty.dispose()
  ck.close()
})

async function inProcessGroup(n: number) {
  const masterPort = await new Promise<number>((resolve) => {
    const s = createServer().listen(0, '127.0.0.1', () => {
      const port = (s.address() as { port: number }).port
      s.close(() => resolve(port))
    })
  })
  return Promise.all(Array.from({ length: n }, (_, rank) => initProcessGroup({ rank, worldSize: n, masterAddr: '127.0.0.1', masterPort, timeoutMs: 10_000, useAgentStore: false, prefix: `cuda${masterPort}` })))
}

test('a multi-rank save with device tensors: host copies as in a single-rank save (equal files on a GPU; without one every rank rejects naming the rank and ERR_DISTCP_NO_CUDA)', async (t) => {
  const pgs = await inProcessGroup(2)
  const base = mkdtempSync(join(tmpdir(), 'distcp-cuda-ranks-'))
  const hostSlice = (r: number) => ({ dtype: 'float32' as const, shape: [2, 4], data: new Float32Array(8).map((_, i) => r * 8 + i), globalShape: [4, 4], globalOffsets: [2 * r, 0] })
  try {
    if (!gpu) {
      const devLeaf = { dtype: 'float32' as const, shape: [2, 4], device: 'cuda:0', ptr: 1n << 40n, byteLength: 32, globalShape: [4, 4], globalOffsets: [2, 0] }
      const saves = pgs.map((pg) => save({ w: pg.rank === 1 ? devLeaf : hostSlice(0) }, { checkpointId: join(base, 'dev'), processGroup: pg }))
      const errs = await Promise.all(saves.map((p) => t.throwsAsync(p, { instanceOf: CheckpointError })))
      for (const e of errs) t.regex(e?.message ?? '', /rank 1: .*no CUDA/i)
      t.false(existsSync(join(base, 'dev', '.metadata')))
      return
    }
    // on a GPU: the host save first; each rank reads its slice of it to the device and saves that: byte-identical
    await Promise.all(pgs.map((pg) => save({ w: hostSlice(pg.rank) }, { checkpointId: join(base, 'host'), processGroup: pg })))
    const ck = await openCheckpoint(join(base, 'host'))
    const devs = await Promise.all(pgs.map(async (pg) => {
      const d = await ck.read('w', { device: 'cuda:0', offsets: [2 * pg.rank, 0], sizes: [2, 4] })
      return Object.assign(d, { globalShape: [4, 4], globalOffsets: [2 * pg.rank, 0] })
    }))
    ck.close()
    await Promise.all(pgs.map((pg) => save({ w: devs[pg.rank] }, { checkpointId: join(base, 'dev'), processGroup: pg })))
    for (const f of ['.metadata', '__0_0.distcp', '__1_0.distcp']) t.deepEqual(readFileSync(join(base, 'dev', f)), readFileSync(join(base, 'host', f)), f)
    devs.forEach((d) => d.dispose())
  } finally {
    await Promise.all(pgs.map((pg) => pg.destroy()))
  }
})

test('bench/gpu/node-checks.mjs (the Node checks the GPU machine runs) passes with host memory standing in for the device', (t) => {
  const r = spawnSync(process.execPath, [join(root, 'bench', 'gpu', 'node-checks.mjs')], { cwd: root, encoding: 'utf8', env: { ...process.env, GPU_CHECKS_HOST: '1' }, timeout: 300_000 })
  t.is(r.status, 0, `${r.stdout.slice(-3000)}\n${r.stderr.slice(-2000)}`)
  t.regex(r.stdout, /^RESULT node_checks_failed 0$/m)
  t.regex(r.stdout, /^RESULT node_tensors [1-9][0-9]{2,}$/m)
})

test('the dtype option of device reads is validated; a valid cast without a GPU rejects with ERR_DISTCP_NO_CUDA', async (t) => {
  const ck = await openCheckpoint(example)
  const bad = { instanceOf: DistcpError, code: 'ERR_DISTCP_BAD_REQUEST' } as const
  const stored = ck.info(key)
  if (stored.kind !== 'tensor') throw new Error('the example key is a tensor')
  const n = stored.shape.reduce((a, b) => a * b, 1)
  // not a dtype name
  const e1 = await t.throwsAsync(ck.read(key, { device: 'cuda:0', dtype: 'float33' as 'float32' }), bad)
  t.regex(e1?.message ?? '', /float33/)
  // a dtype, but no cast to it exists (the rule is the native layer's, checked before any device work)
  const e2 = await t.throwsAsync(ck.read(key, { device: 'cuda:0', dtype: 'int64' }), bad)
  t.regex(e2?.message ?? '', /casts are between/)
  // the caller's memory must hold the box in the wanted dtype
  const e3 = await t.throwsAsync(
    ck.read(key, { into: { device: 'cuda:0', ptr: 1n << 40n, byteLength: n * 2 }, dtype: 'float64' }),
    bad,
  )
  t.regex(e3?.message ?? '', new RegExp(`holds ${n * 2} bytes, the float64 box`))
  // casts are a device-read option
  await t.throwsAsync(ck.read(key, { dtype: 'float32' } as never), bad)
  if (!gpu) {
    for (const dtype of ['float32', 'bfloat16', 'float16', 'float64', stored.dtype] as const) {
      await t.throwsAsync(ck.read(key, { device: 'cuda:0', dtype }), noCuda)
      await t.throwsAsync(ck.read(key, { device: 'cuda', dtype, offsets: [1, 2], sizes: [3, 4] }), noCuda)
    }
    await t.throwsAsync(ck.read(key, { into: { device: 'cuda:0', ptr: 1n << 40n, byteLength: n * 8 }, dtype: 'float64' }), noCuda)
  }
  ck.close()
})
