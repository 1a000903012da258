// A writer for the kill campaign: writes again and again into one folder until it is killed.
// usage: node bench/kill/worker.mjs save|saveCheckpoint|saveAsync <dir> | convert <out> <dcp1> <dcp2> <model dir>
//        | manager <run dir>
// Every write has its own variant v (all of its values are v), so a reader can tell a mix from a whole. The
// manager run writes step N with values N: begin → saveAsync into tmp_step_N/policy/weights → finalizeAsync.
import { basename, join } from 'node:path'

import { CheckpointManager, convertDcpToHf, save, saveAsync, saveCheckpoint } from '../../dist/index.js'

export const ELEMS = 64 * 1024

export function filled(v) {
  return { dtype: 'float32', shape: [ELEMS], data: new Uint8Array(new Float32Array(ELEMS).fill(v).buffer) }
}

export function stepState(v) {
  return { model: { w: filled(v), b: filled(v) }, step: v }
}

/** The kill campaign's manager settings: retention deletes on most steps, so kills land in deletions too. */
export function manager(dir) {
  return new CheckpointManager({ dir, savePeriod: 3, keepTopK: 1, metricName: 'val:loss', keepLatestK: 2, warn: () => undefined })
}

/** One managed step, as a trainer does it: the write runs behind, the next begin waits for its finalization. */
export async function managedStep(mgr, step) {
  const s = await mgr.begin(step, { step, 'val:loss': (step * 7919) % 13 })
  const { committed } = saveAsync(stepState(step), { checkpointId: join(s.path, 'policy', 'weights') })
  await mgr.finalizeAsync(s, committed)
}

async function managerLoop(dir) {
  const mgr = manager(dir)
  const latest = mgr.latest()
  let step = latest ? Number(/(\d+)$/.exec(basename(latest))[1]) : 0
  // now and then write the latest step again (a resumed run does): finalize then swaps through old_step_N
  if (step > 0 && Math.random() < 0.25) step--
  for (;;) await managedStep(mgr, ++step)
}

async function asyncLoop(dir) {
  // at most one write and one staged save behind it, as a trainer saving faster than the disk gets
  let before
  for (let v = 2 + Math.floor(Math.random() * 1000); ; v++) {
    const a = saveAsync(stepState(v), { checkpointId: dir })
    await a.staged
    await before
    before = a.committed
  }
}

export function model(v) {
  const w = filled(v)
  return { namedParameters: () => [['w', w]], stateDict: () => ({ w }), loadStateDict: () => undefined }
}

if (import.meta.url === `file://${process.argv[1]}`) {
  const [mode, dir, ...rest] = process.argv.slice(2)
  process.stdout.write('ready\n')
  if (mode === 'manager') await managerLoop(dir)
  if (mode === 'saveAsync') await asyncLoop(dir)
  for (let v = 2 + Math.floor(Math.random() * 1000); ; v++) {
    if (mode === 'save') await save({ model: { w: filled(v), b: filled(v) }, step: v }, { checkpointId: dir })
    else if (mode === 'saveCheckpoint') await saveCheckpoint(model(v), dir)
    else await convertDcpToHf(rest[v % 2], dir, rest[2], undefined, { overwrite: true, onWarning: () => undefined })
  }
}
