import test from 'ava'
import { mkdtempSync, readFileSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { setFlagsFromString } from 'node:v8'
import { runInNewContext } from 'node:vm'
import { join } from 'node:path'

import { openCheckpoint, save, typedArray, DistcpError, type Tensor } from '../src/index.js'
import { root } from './helpers.js'

const example = join(root, 'examples', 'tiny-llama', 'dcp')
const key = 'model.model.embed_tokens.weight' // one plain float32 chunk: served zero-copy from the mapped file

test('a zero-copy tensor is private: writing to it changes neither the file nor later reads', async (t) => {
  const ck = await openCheckpoint(example)
  const before = readFileSync(join(example, '__0_0.distcp'))
  const a = await ck.read(key)
  const b = await ck.read(key)
  t.deepEqual(Buffer.from(a.data), Buffer.from(b.data))
  const original = a.data[0]
  a.data[0] ^= 0xff
  t.not(a.data[0], original)
  t.is(b.data[0], original)
  t.is((await ck.read(key)).data[0], original)
  t.deepEqual(readFileSync(join(example, '__0_0.distcp')), before)
  ck.close()
})

test('many reads and garbage collection of mapped buffers do not crash', async (t) => {
  const ck = await openCheckpoint(example)
  let sum = 0
  for (let i = 0; i < 300; i++) sum += (await ck.read(key)).data.byteLength
  t.is(sum, 300 * 320 * 64 * 4)
  ck.close()
  // buffers handed out stay valid after close
  const again = await openCheckpoint(example)
  const kept = await again.read(key)
  again.close()
  t.is(typedArray(kept as Tensor & { dtype: 'float32' }).length, 320 * 64)
})

test('a closed checkpoint refuses reads with a clear error', async (t) => {
  const ck = await openCheckpoint(example)
  ck.close()
  const e = t.throws(() => ck.keys(), { instanceOf: DistcpError })
  t.is(e?.code, 'ERR_DISTCP_BAD_REQUEST')
  t.regex(e?.message ?? '', /closed/)
})

test('typedArray picks the array type torch users expect', (t) => {
  const bytes = (n: number) => new Uint8Array(n)
  t.true(typedArray({ dtype: 'float32', shape: [2], data: bytes(8) }) instanceof Float32Array)
  t.true(typedArray({ dtype: 'float64', shape: [2], data: bytes(16) }) instanceof Float64Array)
  t.true(typedArray({ dtype: 'int64', shape: [2], data: bytes(16) }) instanceof BigInt64Array)
  t.true(typedArray({ dtype: 'bfloat16', shape: [2], data: bytes(4) }) instanceof Uint16Array)
  t.true(typedArray({ dtype: 'float16', shape: [2], data: bytes(4) }) instanceof Uint16Array)
  t.true(typedArray({ dtype: 'bool', shape: [2], data: bytes(2) }) instanceof Uint8Array)
  t.true(typedArray({ dtype: 'int8', shape: [2], data: bytes(2) }) instanceof Int8Array)
  const c = typedArray({ dtype: 'complex64', shape: [2], data: bytes(16) })
  t.true(c instanceof Float32Array)
  t.is(c.length, 4) // interleaved (re, im)
  // an unaligned view is copied rather than misread
  const unaligned = new Uint8Array(new ArrayBuffer(9), 1, 8)
  unaligned.set([0, 0, 128, 63, 0, 0, 0, 64])
  t.deepEqual([...typedArray({ dtype: 'float32', shape: [2], data: unaligned })], [1, 2])
})

// Results of 1 MiB and more get their own prefaulted anonymous mapping, handed to JS as an external buffer that
// unmaps it when collected (the binding's ReadTask); the tiny fixtures never take that path.
const rows = 1536
const cols = 1024 // float32: 6 MiB
function bigSource(): Float32Array {
  const v = new Float32Array(rows * cols)
  for (let i = 0; i < v.length; i++) v[i] = i * 0.5 - 1000
  return v
}

/** Rows [r0, r0 + nr) and columns [c0, c0 + nc) of the source, row-major, as bytes. */
function sourceBox(src: Float32Array, r0: number, c0: number, nr: number, nc: number): Buffer {
  const out = new Float32Array(nr * nc)
  for (let r = 0; r < nr; r++) out.set(src.subarray((r0 + r) * cols + c0, (r0 + r) * cols + c0 + nc), r * nc)
  return Buffer.from(out.buffer)
}

test('reads into new memory of several MiB: the whole tensor and boxes hold the saved values', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'distcp-read-big-'))
  const src = bigSource()
  await save({ w: { dtype: 'float32', shape: [rows, cols], data: new Uint8Array(src.buffer) } }, { checkpointId: join(dir, 'ck') })
  const ck = await openCheckpoint(join(dir, 'ck'))
  const whole = await ck.read('w')
  t.deepEqual(whole.shape, [rows, cols])
  t.true(Buffer.from(whole.data).equals(Buffer.from(src.buffer)))
  // whole rows (one contiguous range of the file), a strided box, and a box at the far corner
  for (const [r0, c0, nr, nc] of [
    [100, 0, 512, cols],
    [7, 3, 1200, 700],
    [rows - 600, cols - 513, 600, 513],
  ]) {
    const box = await ck.read('w', { offsets: [r0, c0], sizes: [nr, nc] })
    t.deepEqual(box.shape, [nr, nc])
    t.true(box.data.byteLength >= 1 << 20, 'large enough for the anonymous-mapping path')
    t.true(Buffer.from(box.data).equals(sourceBox(src, r0, c0, nr, nc)), `box at ${r0},${c0} of ${nr}×${nc}`)
    // the same box read into caller memory: the other path, the same bytes
    const into = new Uint8Array(nr * nc * 4)
    await ck.read('w', { offsets: [r0, c0], sizes: [nr, nc], into })
    t.true(Buffer.from(into).equals(Buffer.from(box.data)))
  }
  ck.close()
  // buffers handed out outlive the checkpoint handle and stay writable
  whole.data[0] ^= 0xff
  t.not(whole.data[0], Buffer.from(src.buffer)[0])
  rmSync(dir, { recursive: true, force: true })
})

// a full garbage collection on demand (ava starts no worker with --expose-gc): the flag, then V8's gc() from a
// fresh context
setFlagsFromString('--expose-gc')
const gc = runInNewContext('gc') as () => void

// serial: the file's other tests, running concurrently on this event loop, allocate and free external memory
// during the read and move the count this test measures (a loaded CI run saw it grow by 4.8 of 6 MiB)
test.serial('read buffers are reported to V8 as external memory and given back when collected', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'distcp-read-gc-'))
  const src = bigSource()
  await save({ w: { dtype: 'float32', shape: [rows, cols], data: new Uint8Array(src.buffer) } }, { checkpointId: join(dir, 'ck') })
  const ck = await openCheckpoint(join(dir, 'ck'))
  const nbytes = rows * cols * 4
  // a full collection first, until the count is still (Node runs external buffers' finalizers on a later turn of
  // the event loop): garbage from earlier tests freed during the read would hide the buffer's share
  for (let i = 0, last = -1; i < 20 && process.memoryUsage().external !== last; i++) {
    last = process.memoryUsage().external
    gc()
    await new Promise((r) => setTimeout(r, 10))
  }
  const before = process.memoryUsage().external
  let held: { data: Uint8Array } | undefined = await ck.read('w')
  // V8 counts the mapping, so allocation pressure from many reads triggers collections that unmap old results
  const holding = process.memoryUsage().external
  // at least half: the count is the process's, and Node's own external memory moves by up to ~1.2 MB meanwhile
  // (measured here and in CI; an uncounted buffer would leave it near 0)
  t.true(holding - before >= nbytes / 2, `external memory grew by the buffer (${holding - before} of ${nbytes})`)
  t.is(held.data.byteLength, nbytes)
  held = undefined
  // collecting it gives the memory back; Node runs an external buffer's finalizer after the collection, on a
  // later turn of the event loop
  for (let i = 0; i < 50 && holding - process.memoryUsage().external < nbytes; i++) {
    gc()
    await new Promise((r) => setTimeout(r, 10))
  }
  t.true(holding - process.memoryUsage().external >= nbytes / 2, 'the collected buffer left the external memory count')
  const base = process.memoryUsage().rss
  let peak = base
  const reads = 200 // 1.2 GB in all, more than the bound below
  for (let i = 0; i < reads; i++) {
    const r = await ck.read('w')
    t.is(r.data.byteLength, nbytes)
    peak = Math.max(peak, process.memoryUsage().rss)
  }
  ck.close()
  // generous: a leak would hold all 1.2 GB
  t.true(peak - base < 600 * 2 ** 20, `peak RSS grew by ${((peak - base) / 2 ** 20).toFixed(0)} MiB over ${reads} reads of 6 MiB`)
  rmSync(dir, { recursive: true, force: true })
})
