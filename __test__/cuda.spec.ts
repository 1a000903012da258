import test from 'ava'
import { join } from 'node:path'

import { openCheckpoint, cudaInfo, DeviceTensor, DistcpError } from '../src/index.js'
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
