import test from 'ava'
import { spawnSync } from 'node:child_process'
import { existsSync, mkdirSync, mkdtempSync, readdirSync, statSync, truncateSync, unlinkSync, writeFileSync, promises as fsp } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

import { convertDcpToHf, openCheckpoint, DistcpError, type Checkpoint } from '../src/index.js'
import { badInputs, rejectsWith } from './helpers.js'

// Hostile and changing inputs: every case must end in a coded DistcpError, quickly, with the process alive.
interface Variant {
  ckpt: string
  key: string | null
  compressed_bytes?: number
}

const { out, manifest, copyOfBase } = badInputs<Variant>('distcp-hard-')


function mkfifo(path: string): void {
  const r = spawnSync('mkfifo', [path])
  if (r.status !== 0) throw new Error(`mkfifo ${path}: ${r.stderr}`)
}

/** Settles within `ms`, or fails: a hung read would otherwise hang the test run. */
function within<T>(p: Promise<T>, ms: number): Promise<T> {
  return Promise.race([p, new Promise<T>((_, reject) => setTimeout(() => reject(new Error(`did not settle within ${ms} ms`)), ms))])
}

test('a data file truncated under an open checkpoint: a coded error, not SIGBUS', async (t) => {
  const ck = await openCheckpoint(copyOfBase('truncated-while-open'))
  const before = await ck.read('w')
  t.is(before.data.byteLength, 24)
  const f = join(ck.path, '__0_0.distcp')
  truncateSync(f, 0)
  // the chunk is resolved (cached) already: the read goes to the file and finds it short
  await rejectsWith(t, ck.read('w'), 'ERR_DISTCP_SHORT_READ', f, 'key `w`', '24 bytes')
  await rejectsWith(t, ck.read('w', { into: new Uint8Array(24) }), 'ERR_DISTCP_SHORT_READ', f)
  // buffers handed out before stay readable
  t.is(new Float32Array(before.data.buffer, before.data.byteOffset, 6)[5], 5)
  ck.close()
})

test('a data file that is a FIFO is refused within a second, and the thread pool stays free', async (t) => {
  const dir = copyOfBase('fifo-data')
  const f = join(dir, '__0_0.distcp')
  unlinkSync(f)
  mkfifo(f)
  const ck = await openCheckpoint(dir)
  const t0 = Date.now()
  await rejectsWith(t, within(ck.read('w'), 1000), 'ERR_DISTCP_NOT_A_FILE', f, 'FIFO')
  await rejectsWith(t, within(ck.readObject('n'), 1000), 'ERR_DISTCP_NOT_A_FILE', f)
  t.true(Date.now() - t0 < 1000)
  // libuv's pool is not starved: fs.promises calls still settle
  await t.notThrowsAsync(within(Promise.all([1, 2, 3, 4, 5].map(() => fsp.stat(dir))), 1000))
  ck.close()
})

test('a .metadata that is a FIFO is refused by name within a second', async (t) => {
  const dir = copyOfBase('fifo-metadata')
  const md = join(dir, '.metadata')
  unlinkSync(md)
  mkfifo(md)
  await rejectsWith(t, within(openCheckpoint(dir), 1000), 'ERR_DISTCP_NOT_A_FILE', md)
})

test('a huge (sparse) .metadata is refused by size, without reading it', async (t) => {
  const dir = copyOfBase('huge-metadata')
  const md = join(dir, '.metadata')
  truncateSync(md, 3 * 2 ** 30)
  const rss0 = process.memoryUsage().rss
  await rejectsWith(t, openCheckpoint(dir), 'ERR_DISTCP_LIMIT_EXCEEDED', md, 'MAX_METADATA_BYTES')
  t.true(process.memoryUsage().rss - rss0 < 256 * 2 ** 20, 'the file was not read into memory')
})

test('a .metadata of 8 MB of EMPTY_LIST opcodes stops at the unpickling memory budget', async (t) => {
  const dir = copyOfBase('list-flood')
  const md = join(dir, '.metadata')
  const body = Buffer.alloc(8 * 2 ** 20, ']'.charCodeAt(0))
  writeFileSync(md, Buffer.concat([Buffer.from([0x80, 0x02]), body, Buffer.from('.')]))
  await rejectsWith(t, openCheckpoint(dir), 'ERR_DISTCP_PICKLE', md, 'expands past')
  t.true(statSync(md).size > 8e6)
})

test('an element count that overflows 64 bits is refused by read and by convert', async (t) => {
  const v = manifest['numel-overflow']
  await rejectsWith(t, openCheckpoint(v.ckpt), 'ERR_DISTCP_SIZE_OVERFLOW', 'key `w`', '6148914691236517206')
  const parent = mkdtempSync(join(tmpdir(), 'distcp-hard-convert-'))
  const model = join(parent, 'model')
  mkdirSync(model)
  writeFileSync(join(model, 'config.json'), JSON.stringify({ architectures: ['LlamaForCausalLM'], model_type: 'llama' }))
  const dst = join(parent, 'hf')
  await rejectsWith(t, convertDcpToHf(v.ckpt, dst, model), 'ERR_DISTCP_SIZE_OVERFLOW', 'key `w`')
  t.false(existsSync(dst))
  t.deepEqual(readdirSync(parent), ['model'], 'no temporary folder is left behind')
})

test('a stride-0 tensor of 2^40 elements inside a value is refused before allocating it', async (t) => {
  const v = manifest['stride0-object']
  const ck = await openCheckpoint(v.ckpt)
  await rejectsWith(t, ck.readObject('n'), 'ERR_DISTCP_LIMIT_EXCEEDED', 'key `n`', '1099511627776', 'MAX_OBJECT_BYTES')
  await rejectsWith(t, ck.readAll(), 'ERR_DISTCP_LIMIT_EXCEEDED', 'key `n`')
  // the tensor next to it still reads
  t.is((await ck.read('w')).data.byteLength, 24)
})

test('a zstd bomb stops decompressing at the size .metadata implies', async (t) => {
  const v = manifest['zstd-bomb']
  t.true(v.compressed_bytes! < 64 * 1024, `the bomb is small (${v.compressed_bytes} bytes)`)
  const ck = await openCheckpoint(v.ckpt)
  const rss0 = process.memoryUsage().rss
  await rejectsWith(t, ck.read('w'), 'ERR_DISTCP_DECOMPRESS', 'key `w`', 'decompresses to more than')
  t.true(process.memoryUsage().rss - rss0 < 128 * 2 ** 20, 'decompression stopped at its bound')
})

test('wrong argument types are coded errors naming the argument', async (t) => {
  const ck: Checkpoint = await openCheckpoint(manifest.base.ckpt)
  const bad = ck as unknown as Record<string, (...a: unknown[]) => unknown>
  t.throws(() => bad.info.call(ck, 42), { instanceOf: DistcpError, code: 'ERR_DISTCP_BAD_REQUEST', message: /`key`/ })
  await rejectsWith(t, Promise.resolve().then(() => bad.read.call(ck, 7)), 'ERR_DISTCP_BAD_REQUEST', '`key`')
  await rejectsWith(t, Promise.resolve().then(() => bad.read.call(ck, 'w', { offsets: 'x' })), 'ERR_DISTCP_BAD_REQUEST', '`offsets`')
  await rejectsWith(t, Promise.resolve().then(() => bad.read.call(ck, 'w', { sizes: [1, -1] })), 'ERR_DISTCP_BAD_REQUEST', '`sizes`')
  await rejectsWith(t, Promise.resolve().then(() => bad.read.call(ck, 'w', { into: [1, 2] })), 'ERR_DISTCP_BAD_REQUEST', '`into`')
  await rejectsWith(t, Promise.resolve().then(() => bad.read.call(ck, 'w', 5)), 'ERR_DISTCP_BAD_REQUEST', '`options`')
  await rejectsWith(t, Promise.resolve().then(() => bad.readObject.call(ck, null)), 'ERR_DISTCP_BAD_REQUEST', '`key`')
  await rejectsWith(t, Promise.resolve().then(() => bad.readObject.call(ck, 'n', { exact: 'yes' })), 'ERR_DISTCP_BAD_REQUEST', '`exact`')
  await rejectsWith(t, openCheckpoint(5 as unknown as string), 'ERR_DISTCP_BAD_REQUEST', '`path`')
  await rejectsWith(t, openCheckpoint(manifest.base.ckpt, { rank: -1 }), 'ERR_DISTCP_BAD_REQUEST', '`rank`')
  ck.close()
})
