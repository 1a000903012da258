import test from 'ava'
import { mkdtempSync, readdirSync, readFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

import { save, openCheckpoint, DistcpError, typedArray } from '../src/index.js'
import { mountTmpfs, remountReadOnly } from './mounts.js'

const f32 = (values: number[]) => ({ dtype: 'float32' as const, shape: [values.length], data: new Uint8Array(new Float32Array(values).buffer) })

async function readW(path: string): Promise<number[]> {
  const ck = await openCheckpoint(path)
  const t = await ck.read('w')
  ck.close()
  return [...typedArray(t as typeof t & { dtype: 'float32' })]
}

test('disk full: the save fails with an error naming the file, the old checkpoint stays loadable and alone', async (t) => {
  const dir = join(mkdtempSync(join(tmpdir(), 'distcp-full-')), 'mnt')
  const m = mountTmpfs(dir, 256 * 1024)
  if ('reason' in m) {
    t.log(`NOT TESTED: ${m.reason}`)
    t.pass()
    return
  }
  try {
    const ck = join(dir, 'ckpt')
    await save({ w: f32([1, 2, 3]), step: 1 }, { checkpointId: ck })
    const before = readdirSync(ck).sort()
    const big = { dtype: 'float32' as const, shape: [128 * 1024], data: new Uint8Array(512 * 1024) }
    const e = await t.throwsAsync(save({ w: big, step: 2 }, { checkpointId: ck }), { instanceOf: DistcpError })
    t.is(e?.code, 'ERR_DISTCP_IO', e?.message)
    t.regex(e?.message ?? '', /No space left on device/)
    t.regex(e?.message ?? '', /ckpt/)
    t.deepEqual(readdirSync(ck).sort(), before, 'no temporary file left behind')
    t.deepEqual(await readW(ck), [1, 2, 3])
  } finally {
    m.unmount()
  }
})

test('no write permission: the save fails clearly and the old checkpoint is untouched', async (t) => {
  const dir = join(mkdtempSync(join(tmpdir(), 'distcp-ro-')), 'mnt')
  const m = mountTmpfs(dir, 1024 * 1024)
  if ('reason' in m) {
    t.log(`NOT TESTED: ${m.reason}`)
    t.pass()
    return
  }
  try {
    const ck = join(dir, 'ckpt')
    await save({ w: f32([4, 5]) }, { checkpointId: ck })
    const metadata = readFileSync(join(ck, '.metadata'))
    // root ignores chmod, so the whole file system goes read-only instead
    t.true(remountReadOnly(dir))
    const e = await t.throwsAsync(save({ w: f32([6, 7]) }, { checkpointId: ck }), { instanceOf: DistcpError })
    t.is(e?.code, 'ERR_DISTCP_IO', e?.message)
    t.regex(e?.message ?? '', /Read-only file system/)
    t.deepEqual(readFileSync(join(ck, '.metadata')), metadata)
    t.deepEqual(await readW(ck), [4, 5])
  } finally {
    m.unmount()
  }
})
