import test from 'ava'
import { spawn } from 'node:child_process'
import { existsSync, mkdirSync, mkdtempSync, readdirSync, renameSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { basename, join } from 'node:path'

import { CheckpointManager, DistcpError, loadCheckpoint, openCheckpoint, saveCheckpoint, MANAGER_MARKER, type CheckpointManagerOptions } from '../src/index.js'
import { tinyModel } from './save-child.js'
import { root, runPython } from './helpers.js'

// CheckpointManager against NeMo-RL's own logic (interop/nemo_rl_checkpoint.py: NeMo-RL's functions, copied with
// attribution): the same steps and metrics leave the same folders, the same latest and best; NeMo-RL reads a run
// folder the manager made; a kill -9 anywhere in an async save + finalize loop leaves `latest()` complete.

const work = mkdtempSync(join(tmpdir(), 'distcp-manager-'))
test.after.always(() => {
  if (!process.env.DISTCP_KEEP_TMP) rmSync(work, { recursive: true, force: true })
})
let n = 0
const fresh = (name: string): string => join(work, `${name}-${n++}`)

type Info = Record<string, number>
interface Case {
  name: string
  options: Omit<CheckpointManagerOptions, 'dir'>
  steps: [number, Info][]
}

const losses = [5, 3, 4, 3, 1, 2, 1, 6, 0.5, 2]
const CASES: Case[] = [
  { name: 'top-k lower is better, period 2', options: { savePeriod: 2, keepTopK: 2, metricName: 'val:loss' }, steps: losses.map((l, i) => [i + 1, { 'val:loss': l }]) },
  { name: 'top-k higher is better', options: { savePeriod: 1, keepTopK: 3, metricName: 'val:acc', higherIsBetter: true }, steps: losses.map((l, i) => [i + 1, { 'val:acc': l }]) },
  { name: 'ties go to the later step', options: { savePeriod: 1, keepTopK: 2, metricName: 'val:loss' }, steps: [1, 1, 2, 1, 2, 3].map((l, i) => [i + 1, { 'val:loss': l }]) },
  { name: 'ties, higher is better', options: { savePeriod: 1, keepTopK: 2, metricName: 'val:loss', higherIsBetter: true }, steps: [1, 1, 2, 1, 2, 0].map((l, i) => [i + 1, { 'val:loss': l }]) },
  { name: 'latest-k with top-1', options: { savePeriod: 3, keepTopK: 1, metricName: 'val:loss', keepLatestK: 2 }, steps: losses.map((l, i) => [i + 1, { 'val:loss': l }]) },
  { name: 'latest-k only: every periodic step kept', options: { savePeriod: 4, keepLatestK: 1 }, steps: losses.map((l, i) => [i + 1, { 'val:loss': l }]) },
  { name: 'no metric: top-k by recency', options: { savePeriod: 1, keepTopK: 2 }, steps: losses.map((l, i) => [i + 1, { 'val:loss': l }]) },
  { name: 'missing metric in some steps', options: { savePeriod: 1, keepTopK: 2, metricName: 'val:loss' }, steps: losses.map((l, i): [number, Info] => [i + 1, i % 3 === 0 ? { step: i + 1 } : { 'val:loss': l }]) },
  { name: 'keep everything', options: { savePeriod: 1 }, steps: losses.slice(0, 4).map((l, i) => [i * 10, { 'val:loss': l }]) },
]

function pyConfig(o: Case['options']): string {
  return JSON.stringify({
    metric_name: o.metricName ?? null,
    higher_is_better: o.higherIsBetter ?? false,
    keep_top_k: o.keepTopK ?? null,
    save_period: o.savePeriod ?? 1,
    ft_keep_latest_k: o.keepLatestK ?? null,
  })
}

const stepsOf = (dir: string): number[] =>
  readdirSync(dir)
    .filter((d) => /^step_\d+$/.test(d))
    .map((d) => Number(d.slice(5)))
    .sort((a, b) => a - b)

for (const c of CASES) {
  test(`retention as NeMo-RL's CheckpointManager: ${c.name}`, async (t) => {
    const dir = fresh('ret')
    const warnings: string[] = []
    const mgr = new CheckpointManager({ dir, ...c.options, warn: (m) => warnings.push(m) })
    for (const [step, info] of c.steps) await mgr.finalize(await mgr.begin(step, { step, ...info }))
    await mgr.shutdown()
    const py = JSON.parse(runPython(['interop/nemo_rl_checkpoint.py', 'simulate', fresh('py'), pyConfig(c.options), JSON.stringify(c.steps.map(([s, i]) => [s, { step: s, ...i }]))]).trim()) as {
      survivors: number[]
      latest: string | null
      best: string | null
    }
    t.deepEqual(stepsOf(dir), py.survivors)
    t.is<string | null, string | null>(basename(mgr.latest()!), py.latest)
    t.is<string | null, string | null>(basename(mgr.best()!), py.best)
    // NeMo-RL reads the folder the manager made: same history (training_info.json as Python loads it), latest, best
    const seen = JSON.parse(runPython(['interop/nemo_rl_checkpoint.py', 'inspect', dir, pyConfig(c.options)]).trim()) as {
      history: [number, string, Record<string, unknown>][]
      latest: string | null
      best: string | null
    }
    t.deepEqual(
      seen.history,
      mgr.history().sort((a, b) => a.step - b.step).map((h) => [h.step, basename(h.path), h.info]),
    )
    t.is(seen.latest, py.latest)
    t.is(seen.best, py.best)
    // nothing else in the run folder: no temporary folder, no lock after shutdown
    t.deepEqual(readdirSync(dir).filter((d) => !/^step_\d+$/.test(d)), [])
  })
}

test('a step folder the manager did not make is never deleted; NeMo-RL training_info with NaN is read', async (t) => {
  const dir = fresh('foreign')
  mkdirSync(join(dir, 'step_1'), { recursive: true })
  writeFileSync(join(dir, 'step_1', 'training_info.json'), '{"step": 1, "train:grad_norm": NaN, "val:loss": 50.0}')
  mkdirSync(join(dir, 'step_2'), { recursive: true })
  writeFileSync(join(dir, 'step_2', 'training_info.json'), '{"step": 2, "val:loss": 60.0}')
  const warnings: string[] = []
  const mgr = new CheckpointManager({ dir, keepTopK: 1, metricName: 'val:loss', warn: (m) => warnings.push(m) })
  t.deepEqual(mgr.loadTrainingInfo(join(dir, 'step_1')), { step: 1, 'train:grad_norm': NaN, 'val:loss': 50 })
  for (const s of [3, 4, 5]) await mgr.finalize(await mgr.begin(s, { step: s, 'val:loss': 10 + s }))
  await mgr.shutdown()
  // top-1 is step 3, the latest is 5: retention drops 1, 2 and 4 — only 4 (made by distcp) goes
  t.deepEqual(stepsOf(dir), [1, 2, 3, 5])
  t.true(warnings.some((w) => w.includes('step_1') && w.includes('distcp did not make it')))
  t.true(warnings.some((w) => w.includes('step_2') && w.includes('distcp did not make it')))
})

test('one manager per run folder (the core lock); a half-written tmp_step left by a dead run is reported and removed', async (t) => {
  const dir = fresh('lock')
  const a = new CheckpointManager({ dir })
  const half = await a.begin(5, { step: 5 })
  writeFileSync(join(half.path, 'partial'), 'x')
  const warnings: string[] = []
  const b = new CheckpointManager({ dir, warn: (m) => warnings.push(m) })
  const e = await t.throwsAsync(b.begin(6, { step: 6 }), { instanceOf: DistcpError })
  t.is(e?.code, 'ERR_DISTCP_LOCKED')
  await a.shutdown() // a dies without finalizing step 5
  const s6 = await b.begin(6, { step: 6 })
  t.false(existsSync(half.path))
  t.true(warnings.some((w) => w.includes('tmp_step_5') && w.includes('half-written')))
  await b.finalize(s6)
  t.is(basename(b.latest()!), 'step_6')
  // a tmp_step that distcp did not make is moved aside when its name is needed, never deleted
  mkdirSync(join(dir, 'tmp_step_7'))
  writeFileSync(join(dir, 'tmp_step_7', 'theirs'), 'keep me')
  await b.finalize(await b.begin(7, { step: 7 }))
  await b.shutdown()
  const aside = readdirSync(dir).filter((d) => d.startsWith('tmp_step_7.orphan-'))
  t.is(aside.length, 1)
  t.true(existsSync(join(dir, aside[0], 'theirs')))
})

test('finalize over an existing step_N swaps through old_step_N; a swap killed between its renames is repaired', async (t) => {
  const dir = fresh('swap')
  const warnings: string[] = []
  const mgr = new CheckpointManager({ dir, warn: (m) => warnings.push(m) })
  await mgr.finalize(await mgr.begin(3, { step: 3, v: 1 }))
  await mgr.finalize(await mgr.begin(3, { step: 3, v: 2 }))
  t.deepEqual(mgr.loadTrainingInfo(mgr.latest()), { step: 3, v: 2 })
  t.deepEqual(readdirSync(dir).sort(), ['.distcp.lock', 'step_3'])
  // what a kill between `step_3 → old_step_3` and `tmp_step_3 → step_3` leaves
  const next = await mgr.begin(3, { step: 3, v: 3 })
  renameSync(join(dir, 'step_3'), join(dir, 'old_step_3'))
  t.is(basename(mgr.latest()!), 'old_step_3')
  t.deepEqual(mgr.history().map((h) => h.info), [{ step: 3, v: 2 }])
  // the next begin puts the old checkpoint back (and drops the half-finalized tmp_step_3)
  await mgr.begin(4, { step: 4 })
  t.false(existsSync(next.path))
  t.deepEqual(mgr.loadTrainingInfo(join(dir, 'step_3')), { step: 3, v: 2 })
  t.deepEqual(warnings, ['removing tmp_step_3: a checkpoint left half-written by an interrupted save'])
  // an unmarked step_N is not replaced
  mkdirSync(join(dir, 'step_9'))
  const e = await t.throwsAsync(mgr.finalize(await mgr.begin(9, {})), { instanceOf: DistcpError })
  t.is(e?.code, 'ERR_DISTCP_EXISTS')
  await mgr.shutdown()
})


async function weightOf(ckpt: string): Promise<number[]> {
  const ck = await openCheckpoint(join(ckpt, 'policy', 'weights'))
  try {
    const d = (await ck.read('model.w')).data
    return [...new Float32Array(new Uint8Array(d).slice().buffer)]
  } finally {
    ck.close()
  }
}

test('finalizeAsync after saveCheckpoint({ async: true }); resumePaths points at what loads', async (t) => {
  const dir = fresh('async')
  const mgr = new CheckpointManager({ dir, savePeriod: 100, keepLatestK: 2, warn: () => undefined })
  for (const step of [1, 2, 3]) {
    const ck = await mgr.begin(step, { step })
    const h = saveCheckpoint(tinyModel(step), join(ck.path, 'policy', 'weights'), { async: true })
    await h.staged
    await mgr.finalizeAsync(ck, h.committed)
    t.true(mgr.hasPendingFinalization || existsSync(ck.finalPath))
  }
  await mgr.shutdown()
  t.false(mgr.hasPendingFinalization)
  t.deepEqual(stepsOf(dir), [2, 3])
  const { weightsPath, optimizerPath } = mgr.resumePaths()
  t.is(optimizerPath, null)
  t.is(weightsPath, join(dir, 'step_3', 'policy', 'weights'))
  const model = tinyModel(0)
  await loadCheckpoint(model, weightsPath!)
  t.deepEqual(await weightOf(join(dir, 'step_3')), [3, 4, 5, 6])
  // a failed background finalization surfaces at pending()
  const ck = await mgr.begin(4, { step: 4 })
  await mgr.finalizeAsync(ck, Promise.reject(new Error('write failed')))
  t.is((await t.throwsAsync(mgr.pending(), { instanceOf: DistcpError }))?.code, 'ERR_DISTCP_FINALIZE')
  await mgr.shutdown()
})

// a real kill inside the swap of a finalize that replaces step_N (the manager's test hook sends SIGKILL there):
// after it, latest() is a complete step_N (the old one when killed before the new one was in place, else the new
// one), and the next begin leaves exactly step_N
for (const at of ['aside', 'in'] as const) {
  test(`kill -9 inside a finalize's swap (after the ${at === 'aside' ? 'old step went aside' : 'new step went in'}): step_N survives whole`, async (t) => {
    const dir = fresh(`swap-kill-${at}`)
    const child = spawn(process.execPath, ['--import', '@oxc-node/core/register', join(root, '__test__', 'async-child.ts'), 'managerSwap', dir, '5', at], { cwd: root })
    let out = ''
    child.stdout.on('data', (d) => (out += d))
    await new Promise((r) => (child.exitCode !== null || child.signalCode !== null ? r(null) : child.on('exit', r)))
    t.is(child.signalCode, 'SIGKILL', out)
    t.is(out.trim(), 'finalized 5 with 5', 'the second finalize never returned')
    const expected = at === 'aside' ? 5 : 105
    t.deepEqual(readdirSync(dir).filter((d) => !d.startsWith('.')).sort(), at === 'aside' ? ['old_step_5', 'tmp_step_5'] : ['old_step_5', 'step_5'])
    const mgr = new CheckpointManager({ dir, warn: () => undefined })
    const latest = mgr.latest()!
    t.deepEqual(mgr.loadTrainingInfo(latest), { step: 5, variant: expected })
    t.deepEqual(await weightOf(latest), [expected, expected + 1, expected + 2, expected + 3])
    // the next begin repairs: step_5 back (or kept), old_step_5 and the half-finalized tmp_step_5 gone
    await mgr.finalize(await mgr.begin(6, { step: 6 }))
    await mgr.shutdown()
    t.deepEqual(readdirSync(dir).filter((d) => !d.startsWith('.')).sort(), ['step_5', 'step_6'])
    t.deepEqual(await weightOf(join(dir, 'step_5')), [expected, expected + 1, expected + 2, expected + 3])
  })
}

// kill -9 at random moments of a begin → async save → finalizeAsync loop; after every kill `latest()` is a
// complete checkpoint that loads with the weights of its step, and every step_* folder is complete.
test('kill -9 at random points of an async save + finalize loop: latest() always loads', async (t) => {
  const dir = fresh('kill')
  const KILLS = Number(process.env.DISTCP_MANAGER_KILLS ?? 12)
  let next = 1
  let kills = 0
  let rng = 12345
  const random = () => ((rng = (rng * 1103515245 + 12345) % 2 ** 31) / 2 ** 31)
  for (let round = 0; kills < KILLS && round < KILLS * 3; round++) {
    const child = spawn(process.execPath, ['--import', '@oxc-node/core/register', join(root, '__test__', 'async-child.ts'), 'managerLoop', dir, String(next), '50'], { cwd: root })
    let out = ''
    child.stdout.on('data', (d) => (out += d))
    // let it start (the loader takes most of a second) and run a random while before the kill
    await new Promise<void>((resolve) => {
      const kill = () => {
        child.kill('SIGKILL')
        resolve()
      }
      const started = setInterval(() => {
        if (out.includes('finalized')) {
          clearInterval(started)
          setTimeout(kill, random() * 150)
        }
      }, 5)
      child.on('exit', () => {
        clearInterval(started)
        resolve()
      })
    })
    await new Promise((r) => (child.exitCode !== null || child.signalCode !== null ? r(null) : child.on('exit', r)))
    if (child.signalCode === 'SIGKILL') kills++
    const mgr = new CheckpointManager({ dir, warn: () => undefined })
    const latest = mgr.latest()
    t.truthy(latest)
    const step = Number(mgr.loadTrainingInfo(latest)!.step)
    t.deepEqual(await weightOf(latest!), [step, step + 1, step + 2, step + 3], `after kill ${kills}: ${latest}`)
    for (const s of stepsOf(dir)) {
      t.true(existsSync(join(dir, `step_${s}`, 'training_info.json')))
      t.true(existsSync(join(dir, `step_${s}`, MANAGER_MARKER)))
      t.true(existsSync(join(dir, `step_${s}`, 'policy', 'weights', '.metadata')), `step_${s} is complete`)
    }
    next = step + 1
  }
  t.true(kills >= Math.min(KILLS, 5), `only ${kills} kills landed`)
  // and the run goes on from there: a last begin repairs and finalizes
  const mgr = new CheckpointManager({ dir, warn: () => undefined })
  await mgr.finalize(await mgr.begin(next, { step: next }))
  await mgr.shutdown()
  t.deepEqual(readdirSync(dir).filter((d) => !/^step_\d+$/.test(d)), [])
})
