import test from 'ava'
import { execFile, spawnSync } from 'node:child_process'
import { existsSync, mkdirSync, mkdtempSync, readdirSync, statSync, truncateSync, unlinkSync, writeFileSync, promises as fsp } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { promisify } from 'node:util'

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

/** Opens `dir` in a fresh Node process; its error code and message, and the process's peak RSS. */
async function openInChild(dir: string): Promise<{ code?: string; message?: string; maxRssBytes: number }> {
  const index = new URL('../dist/index.js', import.meta.url).href
  const script = `import(${JSON.stringify(index)}).then(async (m) => {
    let code, message
    try { await m.openCheckpoint(${JSON.stringify(dir)}) } catch (e) { code = e.code; message = e.message }
    console.log(JSON.stringify({ code, message, maxRssBytes: process.resourceUsage().maxRSS * 1024 }))
  })`
  // asynchronously: a blocked event loop would starve this file's timing-sensitive tests
  const { stdout } = await promisify(execFile)(process.execPath, ['--input-type=module', '-e', script], { encoding: 'utf8' })
  return JSON.parse(stdout.trim().split('\n').pop() ?? '{}')
}

test('floods of one opcode in .metadata end in a coded error within the unpickling memory budget', async (t) => {
  // the baseline: a process that opens a real checkpoint
  const base = (await openInChild(copyOfBase('list-flood-baseline'))).maxRssBytes
  const n = 8 * 2 ** 20
  const floods: Record<string, Buffer> = {
    // 8 M empty lists: 20 bytes of VM per byte; gathered into one list, 28 bytes per byte once materialised
    'empty lists': Buffer.concat([Buffer.from([0x80, 0x02, 0x28]), Buffer.alloc(n, ']'.charCodeAt(0)), Buffer.from('l.')]),
    // 4 M small ints gathered into one list
    'small ints': Buffer.concat([Buffer.from([0x80, 0x02, 0x28]), Buffer.from('K\x00'.repeat(n / 2), 'latin1'), Buffer.from('l.')]),
  }
  for (const [name, bytes] of Object.entries(floods)) {
    const dir = copyOfBase(`flood-${name.replace(' ', '-')}`)
    const md = join(dir, '.metadata')
    writeFileSync(md, bytes)
    const r = await openInChild(dir)
    t.regex(r.code ?? '', /^ERR_DISTCP_(PICKLE|METADATA)$/, `${name}: ${r.code} ${r.message}`)
    t.true(r.message?.includes(md), `${name}: the error names the file: ${r.message}`)
    // limits::UNPICKLE_BYTES_PER_INPUT_BYTE (32) per byte, plus 64 MiB for the allocator's and V8's slack
    const grew = r.maxRssBytes - base
    t.true(grew < 32 * bytes.length + 64 * 2 ** 20, `${name}: peak RSS grew by ${grew} bytes for ${bytes.length} bytes of pickle`)
  }
})

test('a .metadata built to expand through shared references is refused without materialising them', async (t) => {
  // one 64 KiB string, then a list of 20 000 memo references to it: 1.3 GB if each were materialised. The typed
  // reader reads the unpickled stream in place (references are followed, never copied), so this one is refused for
  // not being a Metadata; a Metadata whose entries share references (4e8 chunks from 240 KB) stops at the unpickling
  // budget with ERR_DISTCP_PICKLE, "expands" (metadata.rs, shared_references_that_expand_stop_at_the_budget)
  const dir = copyOfBase('shared-refs')
  const md = join(dir, '.metadata')
  const len = Buffer.alloc(4)
  len.writeUInt32LE(64 * 1024)
  writeFileSync(
    md,
    Buffer.concat([
      Buffer.from([0x80, 0x02, ']'.charCodeAt(0), 'q'.charCodeAt(0), 0, 'X'.charCodeAt(0)]),
      len,
      Buffer.alloc(64 * 1024, 'a'.charCodeAt(0)),
      Buffer.from('q\x010(', 'latin1'),
      Buffer.from('h\x01'.repeat(20000), 'latin1'),
      Buffer.from('e.'),
    ]),
  )
  await rejectsWith(t, openCheckpoint(dir), 'ERR_DISTCP_METADATA', md, 'expected a Metadata, found a list')
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
