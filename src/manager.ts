// CheckpointManager: NeMo-RL's `nemo_rl/utils/checkpoint.py` CheckpointManager (Apache-2.0, NVIDIA) for Node: the
// same folder names (`tmp_step_N` → `step_N`, through `old_step_N` when the target exists), the same
// `training_info.json` keys, the same retention rules, so that a run folder moves between NeMo-RL and Node.
//
// Where it differs, it is to keep the house rules (nothing a user had is lost; what is on disk is complete or
// absent, also under kill -9):
// - it deletes only step folders it made (they hold a `.distcp-manager` marker); a NeMo-RL step folder still
//   counts in the retention ranking but is kept, with a warning;
// - a folder it deletes is first renamed out of the `step_N` namespace (to a `.distcp-step-…` temporary name,
//   the core's commit naming), so a kill mid-deletion never leaves a half-deleted `step_N`;
// - a new `tmp_step_N` is prepared under a temporary name and renamed into place, and every rename is followed
//   by an fsync of the run folder;
// - the run folder is locked (the core's folder lock, `ERR_DISTCP_LOCKED`) from the first `begin` to `shutdown`:
//   two trainers never manage one run folder;
// - the step just finalized is never deleted, even when it is not the highest step.
//
// Why the folder renames are done here and not in the core: the core's commit module owns file-level commits
// (a staged set of files moved into one output folder under a journal); a whole folder that appears under its
// final name with one `rename` needs no journal, and the names (`tmp_step_N`, `step_N`, `old_step_N`) are
// NeMo-RL's format, which this file matches. The core's rules it needs (lock, temporary names that tell a dead
// writer's leftovers, folder fsync) come through the binding.
import { existsSync, mkdirSync, readdirSync, readFileSync, renameSync, rmSync, statSync, writeFileSync, openSync, fsyncSync, closeSync } from 'node:fs'
import { join, resolve } from 'node:path'

import { callNative, DistcpError } from './errors.js'
import { native } from './native.js'
import { mapItems, PyFloat } from './values.js'

/** Marker file in every step folder the manager made: only those are ever deleted. */
export const MANAGER_MARKER = '.distcp-manager'
/** Prefix of the manager's temporary folders (a new step being prepared, a step being deleted). */
const TMP_PREFIX = '.distcp-step-'
const STEP_RE = /^step_(\d+)$/
const TMP_STEP_RE = /^tmp_step_(\d+)$/
const OLD_STEP_RE = /^old_step_(\d+)$/

/** NeMo-RL's `CheckpointingConfig`, in camelCase. */
export interface CheckpointManagerOptions {
  /** The run folder (`checkpoint_dir`). */
  dir: string
  /** Steps that are multiples of this are the "periodic" ones that `keepTopK` ranks (default 1). */
  savePeriod?: number
  /** How many periodic checkpoints to keep, best first by the metric (or the most recent without one); null: all. */
  keepTopK?: number | null
  /** The `training_info.json` key that ranks checkpoints (`'val:loss'`); null: rank by recency. */
  metricName?: string | null
  higherIsBetter?: boolean
  /** The most recent this many checkpoints are always kept (`ft_keep_latest_k`); null: no such rule. */
  keepLatestK?: number | null
  /** Warnings (deletions that failed, folders kept because distcp did not make them…); default: `process.emitWarning`. */
  warn?: (message: string) => void
  /** Progress lines (`Removing checkpoint …`); default: silent. */
  log?: (line: string) => void
  /**
   * @internal test hook: kill this process (SIGKILL) inside a swap, after `step_N → old_step_N` (`'aside'`) or
   * after `tmp_step_N → step_N` (`'in'`), so that tests see what a real kill there leaves.
   */
  _testKillInSwap?: 'aside' | 'in'
}

/** A checkpoint being written: the `tmp_step_N` folder {@link CheckpointManager.begin} made. */
export interface StepCheckpoint {
  step: number
  /** The absolute `tmp_step_N` folder to write into. */
  path: string
  /** The `step_N` folder it becomes when finalized. */
  finalPath: string
}

/** One finalized checkpoint of a run folder. */
export interface CheckpointEntry {
  step: number
  path: string
  info: Record<string, unknown>
}

/** Where to resume from: NeMo-RL's `get_resume_paths`. */
export interface ResumePaths {
  weightsPath: string | null
  /** Null when the checkpoint has no optimizer state. */
  optimizerPath: string | null
}

/** What `training_info.json` holds: the step, the metrics (e.g. `val:loss`) and anything else the trainer records. */
export type TrainingInfo = Record<string, unknown>

/** A value of `training_info.json` written as Python's `json.dump` writes it (", " and ": ", NaN, ensure_ascii). */
function pyJson(v: unknown, inside: Set<object> = new Set()): string {
  if (v === null || v === undefined) return 'null'
  if (typeof v === 'boolean') return v ? 'true' : 'false'
  if (typeof v === 'bigint') return v.toString()
  if (v instanceof PyFloat) return pyFloatRepr(v.value)
  if (typeof v === 'number') return Number.isInteger(v) && !Object.is(v, -0) ? String(v) : pyFloatRepr(v)
  if (typeof v === 'string') return JSON.stringify(v).replace(/[\u007f-\uffff]/g, (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, '0')}`)
  if (typeof v === 'object') {
    // json.dump's "Circular reference detected", as a coded error instead of a stack overflow
    if (inside.has(v)) throw new DistcpError('ERR_DISTCP_INVALID_INPUT', 'training info: a cycle (a value contains itself)')
    inside.add(v)
    try {
      if (Array.isArray(v)) return `[${mapItems(v, 'training info', (x) => pyJson(x, inside)).join(', ')}]`
      return `{${Object.entries(v as Record<string, unknown>).map(([k, x]) => `${pyJson(k)}: ${pyJson(x, inside)}`).join(', ')}}`
    } finally {
      inside.delete(v)
    }
  }
  throw new DistcpError('ERR_DISTCP_INVALID_INPUT', `training info: ${typeof v} cannot be written as JSON`)
}

function pyFloatRepr(x: number): string {
  if (Number.isNaN(x)) return 'NaN'
  if (x === Infinity) return 'Infinity'
  if (x === -Infinity) return '-Infinity'
  if (Number.isInteger(x) && Math.abs(x) < 1e16) return `${Object.is(x, -0) ? '-0' : String(x)}.0`
  // JS and Python both print the shortest round-trip digits; Python pads the exponent to two digits
  return String(x).replace(/e([+-])(\d)$/, 'e$10$2')
}

/** Parses JSON as Python's `json.load` does, accepting `NaN`, `Infinity` and `-Infinity`. */
export function parsePyJson(text: string): unknown {
  try {
    return JSON.parse(text)
  } catch {
    // fall through: maybe Python's non-standard constants
  }
  const SENTINEL = '\u0000distcp:'
  let out = ''
  let inString = false
  for (let i = 0; i < text.length; i++) {
    const c = text[i]
    if (inString) {
      out += c
      if (c === '\\') out += text[++i] ?? ''
      else if (c === '"') inString = false
      continue
    }
    if (c === '"') {
      inString = true
      out += c
      continue
    }
    const tok = ['-Infinity', 'Infinity', 'NaN'].find((t) => text.startsWith(t, i))
    if (tok) {
      out += JSON.stringify(SENTINEL + tok)
      i += tok.length - 1
    } else out += c
  }
  return JSON.parse(out, (_k, v: unknown) => {
    if (typeof v === 'string' && v.startsWith(SENTINEL)) {
      const t = v.slice(SENTINEL.length)
      return t === 'NaN' ? NaN : t === 'Infinity' ? Infinity : -Infinity
    }
    return v
  })
}

function syncDir(dir: string): void {
  callNative(() => native.commitSyncDir(dir))
}

function writeDurable(path: string, text: string): void {
  writeFileSync(path, text)
  const fd = openSync(path, 'r+')
  try {
    fsyncSync(fd)
  } finally {
    closeSync(fd)
  }
}

function isDir(p: string): boolean {
  try {
    return statSync(p).isDirectory()
  } catch {
    return false
  }
}

function stepNumber(step: unknown): number {
  if (typeof step !== 'number' || !Number.isSafeInteger(step) || step < 0) {
    throw new DistcpError('ERR_DISTCP_INVALID_INPUT', `a step must be a non-negative integer, not ${String(step)}`)
  }
  return step
}

/**
 * NeMo-RL's `CheckpointManager` with Node's API: `begin` (`init_tmp_checkpoint`), `finalize`
 * (`finalize_checkpoint`), `finalizeAsync` / `pending` / `shutdown` (`begin_finalization` /
 * `finalize_pending` / `shutdown`), `latest` / `best` (`get_latest_checkpoint_path` /
 * `get_best_checkpoint_path`), `resumePaths` (`get_resume_paths`). See the top of src/manager.ts for where it
 * is stricter than NeMo-RL.
 */
export class CheckpointManager {
  readonly dir: string
  readonly savePeriod: number
  readonly keepTopK: number | null
  readonly metricName: string | null
  readonly higherIsBetter: boolean
  readonly keepLatestK: number | null
  #warn: (m: string) => void
  #log: (l: string) => void
  #killInSwap: CheckpointManagerOptions['_testKillInSwap']
  #lock: { release(): void } | undefined
  #pending: Promise<void> | undefined
  #pendingError: unknown
  #hasPending = false
  #deletions: Promise<void> = Promise.resolve()
  #keptForeign = new Set<string>()

  constructor(options: CheckpointManagerOptions) {
    if (typeof options?.dir !== 'string' || options.dir === '') {
      throw new DistcpError('ERR_DISTCP_INVALID_INPUT', 'CheckpointManager: dir must be a folder path')
    }
    const count = (name: string, v: number | null | undefined, min: number): number | null => {
      if (v == null) return null
      if (!Number.isSafeInteger(v) || v < min) {
        throw new DistcpError('ERR_DISTCP_INVALID_INPUT', `CheckpointManager: ${name} must be an integer ≥ ${min}, not ${String(v)}`)
      }
      return v
    }
    this.dir = resolve(options.dir)
    this.savePeriod = count('savePeriod', options.savePeriod ?? 1, 1) ?? 1
    this.keepTopK = count('keepTopK', options.keepTopK, 0)
    this.keepLatestK = count('keepLatestK', options.keepLatestK, 0)
    this.metricName = options.metricName ?? null
    this.higherIsBetter = options.higherIsBetter ?? false
    this.#warn = options.warn ?? ((m) => process.emitWarning(m, 'DistcpCheckpointManager'))
    this.#log = options.log ?? (() => undefined)
    this.#killInSwap = options._testKillInSwap
  }

  #marked(folder: string): boolean {
    return existsSync(join(folder, MANAGER_MARKER))
  }

  #lockRun(): void {
    if (this.#lock) return
    mkdirSync(this.dir, { recursive: true })
    this.#lock = callNative(() => native.FolderLock.acquire(this.dir))
  }

  /** Removes a folder the manager made: out of the step namespace by one rename first, then its files. */
  #removeFolder(folder: string): void {
    const trash = join(this.dir, native.commitTempName(TMP_PREFIX))
    renameSync(folder, trash)
    syncDir(this.dir)
    rmSync(trash, { recursive: true, force: true })
  }

  /**
   * Finishes what a killed manager left: an interrupted swap (`old_step_N`), half-written `tmp_step_*` folders
   * (reported; removed when the manager made them, moved aside when it must reuse the name and did not), and
   * its own temporary folders of dead writers.
   */
  #repair(beginning: number): void {
    for (const name of readdirSync(this.dir)) {
      const path = join(this.dir, name)
      if (name.startsWith(TMP_PREFIX) && native.commitWriterIsDead(name, TMP_PREFIX)) {
        rmSync(path, { recursive: true, force: true })
        continue
      }
      const old = OLD_STEP_RE.exec(name)
      if (old && isDir(path) && this.#marked(path)) {
        const target = join(this.dir, `step_${old[1]}`)
        if (existsSync(target)) this.#removeFolder(path)
        else {
          // killed between the two renames of a swap: the old checkpoint goes back under its name
          renameSync(path, target)
          syncDir(this.dir)
        }
        continue
      }
      const tmp = TMP_STEP_RE.exec(name)
      if (tmp && isDir(path)) {
        if (this.#marked(path)) {
          this.#warn(`removing ${name}: a checkpoint left half-written by an interrupted save`)
          this.#removeFolder(path)
        } else if (Number(tmp[1]) === beginning) {
          const aside = `${name}.orphan-${Date.now()}`
          this.#warn(`${name} was not made by distcp: moved aside to ${aside} (not deleted)`)
          renameSync(path, join(this.dir, aside))
        } else {
          this.#warn(`${name} is a half-written checkpoint that distcp did not make: left as it is`)
        }
      }
    }
    syncDir(this.dir)
  }

  /**
   * Makes `tmp_step_<step>/` holding `training_info.json` (and `config.yaml` when `config` is given: JSON, which
   * YAML readers take) — NeMo-RL's `init_tmp_checkpoint` — and returns it to write the checkpoint into. First
   * waits for a pending finalization and repairs what a killed run left.
   */
  async begin(step: number, trainingInfo: TrainingInfo = {}, options: { config?: unknown } = {}): Promise<StepCheckpoint> {
    const n = stepNumber(step)
    await this.pending()
    this.#lockRun()
    this.#repair(n)
    const staging = join(this.dir, native.commitTempName(TMP_PREFIX))
    mkdirSync(staging)
    writeDurable(join(staging, MANAGER_MARKER), `${pyJson({ created_by: 'distcp', step: n })}\n`)
    writeDurable(join(staging, 'training_info.json'), pyJson(trainingInfo))
    if (options.config !== undefined) writeDurable(join(staging, 'config.yaml'), `${JSON.stringify(options.config, null, 2)}\n`)
    syncDir(staging)
    const path = join(this.dir, `tmp_step_${n}`)
    renameSync(staging, path)
    syncDir(this.dir)
    return { step: n, path, finalPath: join(this.dir, `step_${n}`) }
  }

  #stepOf(step: StepCheckpoint | string): StepCheckpoint {
    if (typeof step !== 'string') return step
    const m = TMP_STEP_RE.exec(step.split(/[\\/]/).filter(Boolean).at(-1) ?? '')
    if (!m) throw new DistcpError('ERR_DISTCP_INVALID_INPUT', `${step}: not a tmp_step_N folder`)
    const n = Number(m[1])
    return { step: n, path: resolve(step), finalPath: join(this.dir, `step_${n}`) }
  }

  /** `tmp_step_N` → `step_N` (through `old_step_N` when `step_N` exists), as NeMo-RL's `_rename_checkpoint`. */
  #rename(s: StepCheckpoint): void {
    if (!isDir(s.path)) throw new DistcpError('ERR_DISTCP_NOT_FOUND', `${s.path}: no such checkpoint to finalize`)
    if (existsSync(s.finalPath)) {
      if (!this.#marked(s.finalPath)) {
        throw new DistcpError('ERR_DISTCP_EXISTS', `${s.finalPath} exists and was not made by distcp: not replacing it`)
      }
      const old = join(this.dir, `old_step_${s.step}`)
      renameSync(s.finalPath, old)
      syncDir(this.dir)
      if (this.#killInSwap === 'aside') process.kill(process.pid, 'SIGKILL')
      renameSync(s.path, s.finalPath)
      syncDir(this.dir)
      if (this.#killInSwap === 'in') process.kill(process.pid, 'SIGKILL')
      this.#removeFolder(old)
    } else {
      renameSync(s.path, s.finalPath)
      syncDir(this.dir)
    }
  }

  /** Renames the checkpoint into place and applies retention (NeMo-RL's `finalize_checkpoint`). Returns `step_N`. */
  async finalize(step: StepCheckpoint | string): Promise<string> {
    const s = this.#stepOf(step)
    await this.pending()
    this.#rename(s)
    this.removeOldCheckpoints({ keep: s.step })
    return s.finalPath
  }

  /**
   * NeMo-RL's `begin_finalization`: waits for the previous finalization (rethrowing its error), then — in the
   * background — waits for `waitFor` (e.g. the `committed` of the saves into this folder), renames the folder
   * into place and queues the retention. The returned promise settles once that has been started; see
   * {@link pending} for its end.
   */
  async finalizeAsync(step: StepCheckpoint | string, waitFor?: PromiseLike<unknown> | (() => PromiseLike<unknown>)): Promise<void> {
    const s = this.#stepOf(step)
    await this.pending()
    this.#hasPending = true
    this.#pending = (async () => {
      try {
        if (waitFor) await (typeof waitFor === 'function' ? waitFor() : waitFor)
        this.#rename(s)
        this.#deletions = this.#deletions.then(() => this.removeOldCheckpoints({ keep: s.step }))
      } catch (e) {
        this.#pendingError = e
      } finally {
        this.#hasPending = false
      }
    })()
  }

  /** Whether a background finalization is running (`has_pending_finalization`). */
  get hasPendingFinalization(): boolean {
    return this.#hasPending
  }

  /** Waits for the background rename, not the deletions; rethrows its error (`finalize_pending`). */
  async pending(): Promise<void> {
    if (this.#pending) {
      await this.#pending
      this.#pending = undefined
    }
    if (this.#pendingError !== undefined) {
      const e = this.#pendingError
      this.#pendingError = undefined
      throw new DistcpError('ERR_DISTCP_FINALIZE', `background checkpoint finalization failed: ${(e as Error)?.message ?? String(e)}`, { cause: e })
    }
  }

  /** Waits for the rename and every queued deletion, then releases the run folder's lock (`shutdown`). */
  async shutdown(): Promise<void> {
    try {
      await this.pending()
      await this.#deletions
    } finally {
      this.#lock?.release()
      this.#lock = undefined
    }
  }

  /** The finalized checkpoints that have a `training_info.json` (`_load_checkpoint_history`), in folder order. */
  history(): CheckpointEntry[] {
    const out: CheckpointEntry[] = []
    let names: string[]
    try {
      names = readdirSync(this.dir)
    } catch {
      return out
    }
    const steps = new Map<number, string>()
    for (const name of names) {
      const m = STEP_RE.exec(name)
      if (m && isDir(join(this.dir, name))) steps.set(Number(m[1]), name)
    }
    // a swap killed between its renames: `old_step_N` is still step N (the next begin renames it back)
    for (const name of names) {
      const m = OLD_STEP_RE.exec(name)
      if (m && !steps.has(Number(m[1])) && isDir(join(this.dir, name))) steps.set(Number(m[1]), name)
    }
    for (const [step, name] of steps) {
      const path = join(this.dir, name)
      let text: string
      try {
        text = readFileSync(join(path, 'training_info.json'), 'utf8')
      } catch {
        continue
      }
      out.push({ step, path, info: (parsePyJson(text) ?? {}) as Record<string, unknown> })
    }
    return out
  }

  /** The checkpoint with the highest step (`get_latest_checkpoint_path`), or null. */
  latest(): string | null {
    let best: { step: number; path: string } | undefined
    let names: string[]
    try {
      names = readdirSync(this.dir)
    } catch {
      return null
    }
    const have = new Set<number>()
    for (const name of names) {
      const m = STEP_RE.exec(name)
      if (m && isDir(join(this.dir, name))) have.add(Number(m[1]))
    }
    for (const name of names) {
      const m = STEP_RE.exec(name) ?? OLD_STEP_RE.exec(name)
      if (!m || !isDir(join(this.dir, name))) continue
      const step = Number(m[1])
      if (name.startsWith('old_') && have.has(step)) continue
      if (!best || step > best.step) best = { step, path: join(this.dir, name) }
    }
    return best?.path ?? null
  }

  /** The checkpoint with the best metric, ties to the later step (`get_best_checkpoint_path`), or null. */
  best(): string | null {
    const history = this.history()
    if (history.length === 0) return null
    const metric = this.metricName
    const valid = metric === null ? [] : history.filter((c) => Object.hasOwn(c.info, metric))
    if (valid.length < history.length) {
      const ignored = history.filter((c) => !valid.includes(c)).map((c) => c.step)
      this.#warn(`ignoring ${ignored.length} checkpoint(s) at step(s) [${ignored.join(', ')}] without metric '${metric}'`)
    }
    if (valid.length === 0) {
      this.#warn(`no checkpoint has metric '${metric}': returning the latest checkpoint`)
      return this.latest()
    }
    const m = (c: CheckpointEntry) => c.info[metric as string] as number
    valid.sort((a, b) => (this.higherIsBetter ? m(b) - m(a) || b.step - a.step : m(a) - m(b) || b.step - a.step))
    return valid[0].path
  }

  /** Weights and optimizer folders of a checkpoint (default: the latest), NeMo-RL's `get_resume_paths`. */
  resumePaths(checkpoint: string | null = this.latest(), component: 'policy' | 'value' = 'policy'): ResumePaths {
    if (!checkpoint) return { weightsPath: null, optimizerPath: null }
    const weightsPath = join(checkpoint, component, 'weights')
    const optimizerPath = join(checkpoint, component, 'optimizer')
    if (existsSync(optimizerPath)) return { weightsPath, optimizerPath }
    this.#warn(`optimizer state not found at ${optimizerPath}: the optimizer will be freshly initialized`)
    return { weightsPath, optimizerPath: null }
  }

  /** The `training_info.json` of a checkpoint (`load_training_info`), or null without a checkpoint. */
  loadTrainingInfo(checkpoint: string | null): Record<string, unknown> | null {
    if (checkpoint == null) return null
    return parsePyJson(readFileSync(join(checkpoint, 'training_info.json'), 'utf8')) as Record<string, unknown>
  }

  /**
   * The steps NeMo-RL's `remove_old_checkpoints` keeps of `history` (a union: the latest when `excludeLatest`;
   * periodic steps — the `keepTopK` best of them when set; the `keepLatestK` most recent). Null: all are kept.
   */
  retained(history: readonly { step: number; info: Record<string, unknown> }[], excludeLatest = true): Set<number> | null {
    if (history.length === 0 || (this.keepTopK === null && this.keepLatestK === null)) return null
    const keep = new Set<number>()
    if (excludeLatest) keep.add(Math.max(...history.map((c) => c.step)))
    const periodic = history.filter((c) => c.step % this.savePeriod === 0)
    if (this.keepTopK !== null) {
      const metric = this.metricName
      if (metric === null) periodic.sort((a, b) => b.step - a.step)
      else {
        const value = (c: { info: Record<string, unknown> }, missing: number) =>
          Object.hasOwn(c.info, metric) ? (c.info[metric] as number) : missing
        if (this.higherIsBetter) {
          periodic.sort((a, b) => cmp(value(b, -Infinity), value(a, -Infinity)) || b.step - a.step)
        } else {
          periodic.sort((a, b) => cmp(value(a, Infinity), value(b, Infinity)) || b.step - a.step)
        }
      }
      for (const c of periodic.slice(0, this.keepTopK)) keep.add(c.step)
    } else {
      for (const c of periodic) keep.add(c.step)
    }
    if (this.keepLatestK !== null) {
      for (const c of [...history].sort((a, b) => b.step - a.step).slice(0, this.keepLatestK)) keep.add(c.step)
    }
    return keep
  }

  /**
   * Deletes the checkpoints retention does not keep (see {@link retained}), only those the manager made, never
   * `keep` (the step just finalized). Failures are warnings, never errors.
   */
  removeOldCheckpoints(options: { excludeLatest?: boolean; keep?: number } = {}): void {
    try {
      const history = this.history()
      const keep = this.retained(history, options.excludeLatest ?? true)
      if (!keep) return
      if (options.keep !== undefined) keep.add(options.keep)
      for (const c of history) {
        if (keep.has(c.step)) continue
        if (!this.#marked(c.path)) {
          if (!this.#keptForeign.has(c.path)) {
            this.#keptForeign.add(c.path)
            this.#warn(`keeping ${c.path} (step ${c.step}) beyond retention: distcp did not make it`)
          }
          continue
        }
        this.#log(`Removing checkpoint ${c.path} (step ${c.step})`)
        try {
          this.#removeFolder(c.path)
        } catch (e) {
          this.#warn(`failed to remove old checkpoint ${c.path}: ${(e as Error)?.message ?? String(e)}`)
        }
      }
    } catch (e) {
      this.#warn(`failed to prune old checkpoints: ${(e as Error)?.message ?? String(e)}`)
    }
  }
}

/** Python's `<` on two numbers as a sort comparator (NaN compares as neither smaller nor larger). */
function cmp(a: number, b: number): number {
  return a < b ? -1 : a > b ? 1 : 0
}
