// A child process for the async-save and manager kill tests: one async save (or a manager loop), killed on purpose.
//   node --import @oxc-node/core/register __test__/async-child.ts saveAsync <ckpt> <variant>
//     prints `staged` once the copy is done, `ok` once committed (DISTCP_TEST_CRASH_AT kills it in between);
//   node --import @oxc-node/core/register __test__/async-child.ts managerLoop <run dir> <first step> <steps>
//     begin → saveCheckpoint({ async: true }) → finalizeAsync(committed), for steps first…first+steps-1; prints
//     `finalized <step>` after each; the parent kills it at random moments.
//   node --import @oxc-node/core/register __test__/async-child.ts managerSwap <run dir> <step> <aside|in>
//     finalizes <step> with weights <step>, then saves it again with weights <step> + 100 and is killed inside
//     that second finalize's swap (the manager's test hook).
import { join } from 'node:path'

import { CheckpointManager, saveAsync, saveCheckpoint } from '../src/index.js'
import { smallState, tinyModel } from './save-child.js'


const [mode, a, b, c] = process.argv.slice(2)
if (mode === 'saveAsync') {
  const h = saveAsync(smallState(Number(b)), { checkpointId: a })
  await h.staged
  console.log('staged')
  await h.committed
  console.log('ok')
} else if (mode === 'managerLoop') {
  const mgr = new CheckpointManager({ dir: a, savePeriod: 2, keepTopK: 2, metricName: 'val:loss', keepLatestK: 2 })
  const first = Number(b)
  for (let step = first; step < first + Number(c); step++) {
    const ck = await mgr.begin(step, { step, 'val:loss': (step * 7) % 5 })
    const h = saveCheckpoint(tinyModel(step), join(ck.path, 'policy', 'weights'), { async: true })
    await h.staged
    await mgr.finalizeAsync(ck, h.committed)
    await mgr.pending()
    console.log(`finalized ${step}`)
  }
  await mgr.shutdown()
  console.log('ok')
} else if (mode === 'managerSwap') {
  const step = Number(b)
  const killAt = c === 'aside' || c === 'in' ? c : undefined
  for (const [variant, hook] of [[step, undefined], [step + 100, killAt]] as const) {
    const mgr = new CheckpointManager({ dir: a, _testKillInSwap: hook })
    const ck = await mgr.begin(step, { step, variant })
    const h = saveCheckpoint(tinyModel(variant), join(ck.path, 'policy', 'weights'), { async: true })
    await mgr.finalizeAsync(ck, h.committed)
    await mgr.shutdown()
    console.log(`finalized ${step} with ${variant}`)
  }
} else throw new Error(`unknown mode ${mode}`)
