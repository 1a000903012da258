// saveAsync: torch's `dcp.async_save` for Node trainers. The call stages (copies every tensor's bytes into reused
// staging blocks, see staging.ts) and returns; the write runs behind on a worker thread. Writes are serialised:
// at most one save writes at a time, and at most `maxStaged` more wait staged behind it — never two writers.
import { DistcpError, type DistcpErrorCode } from './errors.js'
import { stageSave, writeStaged, type SaveOptions, type SaveResult, type SaveStateDict, type StagedSave } from './save.js'
import { stageRanks, type StagedRanks } from './distributed/save.js'
import { stagingPool, type StagingPool } from './staging.js'

/** What {@link saveAsync} reports once the copy is done. */
export interface StagedInfo {
  /** Bytes copied into staging memory. */
  bytes: number
  /** Milliseconds from the call until the copy was done (what the trainer was blocked, waiting included). */
  ms: number
}

/** The two moments of an asynchronous save. */
export interface AsyncSave {
  /**
   * Settles when every tensor has been copied into distcp's staging memory: from then on the caller may change
   * its buffers. When the saver is idle this is already true when `saveAsync` returns (the copy runs in the call),
   * unless a top-level value's `stateDict()` is asynchronous.
   */
  staged: Promise<StagedInfo>
  /** Settles when the files are written and fsynced and `.metadata` is renamed into place (or the save failed). */
  committed: Promise<SaveResult>
}

/** Options of {@link saveAsync}: those of `save`, plus what to do when a save is already in flight. */
export interface AsyncSaveOptions extends SaveOptions {
  /**
   * When another save of the same saver has not committed yet: `'wait'` (default) queues this one behind it (it
   * stages at once if a staging slot is free, else when one frees), `'reject'` rejects both promises with
   * `ERR_DISTCP_BUSY` and changes nothing.
   */
  ifBusy?: 'wait' | 'reject'
}

/** Options of an {@link AsyncSaver}. */
export interface AsyncSaverOptions {
  /**
   * How many saves may be staged and waiting while one writes (default 1: a trainer that saves again before the
   * last write finished is not blocked, at the cost of a second copy of its state in memory). With 0, a save
   * stages only when the one before it has committed.
   */
  maxStaged?: number
  /** Where staging blocks come from (default: the process-wide pool that `save` uses too). */
  pool?: StagingPool
}

/** Counters of an {@link AsyncSaver}. */
export interface AsyncSaverStats {
  /** Saves not yet settled (staging, staged and waiting, or writing). */
  inFlight: number
  /** Whether a write is running now. */
  writing: boolean
  committed: number
  failed: number
  cancelled: number
}

interface Job {
  checkpointId: string
  started: boolean
  /** Set by `close({ cancel: true })` before the job started writing: it rejects with this at its next step. */
  cancelled?: DistcpError
}

/**
 * A queue of asynchronous saves with one writer. {@link saveAsync} uses a process-wide one; make your own to
 * give a subsystem its own queue (it still shares the staging pool unless given another).
 */
export class AsyncSaver {
  readonly maxStaged: number
  readonly pool: StagingPool
  /** Settles when the last queued write has settled. */
  #tail: Promise<void> = Promise.resolve()
  /** Settles when the most recent job has left its staging slot (started writing or failed). */
  #slotTail: Promise<void> = Promise.resolve()
  #jobs = new Set<Job>()
  /** Jobs holding a staging slot: staged (or staging) and not yet writing. */
  #waiting = 0
  #writing = false
  #closed = false
  #counts = { committed: 0, failed: 0, cancelled: 0 }

  constructor(options: AsyncSaverOptions = {}) {
    const m = options.maxStaged ?? 1
    if (!Number.isSafeInteger(m) || m < 0) {
      throw new DistcpError('ERR_DISTCP_INVALID_INPUT', `AsyncSaver: maxStaged must be a non-negative integer, not ${String(m)}`)
    }
    this.maxStaged = m
    this.pool = options.pool ?? stagingPool
  }

  stats(): AsyncSaverStats {
    return { inFlight: this.#jobs.size, writing: this.#writing, ...this.#counts }
  }

  /** Whether any save has not settled yet. */
  get busy(): boolean {
    return this.#jobs.size > 0
  }

  /** Starts an asynchronous save; see {@link saveAsync}. */
  save(stateDict: SaveStateDict, options: AsyncSaveOptions): AsyncSave {
    const t0 = performance.now()
    const checkpointId = String(options?.checkpointId)
    const refuse = (code: DistcpErrorCode, msg: string): AsyncSave => {
      const e = new DistcpError(code, `${checkpointId}: ${msg}`)
      const staged = Promise.reject(e)
      staged.catch(() => undefined)
      return { staged, committed: Promise.reject(e) }
    }
    if (this.#closed) return refuse('ERR_DISTCP_CLOSED', 'the async saver is closed')
    if (options?.ifBusy !== undefined && options.ifBusy !== 'wait' && options.ifBusy !== 'reject') {
      return refuse('ERR_DISTCP_INVALID_INPUT', `ifBusy must be 'wait' or 'reject', not ${String(options.ifBusy)}`)
    }
    if (options?.ifBusy === 'reject' && this.busy) {
      return refuse('ERR_DISTCP_BUSY', `another save is in flight (${this.#jobs.size} not committed)`)
    }

    const job: Job = { checkpointId, started: false }
    this.#jobs.add(job)

    // A staging slot. With maxStaged ≥ 1 a job holds one from its call until its write starts, and there are
    // maxStaged of them, plus one for the job about to write while nothing writes; with maxStaged = 0 a job
    // holds the only slot until its write has settled (a save stages only after the one before it committed).
    const holdThroughWrite = this.maxStaged === 0
    const capacity = holdThroughWrite ? 1 : this.maxStaged + (this.#writing ? 0 : 1)
    const slotFree = this.#waiting < capacity
    const slotBefore = this.#slotTail
    let leaveSlot!: () => void
    this.#slotTail = new Promise<void>((r) => (leaveSlot = r))
    this.#waiting++
    let slotLeft = false
    const leave = () => {
      if (slotLeft) return
      slotLeft = true
      this.#waiting--
      leaveSlot()
    }

    // with a process group this rank stages its part, and the write coordinates with the other ranks (a staging
    // failure on this rank still goes through that write, so that every rank rejects with it, as in `save`)
    const pg = options?.processGroup
    const doStage = (): Promise<StagedSave | StagedRanks> => {
      if (job.cancelled) return Promise.reject(job.cancelled)
      if (pg) {
        const { layout, useCollectives } = options
        return stageRanks(stateDict, { checkpointId, processGroup: pg, layout, useCollectives, background: true }, this.pool)
      }
      return stageSave(stateDict, options, this.pool)
    }
    // when a slot is free the copy runs in this call (staging is synchronous up to its first await)
    const staging: Promise<StagedSave | StagedRanks> = slotFree ? doStage() : slotBefore.then(doStage)
    const staged = staging.then((s) => {
      if ('error' in s && s.error !== undefined) throw s.error
      return { bytes: s.lease?.bytes ?? 0, ms: performance.now() - t0 }
    })
    staged.catch(() => undefined)

    const writeBefore = this.#tail
    const committed = (async (): Promise<SaveResult> => {
      let s: StagedSave | StagedRanks | undefined
      try {
        s = await staging
        await writeBefore
        if (job.cancelled) throw job.cancelled
      } catch (e) {
        leave()
        s?.lease?.release()
        this.#jobs.delete(job)
        if (e instanceof DistcpError && e.code === 'ERR_DISTCP_CANCELLED') this.#counts.cancelled++
        else this.#counts.failed++
        throw e
      }
      job.started = true
      this.#writing = true
      if (!holdThroughWrite) leave()
      try {
        const r = 'write' in s ? await s.write() : await writeStaged(s, { background: true })
        this.#counts.committed++
        return r
      } catch (e) {
        this.#counts.failed++
        throw e
      } finally {
        this.#writing = false
        this.#jobs.delete(job)
        leave()
      }
    })()
    this.#tail = committed.then(
      () => undefined,
      () => undefined,
    )
    return { staged, committed }
  }

  /**
   * Waits until every save has settled (`cancel: false`, default), or rejects the saves that have not started
   * writing with `ERR_DISTCP_CANCELLED` and waits for the one writing (`cancel: true`: a write is never cut
   * short — it is atomic anyway, and a kill -9 leaves the previous checkpoint). New saves are refused with
   * `ERR_DISTCP_CLOSED` from the call on.
   */
  async close(options: { cancel?: boolean } = {}): Promise<void> {
    this.#closed = true
    if (options.cancel) {
      for (const j of this.#jobs) {
        if (!j.started) j.cancelled = new DistcpError('ERR_DISTCP_CANCELLED', `${j.checkpointId}: save cancelled before it was written`)
      }
    }
    await this.#tail
  }

  /** Waits until every save queued so far has settled (errors are reported through their own promises). */
  async drain(): Promise<void> {
    await this.#tail
  }

  /**
   * Makes `signals` (default SIGINT and SIGTERM) finish the saves before the process ends: on the signal the
   * saver is closed (draining, or cancelling what has not started with `mode: 'cancel'`), then the signal is
   * raised again with its default action. Returns a function that removes the handlers. Without this a signal
   * ends the process at once — the checkpoint being written is then absent and the previous one intact.
   */
  exitOnSignals(options: { signals?: NodeJS.Signals[]; mode?: 'drain' | 'cancel' } = {}): () => void {
    const signals = options.signals ?? ['SIGINT', 'SIGTERM']
    const handler = (sig: NodeJS.Signals) => {
      remove()
      void this.close({ cancel: options.mode === 'cancel' }).finally(() => process.kill(process.pid, sig))
    }
    const remove = () => {
      for (const s of signals) process.off(s, handler)
    }
    for (const s of signals) process.on(s, handler)
    return remove
  }
}

let defaultSaver: AsyncSaver | undefined

/** The process-wide saver behind {@link saveAsync}. */
export function asyncSaver(): AsyncSaver {
  if (!defaultSaver) {
    const saver = new AsyncSaver()
    defaultSaver = saver
    // process.exit() cannot wait: say which checkpoints were not committed (each is absent; the previous one
    // in its folder is intact)
    process.once('exit', () => {
      if (saver.busy) {
        process.emitWarning(`distcp: the process exits with ${saver.stats().inFlight} checkpoint save(s) not committed`)
      }
    })
  }
  return defaultSaver
}

/**
 * Saves a state dict like `save`, letting the caller go on while it is written: `staged` settles when the bytes
 * are copied into distcp's (reused) staging memory — normally before `saveAsync` returns — and `committed` when
 * the checkpoint is on disk. Saves are written one at a time in call order (a second waits, or is refused with
 * `ifBusy: 'reject'`). The checkpoint folder is replaced crash-safely: killed mid-write, the previous checkpoint
 * stays. With `processGroup`, each rank stages its part in the call and the ranks coordinate as they write (as
 * `save` with a process group; torch's `dcp.async_save`); every rank must queue its saves in the same order.
 */
export function saveAsync(stateDict: SaveStateDict, options: AsyncSaveOptions): AsyncSave {
  return asyncSaver().save(stateDict, options)
}

/** Closes the process-wide saver: see {@link AsyncSaver.close}. */
export function closeAsyncSaves(options: { cancel?: boolean } = {}): Promise<void> {
  return defaultSaver ? defaultSaver.close(options) : Promise.resolve()
}
