import test from 'ava'
import { cpSync, mkdtempSync, readFileSync, rmSync } from 'node:fs'
import { spawnSync } from 'node:child_process'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

import { openCheckpoint, retarget, save } from '../src/index.js'
import { checkFixture, readSafetensors, root } from './helpers.js'

// `retarget`: torch 2.15 pickles TensorProperties as 6 values and torch ≤ 2.14 cannot unpickle them. distcp
// rewrites only .metadata (what its writer emits: every torch from 2.0 on loads it). With DISTCP_PYTHON_OLD_TORCH
// (a python with an older torch, e.g. 2.13), that torch is shown to fail on the original and to load the
// retargeted checkpoint with the values torch 2.15 saved.

const work = mkdtempSync(join(tmpdir(), 'distcp-retarget-'))
test.after.always(() => {
  if (!process.env.DISTCP_KEEP_TMP) rmSync(work, { recursive: true, force: true })
})
const fixture = join(root, 'fixtures', 'torch-2.15.0', 'dtensor-2rank')

function copyFixture(tag: string): string {
  const dir = join(work, tag)
  cpSync(fixture, dir, { recursive: true })
  return dir
}

test('a torch 2.15 checkpoint is rewritten for 2.13: .metadata only, the original kept, every value as before', async (t) => {
  const dir = copyFixture('rewrite')
  const ckpt = join(dir, 'ckpt')
  const before = await openCheckpoint(ckpt)
  t.is(before.summary().oldestTorch, '2.15')
  before.close()
  const original = readFileSync(join(ckpt, '.metadata'))
  const data = readFileSync(join(ckpt, '__1_0.distcp'))
  const r = retarget(ckpt, { torch: '2.13' })
  t.like(r, { before: '2.15', after: '2.0', rewritten: true, original: join(ckpt, '.metadata.orig') })
  t.true(readFileSync(join(ckpt, '.metadata.orig')).equals(original))
  t.true(readFileSync(join(ckpt, '__1_0.distcp')).equals(data), 'data files untouched')
  await checkFixture(t, dir)
  t.like(retarget(ckpt, { torch: '2.13' }), { rewritten: false })
  // .metadata.orig is never replaced
  const again = copyFixture('orig-exists')
  cpSync(join(again, 'ckpt', '.metadata'), join(again, 'ckpt', '.metadata.orig'))
  t.throws(() => retarget(join(again, 'ckpt'), { torch: '2.13' }), { code: 'ERR_DISTCP_IO' } as never)
  t.true(readFileSync(join(again, 'ckpt', '.metadata')).equals(original), 'nothing changed')
})

test('what distcp saves loads on every torch from 2.0 on (no retarget needed)', async (t) => {
  const dir = join(work, 'saved')
  await save({ w: { dtype: 'float32', shape: [2], data: new Uint8Array(8) }, step: 3 }, { checkpointId: dir })
  const ck = await openCheckpoint(dir)
  t.is(ck.summary().oldestTorch, '2.0')
  ck.close()
})

const old = process.env.DISTCP_PYTHON_OLD_TORCH
;(old || process.env.CI ? test : test.skip)('an older torch (DISTCP_PYTHON_OLD_TORCH) fails on the 2.15 checkpoint and loads the retargeted one with the same values', (t) => {
  // npm test always sets it (scripts/test.mjs makes .venv-tch with torch 2.13); only a bare `npx ava` may skip
  if (!old) return t.fail('DISTCP_PYTHON_OLD_TORCH is not set')
  const run = (ckpt: string, out: string) => {
    const r = spawnSync(old as string, ['interop/load_with_torch.py', ckpt, out], { cwd: root, encoding: 'utf8', timeout: 600_000 })
    t.is(r.status, 0, r.stderr)
    return JSON.parse(r.stdout) as { torch_version: string; methods: Record<string, string> }
  }
  const dir = copyFixture('old-torch')
  const ckpt = join(dir, 'ckpt')
  const failing = run(ckpt, join(work, 'old-before'))
  t.false(failing.torch_version.startsWith('2.15'), failing.torch_version)
  t.not(failing.methods.dcp_load, 'ok', 'the older torch cannot load what 2.15 wrote')
  retarget(ckpt, { torch: failing.torch_version })
  const loaded = run(ckpt, join(work, 'old-after'))
  t.is(loaded.methods.dcp_load, 'ok')
  const want = readSafetensors(join(fixture, 'expected.safetensors'))
  const got = readSafetensors(join(work, 'old-after', 'dcp_load', 'expected.safetensors'))
  t.deepEqual([...got.keys()].sort(), [...want.keys()].sort())
  for (const [k, v] of want) t.true(Buffer.from(got.get(k) ?? []).equals(Buffer.from(v)), k)
})
