// saveCheckpoint / loadCheckpoint: NeMo-RL's `native_checkpoint.save_checkpoint` / `load_checkpoint`, same order,
// same checks, same messages (its snake_case argument names in camelCase).
import { copyFileSync, cpSync, existsSync, mkdirSync, statSync } from 'node:fs'
import { join } from 'node:path'

import { DistcpError } from './errors.js'
import { resolveModel, TOKENIZER_DIRS, TOKENIZER_FILES } from './hf.js'
import { load, type InternalLoadOptions, type LoadReport } from './load.js'
import { asyncSaver, type AsyncSaver, type StagedInfo } from './async-save.js'
import { save } from './save.js'
import { ModelState, OptimizerState, type LRScheduler, type Model, type Optimizer } from './stateful.js'
import type { ProcessGroup } from './distributed/group.js'

/** A tokenizer to save: a folder (or a hub name in the local HF cache) whose tokenizer files are copied, or an object with `savePretrained(dir)`. */
export type TokenizerSource = string | { savePretrained(dir: string): unknown }

/** Options of {@link saveCheckpoint}: the seed's keyword arguments in camelCase, plus `layout` and `log`. */
export interface SaveCheckpointOptions {
  /** Saved to `optimizerPath` as `{ optim: OptimizerState(model, optimizer, scheduler) }`. */
  optimizer?: Optimizer | null
  /** Saved with the optimizer (`optim.sched.*`); ignored without an optimizer, as in the seed. */
  scheduler?: LRScheduler | null
  /** Required with `optimizer`. */
  optimizerPath?: string | null
  tokenizer?: TokenizerSource | null
  /** Required with `tokenizer`. */
  tokenizerPath?: string | null
  /**
   * Flat keys as torch ≥ 2.4 writes them (`'2.4'`, default) or as torch ≤ 2.3 does (`'2.3'`: `optim.sched` and
   * `optim.optim.param_groups` are single items), for trainers that resume with old torch; see `save`.
   */
  layout?: '2.4' | '2.3'
  /** Receives the seed's progress lines (`Saving tokenizer (or processor) to …`); default: silent. */
  log?: (line: string) => void
  /**
   * Save behind the trainer (see `saveAsync`): `saveCheckpoint` then returns an {@link AsyncCheckpointSave} at
   * once instead of a promise of the whole save.
   */
  async?: boolean
  /** With `async`: the saver that queues the writes (default: the process-wide one `saveAsync` uses). */
  saver?: AsyncSaver
  /**
   * Save together with the other ranks of this group (see `save`): each rank passes its own model (its slices);
   * the tokenizer is written by rank 0 alone, and every rank returns only once it is there (NeMo-RL's
   * `save_tokenizer_on_rank0`: concurrent writers deadlocked on NFS). With `async`, the saves stage at once and
   * coordinate with the other ranks as they write (see `saveAsync`).
   */
  processGroup?: ProcessGroup
}

/** What `saveCheckpoint(…, { async: true })` returns. */
export interface AsyncCheckpointSave {
  /** Settles when the weights (and optimizer state) are copied into staging memory: the model may change from then on. */
  staged: Promise<StagedInfo[]>
  /** Settles when the weights, optimizer state and tokenizer are on disk. */
  committed: Promise<void>
}

/** Options of {@link loadCheckpoint}: the seed's keyword arguments in camelCase, plus `log`. */
export interface LoadCheckpointOptions {
  optimizer?: Optimizer | null
  /** Loaded from the optimizer checkpoint's `sched` when given (a saved scheduler is ignored otherwise). */
  scheduler?: LRScheduler | null
  /** Required with `optimizer`. */
  optimizerPath?: string | null
  /** Receives the seed's progress lines (`Loading weights from …`, `Loading optimizer from …`); default: silent. */
  log?: (line: string) => void
  /** Load together with the other ranks of this group: each rank reads its own slices (see `load`). */
  processGroup?: ProcessGroup
}

/** What {@link loadCheckpoint} loaded: the report of each {@link load}. */
export interface LoadCheckpointResult {
  weights: LoadReport
  optimizer?: LoadReport
}

/**
 * The seed's `save_checkpoint`, in its order:
 * 1. `save({ model: ModelState(model) }, weightsPath)`, always;
 * 2. with an optimizer: `optimizerPath` is required ("optimizerPath must be provided when saving optimizer
 *    state"), then `save({ optim: OptimizerState(model, optimizer, scheduler) }, optimizerPath)`;
 * 3. with a tokenizer: `tokenizerPath` is required ("tokenizerPath must be provided when saving tokenizer
 *    state"), then the tokenizer files are written there.
 * As in the seed, a missing path is found only after the steps before it are done (the weights are on disk).
 */
export function saveCheckpoint(model: Model, weightsPath: string, options: SaveCheckpointOptions & { async: true }): AsyncCheckpointSave
export function saveCheckpoint(model: Model, weightsPath: string, options?: SaveCheckpointOptions): Promise<void>
export function saveCheckpoint(model: Model, weightsPath: string, options: SaveCheckpointOptions = {}): Promise<void> | AsyncCheckpointSave {
  if (options.async) return saveCheckpointAsync(model, weightsPath, options)
  return saveCheckpointSync(model, weightsPath, options)
}

async function saveCheckpointSync(model: Model, weightsPath: string, options: SaveCheckpointOptions): Promise<void> {
  const { optimizer, scheduler, optimizerPath, tokenizer, tokenizerPath, layout, log, processGroup } = options
  await save({ model: new ModelState(model) }, { checkpointId: weightsPath, layout, processGroup })
  if (optimizer) {
    if (optimizerPath == null) {
      throw new DistcpError('ERR_DISTCP_INVALID_INPUT', 'optimizerPath must be provided when saving optimizer state')
    }
    await save({ optim: new OptimizerState(model, optimizer, scheduler) }, { checkpointId: optimizerPath, layout, processGroup })
  }
  if (tokenizer) {
    if (tokenizerPath == null) {
      throw new DistcpError('ERR_DISTCP_INVALID_INPUT', 'tokenizerPath must be provided when saving tokenizer state')
    }
    await writeTokenizer(tokenizer, tokenizerPath, log, processGroup)
  }
}

/**
 * Writes the tokenizer; with a process group rank 0 alone writes it, a failure there rejects every rank with the
 * same error, and no rank returns before it is done.
 */
async function writeTokenizer(tokenizer: TokenizerSource, path: string, log: SaveCheckpointOptions['log'], pg: ProcessGroup | undefined): Promise<void> {
  const write = async () => {
    log?.(`Saving tokenizer (or processor) to ${path}`)
    await saveTokenizer(tokenizer, path)
  }
  if (!pg) return write()
  await pg.allReduce('tokenizer', async () => (pg.rank === 0 ? write() : undefined), () => undefined)
}

/**
 * The same steps, in the same order, with the two DCP saves queued on the saver: both stage in the call (when
 * the saver is idle), then write one after the other; the tokenizer is copied once both are committed. A
 * missing `optimizerPath` / `tokenizerPath` rejects both promises, after the steps before it were queued (as the
 * seed, which has the weights on disk by then).
 */
function saveCheckpointAsync(model: Model, weightsPath: string, options: SaveCheckpointOptions): AsyncCheckpointSave {
  const { optimizer, scheduler, optimizerPath, tokenizer, tokenizerPath, layout, log, processGroup } = options
  const saver = options.saver ?? asyncSaver()
  const saves = [saver.save({ model: new ModelState(model) }, { checkpointId: weightsPath, layout, processGroup })]
  let missing: DistcpError | undefined
  if (optimizer) {
    if (optimizerPath == null) {
      missing = new DistcpError('ERR_DISTCP_INVALID_INPUT', 'optimizerPath must be provided when saving optimizer state')
    } else {
      saves.push(saver.save({ optim: new OptimizerState(model, optimizer, scheduler) }, { checkpointId: optimizerPath, layout, processGroup }))
    }
  }
  if (!missing && tokenizer && tokenizerPath == null) {
    missing = new DistcpError('ERR_DISTCP_INVALID_INPUT', 'tokenizerPath must be provided when saving tokenizer state')
  }
  const staged = Promise.all(saves.map((s) => s.staged)).then((infos) => {
    if (missing) throw missing
    return infos
  })
  staged.catch(() => undefined)
  const committed = (async () => {
    // every save settles before this one does (no write is left running unobserved)
    const results = await Promise.allSettled(saves.map((s) => s.committed))
    for (const r of results) if (r.status === 'rejected') throw r.reason
    if (missing) throw missing
    if (tokenizer && tokenizerPath != null) await writeTokenizer(tokenizer, tokenizerPath, log, processGroup)
  })()
  return { staged, committed }
}

/**
 * The seed's `load_checkpoint`: loads `{ model: ModelState(model) }` from `weightsPath`, then, with an optimizer,
 * `{ optim: OptimizerState(model, optimizer, scheduler) }` from `optimizerPath` ("optimizerPath must be provided
 * when loading optimizer state" otherwise). Loads are strict (see {@link load}), except that a scheduler saved in
 * the optimizer checkpoint is ignored when no scheduler is given, as the seed does.
 */
export async function loadCheckpoint(
  model: Model,
  weightsPath: string,
  options: LoadCheckpointOptions = {},
): Promise<LoadCheckpointResult> {
  const { optimizer, scheduler, optimizerPath, log, processGroup } = options
  log?.(`Loading weights from ${weightsPath}`)
  const weights = await load({ model: new ModelState(model) }, { checkpointId: weightsPath, processGroup })
  if (!optimizer) return { weights }
  if (optimizerPath == null) {
    throw new DistcpError('ERR_DISTCP_INVALID_INPUT', 'optimizerPath must be provided when loading optimizer state')
  }
  log?.(`Loading optimizer from ${optimizerPath}`)
  const opts: InternalLoadOptions = { checkpointId: optimizerPath, processGroup }
  if (!scheduler) opts.ignoreUnexpected = (key) => key === 'optim.sched' || key.startsWith('optim.sched.')
  const optimizerReport = await load({ optim: new OptimizerState(model, optimizer, scheduler) }, opts)
  return { weights, optimizer: optimizerReport }
}

/**
 * Writes a tokenizer to `dir` (created if needed): an object's `savePretrained(dir)` is called; a folder's
 * tokenizer files (`TOKENIZER_FILES`, and `additional_chat_templates/`) are copied byte for byte; a hub name
 * (`org/name[@revision]`) is looked up offline in the local Hugging Face cache first.
 */
export async function saveTokenizer(tokenizer: TokenizerSource, dir: string): Promise<void> {
  if (typeof tokenizer !== 'string') {
    if (typeof tokenizer?.savePretrained !== 'function') {
      throw new DistcpError('ERR_DISTCP_INVALID_INPUT', 'tokenizer must be a folder, a hub name or an object with savePretrained(dir)')
    }
    await tokenizer.savePretrained(dir)
    return
  }
  const found = resolveModel(tokenizer)
  if (!('dir' in found)) {
    throw new DistcpError('ERR_DISTCP_NOT_FOUND', `tokenizer \`${tokenizer}\` not found (looked in ${found.looked.join(', ')})`)
  }
  const files = TOKENIZER_FILES.filter((f) => existsSync(join(found.dir, f)) && statSync(join(found.dir, f)).isFile())
  if (files.length === 0) {
    throw new DistcpError('ERR_DISTCP_NOT_FOUND', `no tokenizer files in ${found.dir} (looked for ${TOKENIZER_FILES.join(', ')})`)
  }
  mkdirSync(dir, { recursive: true })
  for (const f of files) copyFileSync(join(found.dir, f), join(dir, f))
  for (const d of TOKENIZER_DIRS) {
    const src = join(found.dir, d)
    if (existsSync(src) && statSync(src).isDirectory()) cpSync(src, join(dir, d), { recursive: true, dereference: true })
  }
}
