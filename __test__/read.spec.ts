import test from 'ava'
import { readFileSync } from 'node:fs'
import { join } from 'node:path'

import { openCheckpoint, typedArray, DistcpError, type Tensor } from '../src/index.js'
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
