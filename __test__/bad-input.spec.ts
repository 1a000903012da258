import test from 'ava'
import { mkdtempSync, existsSync, truncateSync, statSync, renameSync, symlinkSync, unlinkSync, readFileSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

import { openCheckpoint, DistcpError } from '../src/index.js'
import { native } from '../src/native.js'
import { callNative } from '../src/errors.js'
import { badInputs, rejectsWith } from './helpers.js'

interface Variant {
  ckpt: string
  key: string | null
  marker?: string
  relative_path?: string
}

const { out, manifest, copyOfBase } = badInputs<Variant>('distcp-bad-')

async function readEverything(path: string): Promise<void> {
  const ck = await openCheckpoint(path)
  for (const k of ck.keys()) {
    if (ck.info(k).kind === 'tensor') await ck.read(k)
    else await ck.readObject(k)
  }
}


test('the untouched base checkpoint reads', async (t) => {
  await t.notThrowsAsync(readEverything(manifest.base.ckpt))
})

test('truncated .metadata', async (t) => {
  const ck = copyOfBase('truncated-metadata')
  const md = join(ck, '.metadata')
  truncateSync(md, Math.floor(statSync(md).size / 2))
  await rejectsWith(t, openCheckpoint(ck), 'ERR_DISTCP_PICKLE', md, 'truncated')
})

test('truncated .distcp: the last record runs past the end of the file', async (t) => {
  const ck = copyOfBase('truncated-distcp')
  const f = join(ck, '__0_0.distcp')
  truncateSync(f, statSync(f).size - 100)
  await rejectsWith(t, readEverything(ck), 'ERR_DISTCP_OUT_OF_BOUNDS', f, 'key `w`')
})

test('an offset past the end of the data file', async (t) => {
  const ck = copyOfBase('offset-past-end')
  const f = join(ck, '__0_0.distcp')
  truncateSync(f, 10)
  const e = await t.throwsAsync(readEverything(ck), { instanceOf: DistcpError })
  t.is(e?.code, 'ERR_DISTCP_OUT_OF_BOUNDS')
  t.regex(e?.message ?? '', /__0_0\.distcp: key `\w+`: bytes \d+\.\.\d+ lie past the end of the file \(10 bytes\)/)
})

test('a corrupt record (zip end record overwritten) is an error naming file and key', async (t) => {
  const ck = copyOfBase('corrupt-record')
  const f = join(ck, '__0_0.distcp')
  const bytes = readFileSync(f)
  // wipe every end-of-central-directory signature: no archive in the file can be located any more
  for (let i = 0; i + 4 <= bytes.length; i++) {
    if (bytes[i] === 0x50 && bytes[i + 1] === 0x4b && bytes[i + 2] === 0x05 && bytes[i + 3] === 0x06) bytes.fill(0, i, i + 4)
  }
  writeFileSync(f, bytes)
  await rejectsWith(t, readEverything(ck), 'ERR_DISTCP_RECORD', f, 'not a valid torch.save archive')
})

for (const name of ['hostile-os-system', 'hostile-eval', 'hostile-popen']) {
  test(`hostile pickle (${name}) is refused, naming the global, and runs nothing`, async (t) => {
    const v = manifest[name]
    const global = { 'hostile-os-system': 'posix.system', 'hostile-eval': 'builtins.eval', 'hostile-popen': 'subprocess.Popen' }[name]!
    await rejectsWith(t, openCheckpoint(v.ckpt), 'ERR_DISTCP_FORBIDDEN_GLOBAL', `\`${global}\``, '.metadata')
    t.false(existsSync(v.marker!), 'the payload must never run')
  })
}

test('relative_path with `..` is refused', async (t) => {
  const v = manifest['escape-dotdot']
  await rejectsWith(t, openCheckpoint(v.ckpt), 'ERR_DISTCP_UNSAFE_PATH', '../outside.distcp', 'key `w`')
})

test('an absolute relative_path is refused', async (t) => {
  const v = manifest['escape-absolute']
  await rejectsWith(t, openCheckpoint(v.ckpt), 'ERR_DISTCP_UNSAFE_PATH', v.relative_path!, 'key `w`')
})

test('a data file that is a symlink out of the checkpoint is refused', async (t) => {
  const ck = copyOfBase('escape-link')
  const outside = join(out, 'copies', 'outside.distcp')
  renameSync(join(ck, '__0_0.distcp'), outside)
  symlinkSync(outside, join(ck, '__0_0.distcp'))
  await rejectsWith(t, readEverything(ck), 'ERR_DISTCP_UNSAFE_PATH', '__0_0.distcp')
})

test('a compressed zip entry where torch stores is refused', async (t) => {
  const v = manifest['compressed-entry']
  const ck = await openCheckpoint(v.ckpt)
  await rejectsWith(t, ck.read('w'), 'ERR_DISTCP_COMPRESSED_ENTRY', '__0_0.distcp', 'key `w`', 'archive/data/0')
})

test('a record whose size disagrees with shape × dtype', async (t) => {
  const v = manifest['size-mismatch']
  const ck = await openCheckpoint(v.ckpt)
  await rejectsWith(t, ck.read('w'), 'ERR_DISTCP_RECORD', '__0_0.distcp', 'key `w`', 'holds 20 bytes', 'declares 24')
})

test('a record whose shape disagrees with .metadata', async (t) => {
  const v = manifest['shape-disagrees']
  const ck = await openCheckpoint(v.ckpt)
  await rejectsWith(t, ck.read('w'), 'ERR_DISTCP_RECORD', 'key `w`', '[2, 3]', '[3, 3]')
})

test('a missing data file', async (t) => {
  const ck = copyOfBase('missing-file')
  unlinkSync(join(ck, '__0_0.distcp'))
  await rejectsWith(t, readEverything(ck), 'ERR_DISTCP_MISSING_DATA_FILE', '__0_0.distcp', ck)
})

test('a path with no checkpoint', async (t) => {
  const empty = mkdtempSync(join(tmpdir(), 'distcp-empty-'))
  await rejectsWith(t, openCheckpoint(empty), 'ERR_DISTCP_NO_CHECKPOINT', empty, '.metadata')
  await rejectsWith(t, openCheckpoint(join(empty, 'nope')), 'ERR_DISTCP_NO_CHECKPOINT', 'nope')
})

test('a tensor larger than a Node buffer is a clear error, not a crash', async (t) => {
  const v = manifest['huge-tensor']
  const ck = await openCheckpoint(v.ckpt)
  await rejectsWith(t, ck.read('w'), 'ERR_DISTCP_BAD_REQUEST', 'key `w`', 'more than one Node buffer', v.ckpt)
})

test('a box outside the tensor is refused', async (t) => {
  const ck = await openCheckpoint(manifest.base.ckpt)
  await rejectsWith(t, ck.read('w', { offsets: [1, 0], sizes: [2, 3] }), 'ERR_DISTCP_BAD_REQUEST', 'key `w`', 'exceeds')
  await rejectsWith(t, ck.read('w', { into: new Uint8Array(5) }), 'ERR_DISTCP_BAD_REQUEST', 'key `w`', 'needs 24')
  await rejectsWith(t, ck.read('nope'), 'ERR_DISTCP_NO_SUCH_KEY', 'nope')
  await rejectsWith(t, ck.readObject('w'), 'ERR_DISTCP_BAD_REQUEST', 'is a tensor')
})

test('a Rust panic becomes a JS error (sync and on a worker thread), never an abort', async (t) => {
  // without catch_unwind / the worker guard, either call would abort this process
  t.throws(() => native.panicForTest('sync'), { message: /panic/ })
  t.throws(() => callNative(() => native.panicForTest('sync')), { instanceOf: DistcpError, code: 'ERR_DISTCP_INTERNAL', message: /deliberate panic/ })
  // the code is set natively on the error object (no "[CODE] message" string to parse)
  await t.throwsAsync(async () => await native.panicForTest('async'), { code: 'ERR_DISTCP_INTERNAL', message: /^internal error \(a bug in distcp\): deliberate panic/ })
})

test('native errors carry their ERR_DISTCP_* code as `code`, set in Rust (sync and async), with a plain message', async (t) => {
  const sync = t.throws(() => native.retargetCheckpoint('/nonexistent', 'two', true))
  t.is((sync as { code?: unknown } | undefined)?.code, 'ERR_DISTCP_BAD_REQUEST')
  t.regex(sync?.message ?? '', /^torch: expected a version like 2\.13/)
  const missing = join(mkdtempSync(join(tmpdir(), 'distcp-codes-')), 'none')
  const async_ = await t.throwsAsync(native.openNativeCheckpoint(missing))
  t.is((async_ as { code?: unknown } | undefined)?.code, 'ERR_DISTCP_NO_CHECKPOINT')
  t.true(async_?.message.startsWith(missing), async_?.message)
})
