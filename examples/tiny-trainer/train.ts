// Train the tiny MLP, checkpoint it the NeMo-RL way, resume from the checkpoint.
//
//   node --import @oxc-node/core/register examples/tiny-trainer/train.ts <run-dir> --steps N [--resume]
//
// A fresh run trains N steps from batch 0; --resume loads the newest <run-dir>/step_<k>/policy checkpoint into a
// model built with other initial weights and trains N more steps from batch k. Each run ends with a checkpoint
// <run-dir>/step_<k+N>/policy/{weights,optimizer,tokenizer}, which PyTorch loads with NeMo-RL's load_checkpoint.
import { existsSync, readdirSync } from 'node:fs'
import { join } from 'node:path'

import { loadCheckpoint, saveCheckpoint } from '../../src/index.js'
import { createRun, trainStep } from './trainer.js'

const args = process.argv.slice(2)
const runDir = args.find((a) => !a.startsWith('--'))
const steps = Number(args[args.indexOf('--steps') + 1])
if (!runDir || !args.includes('--steps') || !Number.isInteger(steps) || steps < 0) {
  console.error('usage: train.ts <run-dir> --steps N [--resume]')
  process.exit(2)
}
const tokenizer = new URL('../tiny-llama/tokenizer', import.meta.url).pathname

let start = 0
let run = createRun({ seed: 0 })
if (args.includes('--resume')) {
  const done = existsSync(runDir)
    ? readdirSync(runDir)
        .map((d) => /^step_(\d+)$/.exec(d))
        .filter((m): m is RegExpExecArray => m !== null && existsSync(join(runDir, m[0], 'policy', 'weights', '.metadata')))
        .map((m) => Number(m[1]))
    : []
  if (done.length === 0) {
    console.error(`no checkpoint under ${runDir}`)
    process.exit(1)
  }
  start = Math.max(...done)
  run = createRun({ seed: 12345 }) // other initial weights: everything must come from the checkpoint
  const policy = join(runDir, `step_${start}`, 'policy')
  await loadCheckpoint(run.model, join(policy, 'weights'), {
    optimizer: run.optimizer,
    scheduler: run.scheduler,
    optimizerPath: join(policy, 'optimizer'),
    log: console.log,
  })
}

for (let s = start; s < start + steps; s++) {
  const lr = run.scheduler.getLastLr()[0]
  const loss = trainStep(run, s)
  console.log(`step ${s} loss ${loss} lr ${lr}`)
}

const policy = join(runDir, `step_${start + steps}`, 'policy')
await saveCheckpoint(run.model, join(policy, 'weights'), {
  optimizer: run.optimizer,
  scheduler: run.scheduler,
  optimizerPath: join(policy, 'optimizer'),
  tokenizer,
  tokenizerPath: join(policy, 'tokenizer'),
  log: console.log,
})
console.log(`saved ${policy}`)
