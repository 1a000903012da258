// The pieces together: a model, AdamW and StepLR built from one config, and the training step torch runs
// (zero_grad, forward, backward, optimizer.step, scheduler.step).
import { makeBatch } from './data.js'
import { TinyMLP, type MlpConfig } from './mlp.js'
import { Adam, AdamW, StepLR } from './optim.js'

export interface RunConfig extends MlpConfig {
  /** Batches come from this seed (see data.ts); the model's initial weights from `seed`. */
  dataSeed?: number
  batch?: number
  lr?: number
  weightDecay?: number
  /** `'adamw'` (default) or `'adam'`. */
  optimizer?: 'adamw' | 'adam'
  stepSize?: number
  gamma?: number
}

/** The defaults the tests and interop/tiny_trainer.py share. */
export const DEFAULTS = { dataSeed: 7, batch: 3, lr: 1e-2, weightDecay: 1e-2, stepSize: 4, gamma: 0.5 } as const

export interface Run {
  config: RunConfig
  model: TinyMLP
  optimizer: AdamW
  scheduler: StepLR
}

export function createRun(config: RunConfig = {}): Run {
  const c = { ...DEFAULTS, ...config }
  const model = new TinyMLP(c)
  const params = model.namedParameters().map(([, p]) => p)
  const optimizer = c.optimizer === 'adam' ? new Adam(params, { lr: c.lr }) : new AdamW(params, { lr: c.lr, weightDecay: c.weightDecay })
  const scheduler = new StepLR(optimizer, { stepSize: c.stepSize, gamma: c.gamma })
  return { config: c, model, optimizer, scheduler }
}

/** One training step on batch number `step`; returns its loss (before the update). */
export function trainStep(run: Run, step: number): number {
  const c = { ...DEFAULTS, ...run.config }
  const batch = makeBatch(c.dataSeed, step, c.batch, run.model.inFeatures, run.model.outFeatures)
  run.optimizer.zeroGrad(true)
  const loss = run.model.lossAndBackward(batch)
  run.optimizer.step()
  run.scheduler.step()
  return loss
}

/** The loss on batch number `step` without training (what the next step will see before its update). */
export function evalLoss(run: Run, step: number): number {
  const c = { ...DEFAULTS, ...run.config }
  return run.model.loss(makeBatch(c.dataSeed, step, c.batch, run.model.inFeatures, run.model.outFeatures))
}
