import test, { type ExecutionContext } from 'ava'
import { cpSync, mkdtempSync, readFileSync, rmSync } from 'node:fs'
import { spawnSync } from 'node:child_process'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

import { openCheckpoint, retarget, save } from '../src/index.js'
import { checkFixture, readSafetensors, root, runPython } from './helpers.js'

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
  t.deepEqual(r.files, [join(ckpt, '.metadata')])
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

// Rank-local metadata: torch's dcp.save(use_collectives=False) writes __{rank}.metadata per rank and no .metadata
// (dcp.load falls back to the rank's own file). Torch 2.15 writes a 2-rank one at test time (interop/rank_local.py);
// retarget rewrites both files, distcp reads each rank's values as torch saved them, and torch loads the result:
// torch 2.15 always, and with DISTCP_PYTHON_OLD_TORCH that older torch, which fails on the original.
const RANKS = 2
function rankLocalCheckpoint(tag: string): { dir: string; ckpt: string } {
  const dir = join(work, tag)
  const saved = JSON.parse(runPython(['interop/rank_local.py', 'save', dir, String(RANKS)])) as { ranks: Record<string, string> }
  for (let r = 0; r < RANKS; r++) if (saved.ranks[r] !== 'ok') throw new Error(`torch could not save rank ${r}: ${saved.ranks[r]}`)
  return { dir, ckpt: join(dir, 'ckpt') }
}

async function checkRanks(t: ExecutionContext, ckpt: string, expectedDir: string, prefix: string): Promise<void> {
  for (let r = 0; r < RANKS; r++) {
    const want = readSafetensors(join(expectedDir, `${prefix}${r}.safetensors`))
    const ck = await openCheckpoint(ckpt, { rank: r })
    t.deepEqual([...ck.keys()].sort(), [...want.keys()].sort())
    for (const [k, v] of want) {
      if (ck.info(k).kind === 'tensor') t.true(Buffer.from((await ck.read(k)).data).equals(Buffer.from(v)), `rank ${r} ${k}`)
      else t.is(Number(await ck.readObject(k)), Number(Buffer.from(v).readBigInt64LE(0)), `rank ${r} ${k}`)
    }
    ck.close()
  }
}

function torchLoads(t: ExecutionContext, python: string, ckpt: string, out: string): { torch_version: string; ranks: Record<string, string> } {
  const r = spawnSync(python, ['interop/rank_local.py', 'load', ckpt, out, String(RANKS)], { cwd: root, encoding: 'utf8', timeout: 600_000 })
  t.is(r.status, 0, r.stderr)
  return JSON.parse(r.stdout) as { torch_version: string; ranks: Record<string, string> }
}

function sameAsSaved(t: ExecutionContext, dir: string, out: string): void {
  for (let r = 0; r < RANKS; r++) {
    const want = readSafetensors(join(dir, `expected-rank${r}.safetensors`))
    const got = readSafetensors(join(out, `rank${r}.safetensors`))
    t.deepEqual([...got.keys()].sort(), [...want.keys()].sort())
    for (const [k, v] of want) t.true(Buffer.from(got.get(k) ?? []).equals(Buffer.from(v)), `rank ${r} ${k}`)
  }
}

test('rank-local __{rank}.metadata (dcp.save without collectives) are all rewritten; distcp and torch read the same values after', async (t) => {
  const { dir, ckpt } = rankLocalCheckpoint('rank-local')
  const names = ['__0.metadata', '__1.metadata']
  const originals = names.map((n) => readFileSync(join(ckpt, n)))
  const data = readFileSync(join(ckpt, '__1_0.distcp'))
  for (let r = 0; r < RANKS; r++) {
    const ck = await openCheckpoint(ckpt, { rank: r })
    t.is(ck.summary().oldestTorch, '2.15')
    ck.close()
  }
  const res = retarget(ckpt, { torch: '2.13' })
  t.like(res, { before: '2.15', after: '2.0', rewritten: true, original: join(ckpt, '__0.metadata.orig') })
  t.deepEqual(res.files, names.map((n) => join(ckpt, n)))
  names.forEach((n, i) => t.true(readFileSync(join(ckpt, `${n}.orig`)).equals(originals[i]), `${n}.orig`))
  t.true(readFileSync(join(ckpt, '__1_0.distcp')).equals(data), 'data files untouched')
  for (let r = 0; r < RANKS; r++) {
    const ck = await openCheckpoint(ckpt, { rank: r })
    t.is(ck.summary().oldestTorch, '2.0')
    ck.close()
  }
  await checkRanks(t, ckpt, dir, 'expected-rank')
  const loaded = torchLoads(t, process.env.DISTCP_PYTHON ?? join(root, '.venv', 'bin', 'python'), ckpt, join(dir, 'torch-after'))
  t.deepEqual(loaded.ranks, { 0: 'ok', 1: 'ok' })
  sameAsSaved(t, dir, join(dir, 'torch-after'))
  t.like(retarget(ckpt, { torch: '2.13' }), { rewritten: false, files: [] })
})

;(old || process.env.CI ? test : test.skip)('an older torch (DISTCP_PYTHON_OLD_TORCH) fails on rank-local metadata torch 2.15 wrote and loads every rank after retarget', (t) => {
  if (!old) return t.fail('DISTCP_PYTHON_OLD_TORCH is not set')
  const { dir, ckpt } = rankLocalCheckpoint('rank-local-old')
  const failing = torchLoads(t, old, ckpt, join(dir, 'old-before'))
  t.false(failing.torch_version.startsWith('2.15'), failing.torch_version)
  for (let r = 0; r < RANKS; r++) t.not(failing.ranks[r], 'ok', `rank ${r}: the older torch cannot load what 2.15 wrote`)
  retarget(ckpt, { torch: failing.torch_version })
  const loaded = torchLoads(t, old, ckpt, join(dir, 'old-after'))
  t.deepEqual(loaded.ranks, { 0: 'ok', 1: 'ok' })
  sameAsSaved(t, dir, join(dir, 'old-after'))
})
