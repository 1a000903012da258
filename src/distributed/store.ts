/**
 * c10d's `TCPStore` over `node:net`, wire-compatible with torch's (`torch/csrc/distributed/c10d/TCPStore.cpp` is the
 * client, `TCPStoreLibUvBackend.cpp` the server this one behaves like):
 * - a request is a 1-byte opcode then its arguments; strings and byte values are a u64 little-endian length then the
 *   bytes; counts are u64, integers i64, all little-endian;
 * - a client's first request is `VALIDATE` + u32 `0x3C85F7CE` (no reply), then `PING` + u32 nonce (echoed);
 * - the client prefixes every user key with `/` (torch's `keyPrefix_`), so keys are shared with torch's clients;
 * - `get`/`multiGet` first `WAIT` for their keys (bounded by the store's timeout); a `WAIT` that times out is
 *   withdrawn with `CANCEL_WAIT`, whose `WAIT_CANCELED` reply may follow a late `STOP_WAITING`;
 * - a value is at most 8 MiB and a key 8 KiB (the libuv server's `MAX_PAYLOAD_LEN`/`MAX_STRING_LEN`: it drops the
 *   connection beyond), so larger values are refused here before anything is sent.
 */
import { createServer, connect, type Server, type Socket } from 'node:net'
import { DistcpError, type DistcpErrorCode } from '../errors.js'

export const VALIDATION_MAGIC = 0x3c85f7ce
/** The libuv store's limits (`TCPStoreLibUvBackend.cpp`): a connection that exceeds them is closed. */
export const MAX_VALUE_BYTES = 8 * 1024 * 1024
export const MAX_KEY_BYTES = 8 * 1024
export const MAX_KEYS_PER_REQUEST = 128 * 1024
/** The longest timer `setTimeout` honours (a longer or non-finite delay fires after 1 ms instead). */
export const MAX_TIMEOUT_MS = 2 ** 31 - 1
/**
 * Reply bytes a server connection may have queued before it stops reading that client's requests: a client that
 * never reads its replies is held back by TCP, not buffered without bound.
 */
const MAX_QUEUED_REPLY_BYTES = MAX_VALUE_BYTES

/** `c10d::detail::QueryType`. */
export const Op = {
  VALIDATE: 0,
  SET: 1,
  COMPARE_SET: 2,
  GET: 3,
  ADD: 4,
  CHECK: 5,
  WAIT: 6,
  GETNUMKEYS: 7,
  DELETE_KEY: 8,
  APPEND: 9,
  MULTI_GET: 10,
  MULTI_SET: 11,
  CANCEL_WAIT: 12,
  PING: 13,
} as const
const CHECK_READY = 0
const STOP_WAITING = 0
const WAIT_CANCELED = 1
const KEY_PREFIX = '/'

export type StoreValue = Uint8Array | string

/** Where and who: every store error names the address and, when known, the rank. */
export interface StoreOptions {
  host: string
  port: number
  /** Bounds `get`, `wait`, `multiGet` and the connection attempts (torch's default: 300 s). */
  timeoutMs?: number
  /** The caller's rank, named in errors. */
  rank?: number
}

/** A timeout given by the caller, checked: a positive number of milliseconds up to {@link MAX_TIMEOUT_MS}. */
export function checkTimeoutMs(timeoutMs: number, where: string): number {
  if (typeof timeoutMs !== 'number' || !(timeoutMs > 0) || timeoutMs > MAX_TIMEOUT_MS) {
    throw new DistcpError('ERR_DISTCP_INVALID_INPUT', `${where}: timeoutMs ${String(timeoutMs)} is not a number of milliseconds in (0, ${MAX_TIMEOUT_MS}]`)
  }
  return timeoutMs
}

function toBytes(v: StoreValue): Buffer {
  return typeof v === 'string' ? Buffer.from(v, 'utf8') : Buffer.from(v.buffer, v.byteOffset, v.byteLength)
}

/** Serializes one request (`SendBuffer` in TCPStore.cpp). */
class Request {
  readonly parts: Buffer[] = []
  constructor(op: number) {
    this.parts.push(Buffer.from([op]))
  }
  /** Starts another request in the same write: pipelined, its reply follows the previous one's. */
  next(op: number): this {
    this.parts.push(Buffer.from([op]))
    return this
  }
  u32(v: number): this {
    const b = Buffer.alloc(4)
    b.writeUInt32LE(v >>> 0)
    this.parts.push(b)
    return this
  }
  u64(v: number): this {
    const b = Buffer.alloc(8)
    b.writeBigUInt64LE(BigInt(v))
    this.parts.push(b)
    return this
  }
  i64(v: bigint): this {
    const b = Buffer.alloc(8)
    b.writeBigInt64LE(v)
    this.parts.push(b)
    return this
  }
  bytes(v: Buffer): this {
    this.u64(v.length)
    this.parts.push(v)
    return this
  }
}

/** Bytes arriving on a socket, read in exact amounts by one reader at a time. */
class Inbox {
  #chunks: Buffer[] = []
  #have = 0
  #waiter: { n: number; resolve: (b: Buffer) => void; reject: (e: Error) => void } | null = null
  #error: Error | null = null

  push(b: Buffer): void {
    this.#chunks.push(b)
    this.#have += b.length
    this.#wake()
  }

  fail(e: Error): void {
    this.#error ??= e
    const w = this.#waiter
    this.#waiter = null
    w?.reject(this.#error)
  }

  #take(n: number): Buffer {
    const all = this.#chunks.length === 1 ? this.#chunks[0] : Buffer.concat(this.#chunks)
    const out = all.subarray(0, n)
    const rest = all.subarray(n)
    this.#chunks = rest.length ? [rest] : []
    this.#have = rest.length
    return out
  }

  #wake(): void {
    const w = this.#waiter
    if (w && this.#have >= w.n) {
      this.#waiter = null
      w.resolve(this.#take(w.n))
    }
  }

  /** Exactly `n` bytes; `null` when `timeoutMs` passes first (nothing is consumed then). */
  read(n: number, timeoutMs?: number): Promise<Buffer | null> {
    if (this.#have >= n) return Promise.resolve(this.#take(n))
    if (this.#error) return Promise.reject(this.#error)
    return new Promise((resolve, reject) => {
      let timer: NodeJS.Timeout | undefined
      this.#waiter = {
        n,
        resolve: (b) => {
          clearTimeout(timer)
          resolve(b)
        },
        reject: (e) => {
          clearTimeout(timer)
          reject(e)
        },
      }
      if (timeoutMs !== undefined) {
        timer = setTimeout(() => {
          this.#waiter = null
          resolve(null)
        }, Math.min(Math.max(0, timeoutMs), MAX_TIMEOUT_MS))
      }
    })
  }

  async exact(n: number): Promise<Buffer> {
    return (await this.read(n)) as Buffer
  }
}

/** A client of a c10d `TCPStore` (torch's, torchrun's agent store, or {@link TcpStoreServer}). */
export class TcpStore {
  readonly host: string
  readonly port: number
  readonly rank: number | undefined
  timeoutMs: number
  readonly #socket: Socket
  readonly #inbox = new Inbox()
  /** One request in flight per connection (torch's `activeOpLock_`). */
  #queue: Promise<unknown> = Promise.resolve()
  #closed = false

  private constructor(socket: Socket, options: StoreOptions) {
    this.host = options.host
    this.port = options.port
    this.rank = options.rank
    this.timeoutMs = options.timeoutMs ?? 300_000
    this.#socket = socket
    socket.setNoDelay(true)
    socket.on('data', (b: Buffer) => this.#inbox.push(b))
    const lost = (why: string) => () => this.#inbox.fail(this.error('ERR_DISTCP_STORE_CLOSED', `the connection ${why}`))
    socket.on('error', (e) => this.#inbox.fail(this.error('ERR_DISTCP_STORE_CLOSED', `the connection failed: ${e.message}`)))
    socket.on('close', lost('was closed'))
    socket.on('end', lost('was closed by the server'))
  }

  /** `host:port (rank r)`, as errors name it. */
  get where(): string {
    return `${this.host}:${this.port}${this.rank === undefined ? '' : ` (rank ${this.rank})`}`
  }

  error(code: DistcpErrorCode, what: string): DistcpError {
    return new DistcpError(code, `TCPStore ${this.where}: ${what}`)
  }

  /**
   * Connects, validates and pings as torch's client does, retrying a refused connection until `timeoutMs`
   * (the server may not be up yet: rank 0 hosts it while the other ranks start).
   */
  static async connect(options: StoreOptions): Promise<TcpStore> {
    const timeoutMs = checkTimeoutMs(options.timeoutMs ?? 300_000, `TCPStore ${options.host}:${options.port}`)
    // `net.connect` throws on such a port, which the retry loop would take for a server not up yet
    if (!Number.isSafeInteger(options.port) || options.port < 1 || options.port > 65535) {
      throw new DistcpError('ERR_DISTCP_INVALID_INPUT', `TCPStore ${options.host}:${options.port}: the port is not in [1, 65535]`)
    }
    const deadline = Date.now() + timeoutMs
    let delay = 10
    let last = ''
    for (;;) {
      try {
        const socket = await new Promise<Socket>((resolve, reject) => {
          const s = connect({ host: options.host, port: options.port })
          const t = setTimeout(() => {
            s.destroy()
            reject(new Error('connect timed out'))
          }, Math.max(1, deadline - Date.now()))
          s.once('connect', () => {
            clearTimeout(t)
            s.removeAllListeners('error')
            resolve(s)
          })
          s.once('error', (e) => {
            clearTimeout(t)
            reject(e)
          })
        })
        const store = new TcpStore(socket, { ...options, timeoutMs })
        try {
          await store.#handshake()
        } catch (e) {
          // a server that accepted but did not answer keeps no socket (and so no process) alive
          store.close()
          throw e
        }
        return store
      } catch (e) {
        if (e instanceof DistcpError) throw e
        last = (e as Error).message
      }
      if (Date.now() + delay >= deadline) break
      await new Promise((r) => setTimeout(r, delay))
      delay = Math.min(delay * 2, 1000)
    }
    const rank = options.rank === undefined ? '' : ` (rank ${options.rank})`
    throw new DistcpError(
      'ERR_DISTCP_STORE_CONNECT',
      `TCPStore ${options.host}:${options.port}${rank}: could not connect within ${timeoutMs} ms: ${last}`,
    )
  }

  async #handshake(): Promise<void> {
    this.#send(new Request(Op.VALIDATE).u32(VALIDATION_MAGIC))
    const nonce = process.pid >>> 0
    this.#send(new Request(Op.PING).u32(nonce))
    const back = await this.#inbox.read(4, this.timeoutMs)
    if (back === null) throw this.error('ERR_DISTCP_STORE_TIMEOUT', `no reply to PING within ${this.timeoutMs} ms`)
    if (back.readUInt32LE(0) !== nonce) {
      throw this.error('ERR_DISTCP_STORE_PROTOCOL', `PING answered ${back.readUInt32LE(0)}, not the nonce ${nonce}`)
    }
  }

  /**
   * The next `n` bytes of a reply, within the store's timeout. After a timeout the connection is closed: a late
   * reply would otherwise be read as the next request's.
   */
  async #reply(n: number, what: string): Promise<Buffer> {
    const b = await this.#inbox.read(n, this.timeoutMs)
    if (b !== null) return b
    this.close()
    throw this.error('ERR_DISTCP_STORE_TIMEOUT', `no reply to ${what} within ${this.timeoutMs} ms (connection closed)`)
  }

  #send(r: Request): void {
    if (this.#closed) throw this.error('ERR_DISTCP_STORE_CLOSED', 'the store was closed')
    this.#socket.write(r.parts.length === 1 ? r.parts[0] : Buffer.concat(r.parts))
  }

  #op<T>(f: () => Promise<T>): Promise<T> {
    const run = this.#queue.then(f, f)
    this.#queue = run.catch(() => undefined)
    return run
  }

  #key(key: string): Buffer {
    const b = Buffer.from(KEY_PREFIX + key, 'utf8')
    if (b.length > MAX_KEY_BYTES) {
      throw this.error('ERR_DISTCP_STORE_VALUE_TOO_LARGE', `key \`${key.slice(0, 64)}…\` is ${b.length} bytes, over the store's ${MAX_KEY_BYTES}`)
    }
    return b
  }

  #value(key: string, v: StoreValue): Buffer {
    const b = toBytes(v)
    if (b.length > MAX_VALUE_BYTES) {
      throw this.error(
        'ERR_DISTCP_STORE_VALUE_TOO_LARGE',
        `value of \`${key}\` is ${b.length} bytes, over the store's ${MAX_VALUE_BYTES} (torch's libuv store drops such a connection)`,
      )
    }
    return b
  }

  async #bits(what: string): Promise<Buffer> {
    const n = (await this.#reply(8, what)).readBigUInt64LE(0)
    if (n > BigInt(MAX_VALUE_BYTES)) throw this.error('ERR_DISTCP_STORE_PROTOCOL', `the server sent a ${n}-byte value`)
    return Buffer.from(await this.#reply(Number(n), what))
  }

  async #wait(keys: Buffer[], timeoutMs: number, names: string[]): Promise<void> {
    const r = new Request(Op.WAIT).u64(keys.length)
    for (const k of keys) r.bytes(k)
    this.#send(r)
    const got = await this.#inbox.read(1, timeoutMs)
    if (got !== null) {
      if (got[0] !== STOP_WAITING) throw this.error('ERR_DISTCP_STORE_PROTOCOL', `WAIT answered ${got[0]}`)
      return
    }
    this.#send(new Request(Op.CANCEL_WAIT))
    let answer = (await this.#reply(1, 'CANCEL_WAIT'))[0]
    // the keys may have arrived just before the cancel: STOP_WAITING, then WAIT_CANCELED
    if (answer === STOP_WAITING) answer = (await this.#reply(1, 'CANCEL_WAIT'))[0]
    if (answer !== WAIT_CANCELED) throw this.error('ERR_DISTCP_STORE_PROTOCOL', `CANCEL_WAIT answered ${answer}`)
    throw this.error('ERR_DISTCP_STORE_TIMEOUT', `wait timed out after ${timeoutMs} ms for keys ${names.join(', ')}`)
  }

  set(key: string, value: StoreValue): Promise<void> {
    return this.#op(async () => this.#send(new Request(Op.SET).bytes(this.#key(key)).bytes(this.#value(key, value))))
  }

  /** Waits (up to the store's timeout) for `key`, then returns its value. */
  get(key: string): Promise<Buffer> {
    return this.#op(async () => {
      const k = this.#key(key)
      await this.#wait([k], this.timeoutMs, [key])
      this.#send(new Request(Op.GET).bytes(k))
      return this.#bits(`GET ${key}`)
    })
  }

  /** Adds `delta` to the integer at `key` (created as 0) and returns the new value. */
  add(key: string, delta: number | bigint): Promise<bigint> {
    return this.#op(async () => {
      this.#send(new Request(Op.ADD).bytes(this.#key(key)).i64(BigInt(delta)))
      return (await this.#reply(8, `ADD ${key}`)).readBigInt64LE(0)
    })
  }

  /** Sets `key` to `desired` if it holds `expected` (or is absent and `expected` is empty); returns the value now. */
  compareSet(key: string, expected: StoreValue, desired: StoreValue): Promise<Buffer> {
    return this.#op(async () => {
      this.#send(new Request(Op.COMPARE_SET).bytes(this.#key(key)).bytes(this.#value(key, expected)).bytes(this.#value(key, desired)))
      return this.#bits(`COMPARE_SET ${key}`)
    })
  }

  /** Whether every key is set (does not wait). */
  check(keys: string[]): Promise<boolean> {
    return this.#op(async () => {
      const r = new Request(Op.CHECK).u64(keys.length)
      for (const k of keys) r.bytes(this.#key(k))
      this.#send(r)
      return (await this.#reply(1, 'CHECK'))[0] === CHECK_READY
    })
  }

  /** Waits until every key is set; `ERR_DISTCP_STORE_TIMEOUT` after `timeoutMs` (default: the store's). */
  wait(keys: string[], timeoutMs?: number): Promise<void> {
    return this.#op(() => this.#wait(keys.map((k) => this.#key(k)), timeoutMs ?? this.timeoutMs, keys))
  }

  multiGet(keys: string[]): Promise<Buffer[]> {
    return this.#op(async () => {
      const ks = keys.map((k) => this.#key(k))
      await this.#wait(ks, this.timeoutMs, keys)
      const r = new Request(Op.MULTI_GET).u64(ks.length)
      for (const k of ks) r.bytes(k)
      this.#send(r)
      const out: Buffer[] = []
      for (let i = 0; i < ks.length; i++) out.push(await this.#bits('MULTI_GET'))
      return out
    })
  }

  /**
   * The values of keys the caller knows are set (it waited for them, or for a key set after them on the same
   * connection), in one round trip per `MAX_KEYS_PER_REQUEST` keys: no `WAIT` first, so a missing key is the
   * server's error (torch's server and this one close the connection).
   */
  multiGetReady(keys: string[]): Promise<Buffer[]> {
    return this.#op(async () => {
      const out: Buffer[] = []
      for (let at = 0; at < keys.length; at += MAX_KEYS_PER_REQUEST) {
        const batch = keys.slice(at, at + MAX_KEYS_PER_REQUEST)
        const r = new Request(Op.MULTI_GET).u64(batch.length)
        for (const k of batch) r.bytes(this.#key(k))
        this.#send(r)
        for (let i = 0; i < batch.length; i++) out.push(await this.#bits('MULTI_GET'))
      }
      return out
    })
  }

  multiSet(keys: string[], values: StoreValue[]): Promise<void> {
    return this.#op(async () => {
      if (keys.length !== values.length) {
        throw this.error('ERR_DISTCP_INVALID_ARGUMENT', `multiSet: ${keys.length} keys but ${values.length} values`)
      }
      const r = new Request(Op.MULTI_SET).u64(keys.length)
      keys.forEach((k, i) => r.bytes(this.#key(k)).bytes(this.#value(k, values[i])))
      this.#send(r)
    })
  }

  append(key: string, value: StoreValue): Promise<void> {
    return this.#op(async () => this.#send(new Request(Op.APPEND).bytes(this.#key(key)).bytes(this.#value(key, value))))
  }

  deleteKey(key: string): Promise<boolean> {
    return this.#op(async () => {
      this.#send(new Request(Op.DELETE_KEY).bytes(this.#key(key)))
      return (await this.#reply(8, `DELETE_KEY ${key}`)).readBigInt64LE(0) === 1n
    })
  }

  /**
   * Deletes every key in one round trip (the requests are sent together, then the replies read in order); returns
   * how many existed.
   */
  deleteKeys(keys: string[]): Promise<number> {
    return this.#op(async () => {
      if (keys.length === 0) return 0
      const r = new Request(Op.DELETE_KEY).bytes(this.#key(keys[0]))
      for (let i = 1; i < keys.length; i++) r.next(Op.DELETE_KEY).bytes(this.#key(keys[i]))
      this.#send(r)
      let n = 0
      for (let i = 0; i < keys.length; i++) if ((await this.#reply(8, 'DELETE_KEY')).readBigInt64LE(0) === 1n) n++
      return n
    })
  }

  numKeys(): Promise<number> {
    return this.#op(async () => {
      this.#send(new Request(Op.GETNUMKEYS))
      return Number((await this.#reply(8, 'GETNUMKEYS')).readBigInt64LE(0))
    })
  }

  close(): void {
    this.#closed = true
    this.#socket.destroy()
  }
}

/** Reads requests off one connection. */
class Conn {
  readonly inbox = new Inbox()
  validated = false
  awaited = 0
  /** The keys this connection waits for: forgetting it touches these, not every waiter of the store. */
  readonly waits = new Set<string>()
  constructor(readonly socket: Socket) {}
}

class Protocol extends Error {}

/**
 * A `TCPStore` server (what rank 0 hosts when no agent store exists), answering torch's clients and ours as the libuv
 * backend does: the first request must be a valid `VALIDATE`; values over 8 MiB or keys over 8 KiB close the
 * connection; a `WAIT` is answered once every key is set, or `WAIT_CANCELED` after `CANCEL_WAIT`.
 */
export class TcpStoreServer {
  readonly #server: Server
  readonly #data = new Map<string, Buffer>()
  readonly #waiting = new Map<string, Set<Conn>>()
  readonly #conns = new Set<Conn>()

  private constructor(server: Server) {
    this.#server = server
  }

  static listen(port = 0, host = '0.0.0.0'): Promise<TcpStoreServer> {
    return new Promise((resolve, reject) => {
      const server = createServer()
      const store = new TcpStoreServer(server)
      server.on('connection', (s) => store.#serve(s))
      server.once('error', (e) =>
        reject(new DistcpError('ERR_DISTCP_STORE_LISTEN', `TCPStore server: cannot listen on ${host}:${port}: ${e.message}`)),
      )
      try {
        server.listen(port, host, () => resolve(store))
      } catch (e) {
        // a port out of range throws here rather than emitting 'error'
        reject(new DistcpError('ERR_DISTCP_STORE_LISTEN', `TCPStore server: cannot listen on ${host}:${port}: ${(e as Error).message}`))
      }
    })
  }

  get port(): number {
    const a = this.#server.address()
    return typeof a === 'object' && a !== null ? a.port : 0
  }

  /** How many keys the store holds. */
  get size(): number {
    return this.#data.size
  }

  close(): Promise<void> {
    for (const c of this.#conns) c.socket.destroy()
    return new Promise((r) => this.#server.close(() => r()))
  }

  #serve(socket: Socket): void {
    const c = new Conn(socket)
    this.#conns.add(c)
    socket.setNoDelay(true)
    socket.on('data', (b: Buffer) => c.inbox.push(b))
    const drop = (): void => {
      c.inbox.fail(new Protocol('closed'))
      this.#forget(c)
      this.#conns.delete(c)
    }
    socket.on('close', drop)
    socket.on('error', drop)
    void this.#loop(c).catch(() => socket.destroy())
  }

  #forget(c: Conn): void {
    for (const k of c.waits) {
      const set = this.#waiting.get(k)
      set?.delete(c)
      if (set?.size === 0) this.#waiting.delete(k)
    }
    c.waits.clear()
    c.awaited = 0
  }

  async #len(c: Conn, max: number): Promise<number> {
    const n = (await c.inbox.exact(8)).readBigUInt64LE(0)
    if (n > BigInt(max)) throw new Protocol(`length ${n} over ${max}`)
    return Number(n)
  }

  async #str(c: Conn): Promise<string> {
    return (await c.inbox.exact(await this.#len(c, MAX_KEY_BYTES))).toString('latin1')
  }

  async #val(c: Conn): Promise<Buffer> {
    return Buffer.from(await c.inbox.exact(await this.#len(c, MAX_VALUE_BYTES)))
  }

  async #keys(c: Conn): Promise<string[]> {
    const n = await this.#len(c, MAX_KEYS_PER_REQUEST)
    const keys: string[] = []
    for (let i = 0; i < n; i++) keys.push(await this.#str(c))
    return keys
  }

  #u64(v: bigint | number, signed = true): Buffer {
    const b = Buffer.alloc(8)
    if (signed) b.writeBigInt64LE(BigInt(v))
    else b.writeBigUInt64LE(BigInt(v))
    return b
  }

  /** A value's reply: its length, then the stored bytes themselves (not a copy: a reply queued for a slow reader
   * holds no memory of its own). */
  #bits(v: Buffer): Buffer[] {
    return [this.#u64(v.length, false), v]
  }

  #set(key: string, v: Buffer): void {
    this.#data.set(key, v)
    const set = this.#waiting.get(key)
    if (!set) return
    this.#waiting.delete(key)
    for (const c of set) {
      c.waits.delete(key)
      if (--c.awaited === 0) c.socket.write(Buffer.from([STOP_WAITING]))
    }
  }

  /** Stops reading `c`'s requests until its queued replies are sent (or it closes). */
  async #drained(c: Conn): Promise<void> {
    if (c.socket.destroyed) throw new Protocol('closed')
    c.socket.pause()
    await new Promise<void>((resolve) => {
      const done = (): void => {
        c.socket.off('drain', done)
        c.socket.off('close', done)
        resolve()
      }
      c.socket.on('drain', done)
      c.socket.on('close', done)
    })
    c.socket.resume()
  }

  async #loop(c: Conn): Promise<void> {
    for (;;) {
      if (c.socket.writableLength > MAX_QUEUED_REPLY_BYTES) await this.#drained(c)
      const op = (await c.inbox.exact(1))[0]
      if (!c.validated) {
        if (op !== Op.VALIDATE || (await c.inbox.exact(4)).readUInt32LE(0) !== VALIDATION_MAGIC) {
          throw new Protocol('not a TCPStore client')
        }
        c.validated = true
        continue
      }
      const w = (b: Buffer | Buffer[]): void => {
        for (const x of Array.isArray(b) ? b : [b]) c.socket.write(x)
      }
      switch (op) {
        case Op.VALIDATE:
          await c.inbox.exact(4)
          break
        case Op.PING:
          w(Buffer.from(await c.inbox.exact(4)))
          break
        case Op.SET: {
          const k = await this.#str(c)
          this.#set(k, await this.#val(c))
          break
        }
        case Op.COMPARE_SET: {
          const k = await this.#str(c)
          const expected = await this.#val(c)
          const desired = await this.#val(c)
          const cur = this.#data.get(k)
          if (cur === undefined) {
            if (expected.length === 0) {
              this.#set(k, desired)
              w(this.#bits(desired))
            } else w(this.#bits(expected))
          } else {
            if (cur.equals(expected)) this.#set(k, desired)
            w(this.#bits(this.#data.get(k) as Buffer))
          }
          break
        }
        case Op.GET: {
          const k = await this.#str(c)
          const v = this.#data.get(k)
          if (v === undefined) throw new Protocol(`GET of a missing key ${k}`)
          w(this.#bits(v))
          break
        }
        case Op.ADD: {
          const k = await this.#str(c)
          let v = (await c.inbox.exact(8)).readBigInt64LE(0)
          const cur = this.#data.get(k)
          if (cur !== undefined) {
            // an i64 in decimal, as torch's `stoll` reads it: a long digit string would block the event loop (and
            // so every rank) for seconds in `BigInt`
            const text = cur.toString('latin1')
            if (!/^[+-]?\d{1,19}$/.test(text)) throw new Protocol(`ADD to ${k}, which holds no 64-bit integer`)
            v += BigInt(text)
          }
          w(this.#u64(v))
          this.#set(k, Buffer.from(v.toString(), 'latin1'))
          break
        }
        case Op.CHECK: {
          const keys = await this.#keys(c)
          w(Buffer.from([keys.every((k) => this.#data.has(k)) ? CHECK_READY : 1]))
          break
        }
        case Op.WAIT: {
          const missing = (await this.#keys(c)).filter((k) => !this.#data.has(k))
          if (missing.length === 0) {
            w(Buffer.from([STOP_WAITING]))
            break
          }
          for (const k of missing) {
            let set = this.#waiting.get(k)
            if (!set) this.#waiting.set(k, (set = new Set()))
            set.add(c)
            c.waits.add(k)
          }
          c.awaited = new Set(missing).size
          break
        }
        case Op.GETNUMKEYS:
          w(this.#u64(this.#data.size))
          break
        case Op.DELETE_KEY:
          w(this.#u64(this.#data.delete(await this.#str(c)) ? 1 : 0))
          break
        case Op.APPEND: {
          const k = await this.#str(c)
          const v = await this.#val(c)
          const cur = this.#data.get(k)
          const next = cur ? Buffer.concat([cur, v]) : v
          if (next.length > MAX_VALUE_BYTES) throw new Protocol(`APPEND makes ${k} larger than ${MAX_VALUE_BYTES}`)
          this.#set(k, next)
          break
        }
        case Op.MULTI_GET: {
          const keys = await this.#keys(c)
          const out: Buffer[] = []
          for (const k of keys) {
            const v = this.#data.get(k)
            if (v === undefined) throw new Protocol(`MULTI_GET of a missing key ${k}`)
            out.push(...this.#bits(v))
          }
          w(out)
          break
        }
        case Op.MULTI_SET: {
          const n = await this.#len(c, MAX_KEYS_PER_REQUEST)
          for (let i = 0; i < n; i++) {
            const k = await this.#str(c)
            this.#set(k, await this.#val(c))
          }
          break
        }
        case Op.CANCEL_WAIT:
          this.#forget(c)
          w(Buffer.from([WAIT_CANCELED]))
          break
        default:
          throw new Protocol(`unknown opcode ${op}`)
      }
    }
  }
}
