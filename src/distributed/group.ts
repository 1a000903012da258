/**
 * A process group of Node ranks coordinated through c10d's TCPStore, as torch's `init_process_group('env://')`
 * sets one up under torchrun, and the store-based collectives DCP needs (c10d's `StoreCollectives` scheme: each rank
 * publishes under its own key, the root waits for all of them; a payload over the store's 8 MiB value limit is
 * split into parts). Every collective has a timeout, and a timeout names the ranks that never arrived.
 */
import { DistcpError, type DistcpErrorCode } from '../errors.js'
import { checkTimeoutMs, MAX_KEYS_PER_REQUEST, MAX_TIMEOUT_MS, MAX_VALUE_BYTES, TcpStore, TcpStoreServer } from './store.js'

/** What a collective value's head key carries after its 8-byte part count. */
const HEAD_BYTES = MAX_VALUE_BYTES - 8
/**
 * The most further parts one rank's collective value may have: 512 × 8 MiB = 4 GiB, what one Node `Buffer` holds on
 * Node 20. A head announcing more is refused before any part is asked for (100,000 announced parts used to cost a
 * CHECK of 100,000 keys, seconds on a loaded machine, before the error).
 */
const MAX_COLLECTIVE_PARTS = 512
/** A collective waits for every rank's key in one `WAIT`, which the store refuses beyond this many keys. */
const MAX_WORLD_SIZE = MAX_KEYS_PER_REQUEST

/** How to join (or form) a group; each field defaults to torchrun's environment variable. */
export interface ProcessGroupOptions {
  /** `RANK`. */
  rank?: number
  /** `WORLD_SIZE`. */
  worldSize?: number
  /** `LOCAL_RANK` (default: `rank`). */
  localRank?: number
  /** `MASTER_ADDR` (default `127.0.0.1`). */
  masterAddr?: string
  /** `MASTER_PORT`. */
  masterPort?: number
  /**
   * Whether the launcher's agent already serves the store at `masterAddr:masterPort`
   * (`TORCHELASTIC_USE_AGENT_STORE=True`, as torchrun sets); otherwise rank 0 hosts it, as torch does.
   */
  useAgentStore?: boolean
  /** Bounds connecting and every collective (default 300 000 ms, torch's store timeout). */
  timeoutMs?: number
  /** Namespace of this group's keys in the store (default `distcp/<TORCHELASTIC_RESTART_COUNT>`). */
  prefix?: string
}

/** Every rank failed together: `failures` maps each failed rank to why (torch's `CheckpointException`). */
export class CheckpointError extends DistcpError {
  readonly step: string
  readonly failures: Record<number, string>

  constructor(step: string, failures: Record<number, string>, code: DistcpErrorCode = 'ERR_DISTCP_RANK_FAILED') {
    const list = Object.entries(failures)
      .map(([r, why]) => `rank ${r}: ${why}`)
      .join('; ')
    super(code, `step \`${step}\` failed on ${Object.keys(failures).length} rank(s): ${list}`)
    this.name = 'CheckpointError'
    this.step = step
    this.failures = failures
  }
}

/** A collective that did not complete in time; `missing` are the ranks that never arrived. */
export class CollectiveTimeoutError extends DistcpError {
  readonly missing: number[]
  constructor(message: string, missing: number[]) {
    super('ERR_DISTCP_COLLECTIVE_TIMEOUT', message)
    this.name = 'CollectiveTimeoutError'
    this.missing = missing
  }
}

/**
 * What each rank sends rank 0 in {@link ProcessGroup.reduceScatter} / `allReduce`, and rank 0's answer; both carry
 * the sender's world size, so ranks started with different `WORLD_SIZE`s fail naming it instead of rank 0
 * committing a checkpoint without the ranks it does not know of.
 */
type Outcome<T> = ({ ok: T } | { err: string }) & { world?: unknown }
type Verdict<R> = ({ ok: R } | { fail: Record<number, string> }) & { world?: unknown }

function envInt(name: string): number | undefined {
  const v = process.env[name]
  if (v === undefined || v === '') return undefined
  const n = Number(v)
  if (!Number.isSafeInteger(n) || n < 0) throw new DistcpError('ERR_DISTCP_INVALID_INPUT', `${name}=${v} is not a non-negative integer`)
  return n
}

/** A peer's JSON message, or `null` when it is not JSON of an object that `ok` accepts. */
function parseJson<X>(body: Buffer, ok: (x: Record<string, unknown>) => boolean): X | null {
  try {
    const x = JSON.parse(body.toString('utf8')) as unknown
    return typeof x === 'object' && x !== null && !Array.isArray(x) && ok(x as Record<string, unknown>) ? (x as X) : null
  } catch {
    return null
  }
}

function message(e: unknown): string {
  if (e instanceof DistcpError) return `[${e.code}] ${e.message}`
  return e instanceof Error ? e.message : String(e)
}

/** A group of ranks sharing one TCPStore. Collectives must be called by every rank in the same order. */
export class ProcessGroup {
  readonly rank: number
  readonly worldSize: number
  readonly localRank: number
  readonly store: TcpStore
  readonly timeoutMs: number
  readonly #server: TcpStoreServer | null
  /** Rank 0 serves the store (no launcher agent store): losing the store means rank 0 is gone. */
  readonly #rank0HostsStore: boolean
  readonly #prefix: string
  #seq = 0
  /**
   * Keys this rank wrote that several ranks read (barrier, broadcast, allGather): removed by this rank once a later
   * collective that every rank joined proves that every rank is past them. Keys with one reader (gather, scatter,
   * the steps of reduceScatter/allReduce) are removed by that reader. So a trainer that saves every few minutes for
   * weeks does not grow the store (the launcher's, which outlives the job's groups, or rank 0's).
   */
  #lingering: string[] = []

  /** @internal use {@link initProcessGroup} */
  constructor(
    rank: number,
    worldSize: number,
    localRank: number,
    store: TcpStore,
    server: TcpStoreServer | null,
    timeoutMs: number,
    prefix: string,
    rank0HostsStore = false,
  ) {
    this.rank = rank
    this.worldSize = worldSize
    this.localRank = localRank
    this.store = store
    this.#server = server
    this.#rank0HostsStore = rank0HostsStore
    this.timeoutMs = timeoutMs
    this.#prefix = prefix
  }

  #key(name: string): string {
    return `${this.#prefix}/${this.#seq++}/${name}`
  }

  /**
   * Writes `data` under `key`: the head `key/n` holds a u64 count of further parts and the first
   * `MAX_VALUE_BYTES - 8` bytes; larger data goes to `key/p1…` first, so whoever sees the head finds every part.
   * `shared`: several ranks read it (see `#lingering`).
   */
  async #put(key: string, data: Uint8Array, shared = false): Promise<void> {
    const first = data.subarray(0, HEAD_BYTES)
    const rest: Uint8Array[] = []
    for (let at = HEAD_BYTES; at < data.length; at += MAX_VALUE_BYTES) rest.push(data.subarray(at, at + MAX_VALUE_BYTES))
    if (rest.length > MAX_COLLECTIVE_PARTS) {
      throw new DistcpError(
        'ERR_DISTCP_STORE_VALUE_TOO_LARGE',
        `collective value \`${key}\` is ${data.length} bytes, over the ${HEAD_BYTES + MAX_COLLECTIVE_PARTS * MAX_VALUE_BYTES} one rank may send (MAX_COLLECTIVE_PARTS)`,
      )
    }
    const names = rest.map((_, i) => `${key}/p${i + 1}`)
    if (rest.length) await this.store.multiSet(names, rest)
    const head = Buffer.allocUnsafe(8 + first.length)
    head.writeBigUInt64LE(BigInt(rest.length), 0)
    head.set(first, 8)
    await this.store.set(`${key}/n`, head)
    if (shared) this.#lingering.push(...names, `${key}/n`)
  }

  /**
   * Reads what `#put` wrote under each of `keys`, whose heads the caller already waited for: one round trip
   * whatever the number of keys (two when some value passed `HEAD_BYTES`). `consume` (the only reader) removes them,
   * pipelined: the replies are read before the next request's, not waited for here.
   */
  async #takeAll(keys: string[], consume = false): Promise<Buffer[]> {
    const heads = await this.store.multiGetReady(keys.map((k) => `${k}/n`))
    const extra = heads.map((h, i) => {
      const n = h.length >= 8 ? h.readBigUInt64LE(0) : -1n
      if (n < 0n) throw new DistcpError('ERR_DISTCP_STORE_PROTOCOL', `collective key ${keys[i]}/n (${h.length} bytes) does not start with a part count`)
      if (n > BigInt(MAX_COLLECTIVE_PARTS)) {
        throw new DistcpError('ERR_DISTCP_STORE_PROTOCOL', `collective key ${keys[i]}/n announces ${n} parts, over the ${MAX_COLLECTIVE_PARTS} a distcp rank sends (MAX_COLLECTIVE_PARTS)`)
      }
      return Number(n)
    })
    const names = keys.flatMap((k, i) => Array.from({ length: extra[i] }, (_, j) => `${k}/p${j + 1}`))
    // `#put` writes the parts before the head; a head naming parts that are not there (a peer that is not distcp, or
    // a buggy one) must be an error naming it, not a MULTI_GET of a missing key, which costs this rank its connection
    // (one CHECK for every part, one request allows; only when it fails, one per key to name the culprit)
    if (names.length && (names.length > MAX_KEYS_PER_REQUEST || !(await this.store.check(names)))) {
      for (let i = 0; i < keys.length; i++) {
        if (extra[i] && !(await this.store.check(Array.from({ length: extra[i] }, (_, j) => `${keys[i]}/p${j + 1}`)))) {
          throw new DistcpError('ERR_DISTCP_STORE_PROTOCOL', `collective key ${keys[i]}/n announces ${extra[i]} part(s) that are not all in the store`)
        }
      }
    }
    const parts = names.length ? await this.store.multiGetReady(names) : []
    if (consume) void this.store.deleteKeys([...names, ...keys.map((k) => `${k}/n`)]).catch(() => undefined)
    let at = 0
    return heads.map((h, i) => {
      const body = h.subarray(8)
      return extra[i] === 0 ? body : Buffer.concat([body, ...parts.slice(at, (at += extra[i]))])
    })
  }

  async #take(key: string, consume = false): Promise<Buffer> {
    return (await this.#takeAll([key], consume))[0]
  }

  /**
   * Runs a collective that every rank joins; once it is done, every rank is past every earlier collective, so the
   * shared keys this rank wrote before it are removed.
   */
  async #everyone<R>(step: string, run: () => Promise<R>): Promise<R> {
    const earlier = this.#lingering.splice(0)
    let r: R
    try {
      r = await run()
    } catch (e) {
      // where rank 0 hosts the store, a lost store is rank 0 lost (killed, crashed): say so as any other failed
      // rank, so that every surviving rank rejects naming it (with a launcher's agent store, a dead rank 0 shows
      // as one that never reports instead)
      if (this.rank !== 0 && this.#rank0HostsStore && e instanceof DistcpError && e.code === 'ERR_DISTCP_STORE_CLOSED') {
        throw new CheckpointError(step, { 0: `it hosted the store ${this.store.host}:${this.store.port}, which closed: ${e.message}` })
      }
      throw e
    }
    // pipelined, as in #takeAll: the next request's reply waits behind these, this collective does not
    if (earlier.length) void this.store.deleteKeys(earlier).catch(() => undefined)
    return r
  }

  /** Waits for `key/{r}/n` of every rank in `ranks`; on timeout lists the ranks whose key never came. */
  async #arrivals(key: string, ranks: number[], timeoutMs: number): Promise<number[]> {
    const keys = ranks.map((r) => `${key}/${r}/n`)
    try {
      await this.store.wait(keys, timeoutMs)
      return []
    } catch (e) {
      if (!(e instanceof DistcpError) || e.code !== 'ERR_DISTCP_STORE_TIMEOUT') throw e
    }
    const missing: number[] = []
    for (let i = 0; i < ranks.length; i++) if (!(await this.store.check([keys[i]]))) missing.push(ranks[i])
    // an empty list here means everything arrived just after the timeout
    return missing
  }

  #timeout(what: string, missing: number[], timeoutMs: number): CollectiveTimeoutError {
    return new CollectiveTimeoutError(
      `${what}: rank(s) ${missing.join(', ')} of ${this.worldSize} did not arrive within ${timeoutMs} ms (store ${this.store.host}:${this.store.port}, seen from rank ${this.rank})`,
      missing,
    )
  }

  /** Every rank's `data` on `root` (in rank order), `null` elsewhere. */
  async gather(data: Uint8Array, options: { root?: number; timeoutMs?: number } = {}): Promise<Buffer[] | null> {
    const { root = 0, timeoutMs = this.timeoutMs } = options
    const key = this.#key('gather')
    await this.#put(`${key}/${this.rank}`, data)
    if (this.rank !== root) return null
    const all = [...Array(this.worldSize).keys()]
    const missing = await this.#arrivals(key, all, timeoutMs)
    if (missing.length) throw this.#timeout('gather', missing, timeoutMs)
    return this.#takeAll(all.map((r) => `${key}/${r}`), true)
  }

  /** `root` sends `parts[r]` to rank r. */
  async scatter(parts: Uint8Array[] | null, options: { root?: number; timeoutMs?: number } = {}): Promise<Buffer> {
    const { root = 0, timeoutMs = this.timeoutMs } = options
    const key = this.#key('scatter')
    if (this.rank === root) {
      if (!parts || parts.length !== this.worldSize) {
        throw new DistcpError('ERR_DISTCP_INVALID_ARGUMENT', `scatter: the root needs ${this.worldSize} parts`)
      }
      for (let r = 0; r < this.worldSize; r++) if (r !== root) await this.#put(`${key}/${r}`, parts[r])
      return Buffer.from(parts[root])
    }
    const missing = await this.#arrivals(key, [this.rank], timeoutMs)
    if (missing.length) throw this.#timeout(`scatter from rank ${root}`, [root], timeoutMs)
    return this.#take(`${key}/${this.rank}`, true)
  }

  /** `root`'s `data` on every rank. */
  async broadcast(data: Uint8Array | null, options: { root?: number; timeoutMs?: number } = {}): Promise<Buffer> {
    const { root = 0, timeoutMs = this.timeoutMs } = options
    const key = this.#key('broadcast')
    if (this.rank === root) {
      if (!data) throw new DistcpError('ERR_DISTCP_INVALID_ARGUMENT', 'broadcast: the root needs data')
      await this.#put(`${key}/${root}`, data, true)
      return Buffer.from(data)
    }
    const missing = await this.#arrivals(key, [root], timeoutMs)
    if (missing.length) throw this.#timeout(`broadcast from rank ${root}`, [root], timeoutMs)
    return this.#take(`${key}/${root}`)
  }

  /** Every rank's `data`, on every rank. */
  async allGather(data: Uint8Array, options: { timeoutMs?: number } = {}): Promise<Buffer[]> {
    const { timeoutMs = this.timeoutMs } = options
    const key = this.#key('allgather')
    return this.#everyone('allGather', async () => {
      await this.#put(`${key}/${this.rank}`, data, true)
      const all = [...Array(this.worldSize).keys()]
      const missing = await this.#arrivals(key, all, timeoutMs)
      if (missing.length) throw this.#timeout('allGather', missing, timeoutMs)
      return this.#takeAll(all.map((r) => `${key}/${r}`))
    })
  }

  /** Returns once every rank has called it; the error lists the ranks that did not within the timeout. */
  async barrier(options: { timeoutMs?: number } = {}): Promise<void> {
    const { timeoutMs = this.timeoutMs } = options
    const key = this.#key('barrier')
    await this.#everyone('barrier', async () => {
      await this.store.set(`${key}/${this.rank}/n`, '0')
      this.#lingering.push(`${key}/${this.rank}/n`)
      const all = [...Array(this.worldSize).keys()]
      const missing = await this.#arrivals(key, all, timeoutMs)
      if (missing.length) throw this.#timeout('barrier', missing, timeoutMs)
    })
  }

  /**
   * torch's `_DistWrapper.reduce_scatter`: every rank runs `local` (an error becomes a value), the root gathers the
   * outcomes; if any rank failed or never arrived, every rank rejects with the same {@link CheckpointError};
   * otherwise the root's `reduce` gives one result per rank.
   */
  async reduceScatter<T, R>(step: string, local: () => Promise<T>, reduce: (all: T[]) => Promise<R[]> | R[]): Promise<R> {
    return this.#everyone(step, async () => {
      const verdicts = await this.#decide<T, R[]>(step, local, reduce)
      return this.#spread(step, verdicts, (v) => ('ok' in v ? v.ok.map((ok) => ({ ok })) : this.#copies(v)))
    })
  }

  /** torch's `_DistWrapper.all_reduce`: as {@link reduceScatter}, with one result for every rank. */
  async allReduce<T, R>(step: string, local: () => Promise<T>, reduce: (all: T[]) => Promise<R> | R): Promise<R> {
    return this.#everyone(step, async () => {
      const verdict = await this.#decide<T, R>(step, local, reduce)
      return this.#spread(step, verdict, (v) => ('ok' in v ? Array.from({ length: this.worldSize }, () => v) : this.#copies(v)))
    })
  }

  #copies<X>(v: Verdict<X>): Verdict<never>[] {
    return Array.from({ length: this.worldSize }, () => v as Verdict<never>)
  }

  async #decide<T, R>(step: string, local: () => Promise<T>, reduce: (all: T[]) => Promise<R> | R): Promise<Verdict<R> | null> {
    let outcome: Outcome<T>
    try {
      outcome = { ok: await local() }
    } catch (e) {
      outcome = { err: message(e) }
    }
    const key = this.#key(`${step}/gather`)
    await this.#put(`${key}/${this.rank}`, Buffer.from(JSON.stringify({ ...outcome, world: this.worldSize })))
    if (this.rank !== 0) return null
    const all = [...Array(this.worldSize).keys()]
    const failures: Record<number, string> = {}
    const missing = await this.#arrivals(key, all, this.timeoutMs)
    for (const r of missing) failures[r] = `did not report within ${this.timeoutMs} ms (crashed, killed or hung)`
    const outcomes: Outcome<T>[] = []
    const present = all.filter((r) => !missing.includes(r))
    const bodies = await this.#takeAll(present.map((r) => `${key}/${r}`), true)
    present.forEach((r, i) => {
      // `{}` is `{ ok: undefined }` once through JSON
      const o = parseJson<Outcome<T>>(bodies[i], (x) => !('err' in x) || typeof x.err === 'string')
      if (!o) failures[r] = `sent an outcome that is not distcp's (${bodies[i].length} bytes, not a JSON {"ok"} or {"err"})`
      else if (o.world !== this.worldSize) failures[r] = this.#otherWorld(o.world, 0)
      else if ('err' in o) failures[r] = o.err
      else outcomes[r] = o
    })
    if (Object.keys(failures).length) return { fail: failures }
    try {
      return { ok: await reduce(outcomes.map((o) => (o as { ok: T }).ok)) }
    } catch (e) {
      return { fail: { 0: message(e) } }
    }
  }

  async #spread<X, R>(step: string, verdict: Verdict<X> | null, split: (v: Verdict<X>) => Verdict<R>[]): Promise<R> {
    const key = this.#key(`${step}/result`)
    let mine: Verdict<R>
    if (this.rank === 0) {
      const parts = split(verdict as Verdict<X>)
      const bodies = parts.map((p) => Buffer.from(JSON.stringify({ ...p, world: this.worldSize })))
      for (let r = 1; r < this.worldSize; r++) await this.#put(`${key}/${r}`, bodies[r])
      mine = parts[0]
    } else {
      // rank 0 answers after its own wait for the slowest rank: allow for both
      const wait = Math.min(2 * this.timeoutMs + 1000, MAX_TIMEOUT_MS)
      const missing = await this.#arrivals(key, [this.rank], wait)
      if (missing.length) {
        throw new CheckpointError(step, { 0: `rank 0 did not answer within ${wait} ms (store ${this.store.host}:${this.store.port})` })
      }
      const body = await this.#take(`${key}/${this.rank}`, true)
      const v = parseJson<Verdict<R>>(body, (x) => !('fail' in x) || (typeof x.fail === 'object' && x.fail !== null))
      if (!v) throw new CheckpointError(step, { 0: `answered with a verdict that is not distcp's (${body.length} bytes, not a JSON {"ok"} or {"fail"})` })
      mine = v
    }
    if ('fail' in mine) throw new CheckpointError(step, mine.fail)
    if (this.rank !== 0 && mine.world !== this.worldSize) throw new CheckpointError(step, { 0: this.#otherWorld(mine.world, this.rank) })
    return mine.ok
  }

  /** Why a rank whose message says world size `theirs` cannot be in a group with rank `seenBy`. */
  #otherWorld(theirs: unknown, seenBy: number): string {
    return `was started with world size ${String(theirs)}, rank ${seenBy} with ${this.worldSize} (WORLD_SIZE must be the same on every rank)`
  }

  /**
   * Leaves the group. The rank hosting the store keeps serving until every rank has left (or the timeout passed),
   * so no rank loses the store in the middle of its last collective.
   */
  async destroy(): Promise<void> {
    const key = `${this.#prefix}/left`
    try {
      const n = await this.store.add(`${key}/count`, 1)
      if (n === BigInt(this.worldSize)) await this.store.set(`${key}/n`, '0')
      // bounded: a rank that died never leaves
      if (this.#server) await this.store.wait([`${key}/n`], Math.min(this.timeoutMs, 30_000)).catch(() => undefined)
    } catch (e) {
      // leaving is a courtesy to the store's host: when the store is gone (its host died), there is nobody to tell,
      // and a cleanup path (`finally { await pg.destroy() }` after the failure that reported it) must not throw
      if (!(e instanceof DistcpError && e.code === 'ERR_DISTCP_STORE_CLOSED')) throw e
    } finally {
      this.store.close()
      await this.#server?.close()
    }
  }
}

let groups = 0

/**
 * Joins the group torchrun (or any launcher setting `RANK`, `WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`) describes,
 * or the one `options` describes: connects to the launcher's agent store (`TORCHELASTIC_USE_AGENT_STORE=True`), or
 * on rank 0 hosts a TCPStore on `MASTER_PORT` that the other ranks connect to, as torch's `env://` rendezvous does.
 * Every rank must call it (in the same order as any other group it forms).
 */
export async function initProcessGroup(options: ProcessGroupOptions = {}): Promise<ProcessGroup> {
  const rank = options.rank ?? envInt('RANK')
  const worldSize = options.worldSize ?? envInt('WORLD_SIZE')
  const port = options.masterPort ?? envInt('MASTER_PORT')
  const host = options.masterAddr ?? process.env.MASTER_ADDR ?? '127.0.0.1'
  if (rank === undefined || worldSize === undefined || port === undefined) {
    const lacking = [rank === undefined && 'RANK', worldSize === undefined && 'WORLD_SIZE', port === undefined && 'MASTER_PORT'].filter(Boolean)
    throw new DistcpError(
      'ERR_DISTCP_INVALID_INPUT',
      `initProcessGroup: ${lacking.join(', ')} not given (set by torchrun, or pass { rank, worldSize, masterPort })`,
    )
  }
  const isIndex = (n: number): boolean => Number.isSafeInteger(n) && n >= 0
  if (!isIndex(rank) || !isIndex(worldSize) || worldSize < 1 || worldSize > MAX_WORLD_SIZE || rank >= worldSize || !isIndex(port) || port < 1 || port > 65535) {
    throw new DistcpError(
      'ERR_DISTCP_INVALID_INPUT',
      `initProcessGroup: rank ${rank} of world size ${worldSize}, port ${port}: out of range (a rank in [0, world size), a world size in [1, ${MAX_WORLD_SIZE}], a port in [1, 65535])`,
    )
  }
  const localRank = options.localRank ?? envInt('LOCAL_RANK') ?? rank
  if (!isIndex(localRank)) throw new DistcpError('ERR_DISTCP_INVALID_INPUT', `initProcessGroup: localRank ${localRank} is not a non-negative integer`)
  const timeoutMs = checkTimeoutMs(options.timeoutMs ?? 300_000, 'initProcessGroup')
  const agent = options.useAgentStore ?? process.env.TORCHELASTIC_USE_AGENT_STORE === 'True'
  const attempt = process.env.TORCHELASTIC_RESTART_COUNT ?? '0'
  const prefix = options.prefix ?? `distcp/${attempt}/g${groups++}`
  let server: TcpStoreServer | null = null
  if (!agent && rank === 0) {
    try {
      server = await TcpStoreServer.listen(port, '0.0.0.0')
    } catch (e) {
      throw new DistcpError('ERR_DISTCP_STORE_LISTEN', `rank 0: cannot host the TCPStore on port ${port}: ${(e as Error).message}`, { cause: e })
    }
  }
  try {
    const store = await TcpStore.connect({ host, port, timeoutMs, rank })
    return new ProcessGroup(rank, worldSize, localRank, store, server, timeoutMs, prefix, !agent)
  } catch (e) {
    await server?.close()
    throw e
  }
}
