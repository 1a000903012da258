// Kill campaign: `kill -9` writers (save, saveCheckpoint, convert) at random times on small checkpoints, and after
// each kill check that the folder holds a whole checkpoint (the old or the new one: every value of one variant),
// never a mix and never nothing; user files beside a converted output must survive. Conversions are checked
// after the recovery the next run does (lock, roll an interrupted commit forward); saves need none.
// The async part kills `saveAsync` loops (one write, one staged save behind it) and CheckpointManager runs (begin →
// saveAsync into tmp_step_N → finalizeAsync, with retention deleting old steps); after each kill of a run: the
// latest checkpoint the manager reports loads with its step's values, and so does every `step_*` folder.
// usage: npm run build:ts && node bench/kill/run.mjs [--kills N] [--async-kills N] [--max-delay-ms D]
//   --kills: kills of save, saveCheckpoint and convert (default 510); --async-kills: of saveAsync and the
//   manager run (default 200)
import { spawn } from 'node:child_process'
import { existsSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { basename, join } from 'node:path'

import { openCheckpoint, save, saveAsync, saveCheckpoint, convertDcpToHf } from '../../dist/index.js'
import { native } from '../../dist/native.js'
import { filled, managedStep, manager, model, stepState } from './worker.mjs'

const arg = (name, dflt) => {
  const i = process.argv.indexOf(name)
  return i >= 0 ? Number(process.argv[i + 1]) : dflt
}
const KILLS = arg('--kills', 510)
const ASYNC_KILLS = arg('--async-kills', 200)
const MAX_DELAY = arg('--max-delay-ms', 250)
const WORKER = new URL('./worker.mjs', import.meta.url).pathname
const work = mkdtempSync(join(tmpdir(), 'distcp-kill-'))

const LEFTOVER = /^(\.distcp\.lock|\.distcp-journal(\.tmp)?|\.distcp-tmp-.*|\.metadata\.tmp|__0_0\.distcp\..*\.tmp)$/
const leftovers = (dir) => (existsSync(dir) ? readdirSync(dir).filter((n) => LEFTOVER.test(n)) : [])

function allEqual(bytes) {
  const f = new Float32Array(bytes.buffer, bytes.byteOffset, bytes.byteLength / 4)
  return f.length > 0 && f.every((x) => x === f[0]) ? f[0] : null
}

async function checkSave(dir, mode, expectStep) {
  const ck = await openCheckpoint(dir)
  try {
    if (mode === 'save' || mode === 'saveAsync' || mode === 'manager') {
      const step = Number(await ck.readObject('step'))
      const w = allEqual((await ck.read('model.w')).data)
      const b = allEqual((await ck.read('model.b')).data)
      return w === step && b === step && (expectStep === undefined || step === expectStep) ? 'whole' : 'mixed'
    }
    return allEqual((await ck.read('model.w')).data) === null ? 'mixed' : 'whole'
  } finally {
    ck.close()
  }
}

function readSafetensors(path) {
  const buf = readFileSync(path)
  const n = Number(buf.readBigUInt64LE(0))
  const header = JSON.parse(buf.subarray(8, 8 + n).toString('utf8'))
  const out = new Map()
  for (const [k, v] of Object.entries(header)) {
    if (k !== '__metadata__') out.set(k, buf.subarray(8 + n + v.data_offsets[0], 8 + n + v.data_offsets[1]))
  }
  return out
}

function checkConvert(out) {
  // the DCP has one top-level key, `model`, which conversion unwraps: tensors `w` and `b`
  // what the next run does first: take the lock, finish or remove what the dead writer left
  native.beginConvertOutput(out, []).abort()
  if (readFileSync(join(out, 'thesis.tex'), 'utf8') !== 'mine') return 'lost'
  if (!existsSync(join(out, 'model.safetensors')) || !existsSync(join(out, 'config.json'))) return 'lost'
  JSON.parse(readFileSync(join(out, 'config.json'), 'utf8'))
  const t = readSafetensors(join(out, 'model.safetensors'))
  const w = allEqual(new Uint8Array(t.get('w')))
  return w !== null && allEqual(new Uint8Array(t.get('b'))) === w && (w === 1 || w === 2) ? 'whole' : 'mixed'
}

const stepOf = (name) => Number(/(\d+)$/.exec(name)[1])
const MANAGER_LEFTOVER = /^(tmp_step_\d+|old_step_\d+|\.distcp-step-.*|\.distcp\.lock)$/

/**
 * A run folder after a kill: the latest checkpoint the manager reports is step N with values N (training_info
 * too), and so is every `step_*` / `old_step_*` folder (only `tmp_step_*` and the manager's `.distcp-step-*`
 * temporaries may be incomplete). Returns 'whole', 'mixed' (a folder with other values) or 'lost'.
 */
async function checkManager(dir) {
  const latest = manager(dir).latest()
  if (latest === null) return 'lost'
  const folders = readdirSync(dir).filter((n) => /^(old_)?step_\d+$/.test(n))
  if (!folders.includes(basename(latest))) return 'lost'
  for (const name of folders) {
    const n = stepOf(name)
    const info = JSON.parse(readFileSync(join(dir, name, 'training_info.json'), 'utf8'))
    if (info.step !== n) return 'mixed'
    if ((await checkSave(join(dir, name, 'policy', 'weights'), 'manager', n)) !== 'whole') return 'mixed'
  }
  return 'whole'
}

async function setup() {
  const dirs = {
    save: join(work, 'save'),
    saveCheckpoint: join(work, 'saveCheckpoint'),
    convert: join(work, 'hf'),
    saveAsync: join(work, 'saveAsync'),
    manager: join(work, 'run'),
  }
  await save({ model: { w: filled(1), b: filled(1) }, step: 1 }, { checkpointId: dirs.save })
  await saveAsync(stepState(1), { checkpointId: dirs.saveAsync }).committed
  const mgr = manager(dirs.manager)
  await managedStep(mgr, 1)
  await mgr.shutdown()
  await saveCheckpoint(model(1), dirs.saveCheckpoint)
  const dcps = []
  for (const v of [1, 2]) {
    const d = join(work, `dcp${v}`)
    await save({ model: { w: filled(v), b: filled(v) } }, { checkpointId: d })
    dcps.push(d)
  }
  const modelDir = join(work, 'model')
  mkdirSync(modelDir)
  writeFileSync(join(modelDir, 'config.json'), JSON.stringify({ model_type: 'toy' }))
  await convertDcpToHf(dcps[0], dirs.convert, modelDir, undefined, { onWarning: () => undefined })
  writeFileSync(join(dirs.convert, 'thesis.tex'), 'mine')
  return {
    dirs,
    args: {
      save: [dirs.save],
      saveCheckpoint: [dirs.saveCheckpoint],
      convert: [dirs.convert, ...dcps, modelDir],
      saveAsync: [dirs.saveAsync],
      manager: [dirs.manager],
    },
  }
}

async function killOne(mode, args) {
  const p = spawn(process.execPath, [WORKER, mode, ...args], { stdio: ['ignore', 'pipe', 'pipe'] })
  let stderr = ''
  p.stderr.on('data', (d) => (stderr += d))
  await new Promise((resolve, reject) => {
    p.stdout.once('data', resolve)
    p.on('error', reject)
  })
  await new Promise((r) => setTimeout(r, Math.random() * MAX_DELAY))
  const closed = new Promise((r) => p.on('close', (code, signal) => r({ code, signal })))
  p.kill('SIGKILL')
  const { signal } = await closed
  if (signal !== 'SIGKILL') throw new Error(`${mode} worker ended on its own: ${stderr}`)
}

const { dirs, args } = await setup()
const syncModes = ['save', 'saveCheckpoint', 'convert']
const asyncModes = ['saveAsync', 'manager']
const modes = [...syncModes, ...asyncModes]
const schedule = [
  ...Array.from({ length: KILLS }, (_, i) => syncModes[i % 3]),
  ...Array.from({ length: ASYNC_KILLS }, (_, i) => asyncModes[i % 2]),
]
const tally = { kills: 0, lost: 0, mixed: 0, leftovers: 0, rolledForward: 0 }
const byMode = Object.fromEntries(modes.map((m) => [m, 0]))
// manager runs: what each kill left to repair, and the steps reached
const run = { halfWritten: 0, swaps: 0, trash: 0, steps: 0 }
const started = Date.now()
for (const [i, mode] of schedule.entries()) {
  await killOne(mode, args[mode])
  tally.kills++
  byMode[mode]++
  if (mode === 'manager') {
    const names = readdirSync(dirs.manager)
    run.halfWritten += names.filter((n) => /^tmp_step_\d+$/.test(n)).length
    run.swaps += names.filter((n) => /^old_step_\d+$/.test(n)).length
    run.trash += names.filter((n) => n.startsWith('.distcp-step-')).length
  } else tally.leftovers += leftovers(dirs[mode]).length
  if (existsSync(join(dirs[mode], '.distcp-journal'))) tally.rolledForward++
  let state
  try {
    if (mode === 'convert') state = checkConvert(dirs.convert)
    else if (mode === 'manager') state = await checkManager(dirs.manager)
    else state = await checkSave(dirs[mode], mode)
  } catch (e) {
    state = 'lost'
    console.error(`kill ${i} (${mode}): ${e.message}`)
  }
  if (state !== 'whole') {
    tally[state]++
    console.error(`kill ${i} (${mode}): ${state}; folder: ${readdirSync(dirs[mode]).join(', ')}`)
  }
}
// one clean write per folder: every leftover of a dead writer is gone afterwards
await save({ model: { w: filled(7), b: filled(7) }, step: 7 }, { checkpointId: dirs.save })
await saveCheckpoint(model(7), dirs.saveCheckpoint)
await convertDcpToHf(args.convert[1], dirs.convert, args.convert[3], undefined, { overwrite: true, onWarning: () => undefined })
await saveAsync(stepState(7), { checkpointId: dirs.saveAsync }).committed
const mgr = manager(dirs.manager)
const lastStep = stepOf(basename(mgr.latest()))
run.steps = lastStep
await managedStep(mgr, lastStep + 1)
await mgr.shutdown()
const remaining = [
  ...[...syncModes, 'saveAsync'].flatMap((m) => leftovers(dirs[m])),
  ...readdirSync(dirs.manager).filter((n) => MANAGER_LEFTOVER.test(n)),
]
const runFinal = (await checkManager(dirs.manager)) === 'whole' ? 'whole' : 'NOT WHOLE'
const foreign = readdirSync(dirs.convert).sort().join(',')
console.log(`kills by mode: ${JSON.stringify(byMode)}; conversions killed mid-commit and rolled forward: ${tally.rolledForward}; ${((Date.now() - started) / 1000).toFixed(0)} s; after a clean write: leftovers ${JSON.stringify(remaining)}, output folder ${foreign}`)
console.log(`manager run: ${run.steps} steps reached; left by kills and repaired by the next begin: ${run.halfWritten} half-written tmp_step_*, ${run.swaps} swaps (old_step_*), ${run.trash} deletions (.distcp-step-*); after a clean step: ${readdirSync(dirs.manager).sort().join(',')} (${runFinal})`)
console.log(`${tally.kills} kills: ${tally.lost} lost, ${tally.mixed} mixed, ${tally.leftovers} leftovers cleaned`)
rmSync(work, { recursive: true, force: true })
process.exitCode =
  tally.lost + tally.mixed + remaining.length === 0 && runFinal === 'whole' && foreign === 'config.json,model.safetensors,thesis.tex' ? 0 : 1
