// The distributed layer against hostile or broken peers: a store server that stops answering, a client that never
// reads its replies or sends values that cost the server seconds, ranks that send what is not distcp's JSON or
// announce parts that do not exist, bad process-group options (API, environment, CLI), and ranks that save to
// different folders or disagree on a replicated tensor. Each ends in a coded error naming what is wrong, within its
// timeout, with the server still serving the others and nothing committed.
//
// Every test is serial: the store servers here live in this process, so a neighbour test's 8 MiB values or 800
// connections stall their event loop past the 0.2–2 s timeouts under test (CI saw a 2 s GETNUMKEYS time out).
import ava from 'ava'
import { existsSync, mkdirSync, mkdtempSync, readdirSync, rmSync, writeFileSync } from 'node:fs'
import { connect, createServer, type Server, type Socket } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

import { main as cli } from '../src/cli.js'
import { CheckpointError, convertDcpToHf, DistcpError, initProcessGroup, save, TcpStore, TcpStoreServer, type ProcessGroup } from '../src/index.js'
import { freePort } from './helpers.js'

/** Every test in this file is serial (see above). */
const test = ava.serial

const MiB = 1024 * 1024

/** `p`, or a rejection after `ms`: a hang fails the test instead of stalling the suite. */
function within<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined
  const guard = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`HUNG: ${what} still pending after ${ms} ms`)), ms)
  })
  return Promise.race([p, guard]).finally(() => clearTimeout(timer))
}

async function listen(onSocket: (s: Socket) => void): Promise<{ server: Server; port: number }> {
  const server = createServer((s) => {
    s.on('error', () => undefined)
    onSocket(s)
  })
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r))
  return { server, port: (server.address() as { port: number }).port }
}

/** A raw request: opcode, then u64-length-prefixed strings. */
function request(op: number, ...strings: (string | Buffer)[]): Buffer {
  const parts: Buffer[] = [Buffer.from([op])]
  for (const s of strings) {
    const b = typeof s === 'string' ? Buffer.from(s) : s
    const n = Buffer.alloc(8)
    n.writeBigUInt64LE(BigInt(b.length))
    parts.push(n, b)
  }
  return Buffer.concat(parts)
}
const VALIDATE = Buffer.from([0, 0xce, 0xf7, 0x85, 0x3c])

async function rawClient(port: number): Promise<Socket> {
  const s = connect(port, '127.0.0.1')
  s.on('error', () => undefined)
  await new Promise((r) => s.once('connect', r))
  return s
}

async function group(n: number, timeoutMs = 3000, extra: { prefix?: string } = {}): Promise<ProcessGroup[]> {
  const masterPort = await freePort()
  const prefix = extra.prefix ?? `h${masterPort}`
  return Promise.all(
    Array.from({ length: n }, (_, rank) => initProcessGroup({ rank, worldSize: n, masterAddr: '127.0.0.1', masterPort, timeoutMs, useAgentStore: false, prefix })),
  )
}

/** A collective value as `#put` lays it out: u64 part count, then the first bytes. */
function head(parts: bigint, body: string): Buffer {
  const b = Buffer.alloc(8 + Buffer.byteLength(body))
  b.writeBigUInt64LE(parts, 0)
  b.write(body, 8)
  return b
}

// ---- the store client against a server that stops answering ----

test('store client: against a server that answers the handshake and then nothing, every call ends at the timeout with ERR_DISTCP_STORE_TIMEOUT naming the request', async (t) => {
  const { server, port } = await listen((s) => {
    let got = Buffer.alloc(0)
    let ponged = false
    s.on('data', (b) => {
      got = Buffer.concat([got, b])
      // VALIDATE (5 bytes) then PING + nonce (5 bytes): echo the nonce, then never answer again
      if (!ponged && got.length >= 10) {
        ponged = true
        s.write(got.subarray(6, 10))
      }
    })
  })
  const calls: [string, (s: TcpStore) => Promise<unknown>][] = [
    ['ADD k', (s) => s.add('k', 1)],
    ['CHECK', (s) => s.check(['k'])],
    ['GETNUMKEYS', (s) => s.numKeys()],
    ['DELETE_KEY k', (s) => s.deleteKey('k')],
    ['DELETE_KEY', (s) => s.deleteKeys(['a', 'b'])],
    ['MULTI_GET', (s) => s.multiGetReady(['k'])],
    ['COMPARE_SET k', (s) => s.compareSet('k', '', 'v')],
    // the WAIT times out, then its CANCEL_WAIT is never answered either
    ['CANCEL_WAIT', (s) => s.wait(['k'], 100)],
  ]
  // the handshake gets a loaded machine's time (CI saw its PING answered after 200 ms); the calls get 200 ms; and the
  // server closes whatever happens (left listening, it kept the worker alive past ava's timeout)
  t.teardown(() => server.close())
  for (const [what, call] of calls) {
    const store = await TcpStore.connect({ host: '127.0.0.1', port, timeoutMs: 5000, rank: 3 })
    store.timeoutMs = 200
    const started = Date.now()
    const e = await t.throwsAsync(within(call(store), 3000, what), { instanceOf: DistcpError })
    t.is((e as DistcpError).code, 'ERR_DISTCP_STORE_TIMEOUT', `${what}: ${e?.message}`)
    t.true(e?.message.includes(`no reply to ${what}`) && e.message.includes(`127.0.0.1:${port} (rank 3)`), e?.message)
    t.true(Date.now() - started < 1500, `${what} took ${Date.now() - started} ms`)
    // the connection is given up: a late reply must not be read as the next request's
    await t.throwsAsync(store.numKeys(), { code: 'ERR_DISTCP_STORE_CLOSED' } as never)
    store.close()
  }
  server.close()
})

test('store client: a server that accepts and never answers the handshake gets a timeout, and the socket is closed (no handle keeps the process alive)', async (t) => {
  let closed: () => void = () => undefined
  const sawClose = new Promise<void>((r) => (closed = r))
  const { server, port } = await listen((s) => {
    s.resume()
    s.on('close', () => closed())
  })
  await t.throwsAsync(TcpStore.connect({ host: '127.0.0.1', port, timeoutMs: 150 }), { code: 'ERR_DISTCP_STORE_TIMEOUT', message: /no reply to PING within 150 ms/ } as never)
  await t.notThrowsAsync(within(sawClose, 2000, 'the client closing its socket'))
  server.close()
})

test('store client: a reply with a 2^63 length, or one cut off by a closing server, is a coded error', async (t) => {
  const reply = async (answer: Buffer, end: boolean) => {
    const { server, port } = await listen((s) => {
      let n = 0
      s.on('data', (b) => {
        n += b.length
        if (n === 10) s.write(Buffer.from([1, 2, 3, 4].map((_, i) => b[b.length - 4 + i])))
        else if (n > 10) {
          s.write(answer)
          if (end) s.end()
        }
      })
    })
    const store = await TcpStore.connect({ host: '127.0.0.1', port, timeoutMs: 1000 })
    const e = await t.throwsAsync(within(store.compareSet('k', '', 'v'), 3000, 'COMPARE_SET'), { instanceOf: DistcpError })
    store.close()
    server.close()
    return e as DistcpError
  }
  const huge = Buffer.alloc(8)
  huge.writeBigUInt64LE(2n ** 63n)
  const e1 = await reply(huge, false)
  t.is(e1.code, 'ERR_DISTCP_STORE_PROTOCOL')
  t.regex(e1.message, /9223372036854775808-byte value/)
  const half = Buffer.alloc(6)
  half.writeUInt32LE(100)
  const e2 = await reply(half, true)
  t.is(e2.code, 'ERR_DISTCP_STORE_CLOSED')
})

// ---- the store server against a hostile client ----

test('store server: a client that never reads its replies is held back, not buffered (GET of an 8 MiB value, replaced between GETs)', async (t) => {
  const server = await TcpStoreServer.listen(0, '127.0.0.1')
  const sock = await rawClient(server.port)
  sock.pause()
  const value = Buffer.alloc(8 * MiB, 7)
  const set = request(1, '/k', value)
  const get = request(3, '/k')
  const before = process.memoryUsage().arrayBuffers
  // the client itself respects backpressure (so its own memory stays flat): it sends until the server stops reading
  const write = (b: Buffer) =>
    new Promise<boolean>((resolve) => {
      if (sock.write(b)) return resolve(true)
      const t = setTimeout(() => resolve(false), 700)
      sock.once('drain', () => {
        clearTimeout(t)
        resolve(true)
      })
    })
  await write(VALIDATE)
  let sent = 0
  for (; sent < 40; sent++) if (!(await write(set)) || !(await write(get))) break
  const grown = (process.memoryUsage().arrayBuffers - before) / MiB
  // each SET is a fresh 8 MiB value on the server; without backpressure every queued GET reply pins an old one
  t.true(grown < 96, `the process grew by ${grown.toFixed(0)} MiB after ${sent} SET+GET pairs`)
  // and the server still serves everyone else
  const other = await TcpStore.connect({ host: '127.0.0.1', port: server.port, timeoutMs: 2000 })
  await other.set('x', 'y')
  t.is((await other.get('x')).toString(), 'y')
  other.close()
  sock.destroy()
  await server.close()
})

test('store server: MULTI_GET of one 8 MiB key 64 times queues no copies for a client that does not read', async (t) => {
  const server = await TcpStoreServer.listen(0, '127.0.0.1')
  const w = await TcpStore.connect({ host: '127.0.0.1', port: server.port, timeoutMs: 2000 })
  await w.set('big', Buffer.alloc(8 * MiB, 1))
  await w.numKeys()
  const sock = await rawClient(server.port)
  sock.pause()
  const before = process.memoryUsage().arrayBuffers
  const n = Buffer.alloc(8)
  n.writeBigUInt64LE(64n)
  sock.write(Buffer.concat([VALIDATE, Buffer.from([10]), n, ...Array.from({ length: 64 }, () => request(0, '/big').subarray(1))]))
  await new Promise((r) => setTimeout(r, 500))
  const grown = (process.memoryUsage().arrayBuffers - before) / MiB
  t.true(grown < 64, `the process grew by ${grown.toFixed(0)} MiB for a 512 MiB reply`)
  t.is(await w.numKeys(), 1)
  sock.destroy()
  w.close()
  await server.close()
})

test('store server: ADD on a key holding 8 MiB of digits closes that connection at once instead of blocking every client in BigInt', async (t) => {
  const server = await TcpStoreServer.listen(0, '127.0.0.1')
  const store = await TcpStore.connect({ host: '127.0.0.1', port: server.port, timeoutMs: 5000 })
  await store.set('n', '9'.repeat(8 * MiB - 1))
  await store.set('s', 'abc')
  const started = Date.now()
  await t.throwsAsync(store.add('n', 1), { code: 'ERR_DISTCP_STORE_CLOSED' } as never)
  t.true(Date.now() - started < 1000, `ADD took ${Date.now() - started} ms`)
  const other = await TcpStore.connect({ host: '127.0.0.1', port: server.port, timeoutMs: 2000 })
  await t.throwsAsync(other.add('s', 1), { code: 'ERR_DISTCP_STORE_CLOSED' } as never)
  const third = await TcpStore.connect({ host: '127.0.0.1', port: server.port, timeoutMs: 2000 })
  t.is(await third.add('c', 5), 5n)
  t.is(await third.add('c', -7), -2n)
  t.is((await third.get('c')).toString(), '-2')
  store.close()
  other.close()
  third.close()
  await server.close()
})

test('store server: no VALIDATE, an unknown opcode, a 2^63 length, 2^40 keys, a half request: each costs only its own connection', async (t) => {
  const server = await TcpStoreServer.listen(0, '127.0.0.1')
  const closes = async (bytes: Buffer) => {
    const s = await rawClient(server.port)
    const closed = new Promise<void>((r) => s.on('close', () => r()))
    s.resume()
    s.write(bytes)
    await within(closed, 2000, `close after ${bytes.subarray(0, 16).toString('hex')}`)
  }
  const u64 = (v: bigint) => {
    const b = Buffer.alloc(8)
    b.writeBigUInt64LE(v)
    return b
  }
  await closes(request(13, Buffer.from('ping')))
  await closes(Buffer.concat([VALIDATE, Buffer.from([99])]))
  await closes(Buffer.concat([VALIDATE, Buffer.from([1]), u64(2n ** 63n)]))
  await closes(Buffer.concat([VALIDATE, Buffer.from([6]), u64(2n ** 40n)]))
  await closes(Buffer.concat([VALIDATE, Buffer.from([9]), request(0, '/a', Buffer.alloc(8 * MiB)).subarray(1), request(0, '/a', Buffer.alloc(1)).subarray(1)]))
  // a request cut off halfway, its socket left open, and a WAIT that is never satisfied: the others are served
  const half = await rawClient(server.port)
  half.write(Buffer.concat([VALIDATE, Buffer.from([1]), u64(100n), Buffer.from('/abc')]))
  const waiter = await rawClient(server.port)
  waiter.write(Buffer.concat([VALIDATE, request(6, '/never').subarray(0, 1), u64(1n), request(0, '/never').subarray(1)]))
  const store = await TcpStore.connect({ host: '127.0.0.1', port: server.port, timeoutMs: 1000 })
  await store.set('a', 'b')
  t.deepEqual((await store.multiGet(['a'])).map(String), ['b'])
  t.is(await store.numKeys(), 1)
  half.destroy()
  waiter.destroy()
  store.close()
  await server.close()
})

test('store server: 800 connections each waiting on 1000 keys close without quadratic work (each forgets its own keys, not every waiter)', async (t) => {
  const server = await TcpStoreServer.listen(0, '127.0.0.1')
  const socks = await Promise.all(Array.from({ length: 800 }, () => rawClient(server.port)))
  const u64 = (v: number) => {
    const b = Buffer.alloc(8)
    b.writeBigUInt64LE(BigInt(v))
    return b
  }
  // WAIT on 1000 keys that never come, then PING: its echo says the server registered the WAIT
  await Promise.all(
    socks.map((s, i) => {
      const keys = Array.from({ length: 1000 }, (_, k) => request(0, `/w${i}_${k}`).subarray(1))
      s.write(Buffer.concat([VALIDATE, Buffer.from([6]), u64(1000), ...keys, Buffer.from([13]), Buffer.from('pong')]))
      return within(new Promise((r) => s.once('data', r)), 20_000, 'the PING after a WAIT')
    }),
  )
  const cpu = process.cpuUsage()
  for (const s of socks) s.destroy()
  // CPU time (not wall time, which a busy machine stretches) until the process is idle again
  for (let idle = 0, last = process.cpuUsage(); idle < 3; ) {
    await new Promise((r) => setTimeout(r, 150))
    const d = process.cpuUsage(last)
    last = process.cpuUsage()
    idle = d.user + d.system < 15_000 ? idle + 1 : 0
  }
  const used = process.cpuUsage(cpu)
  const ms = (used.user + used.system) / 1000
  t.true(ms < 2000, `${ms.toFixed(0)} ms of CPU to drop 800 waiting connections`)
  const other = await TcpStore.connect({ host: '127.0.0.1', port: server.port, timeoutMs: 2000 })
  t.is(await other.numKeys(), 0)
  other.close()
  await server.close()
})

// ---- process-group options, environment and CLI ----

test('initProcessGroup: a rank, world size, port or timeout out of range is ERR_DISTCP_INVALID_INPUT at once, not a connection retried for 300 s or forever', async (t) => {
  const port = await freePort()
  const bad: [Record<string, unknown>, RegExp][] = [
    [{ rank: -1, worldSize: 2 }, /rank -1 of world size 2/],
    [{ rank: 0.5, worldSize: 2 }, /rank 0.5 of world size 2/],
    [{ rank: 'abc', worldSize: 2 }, /rank abc of world size 2/],
    [{ rank: 2, worldSize: 2 }, /rank 2 of world size 2/],
    [{ rank: 0, worldSize: 0 }, /world size 0/],
    [{ rank: 1, worldSize: 1e9 }, /world size 1000000000.*131072/],
    [{ rank: 0, worldSize: 2, masterPort: 0 }, /port 0/],
    [{ rank: 0, worldSize: 2, masterPort: 70000 }, /port 70000/],
    [{ rank: 0, worldSize: 2, masterPort: Number('x') }, /port NaN/],
    [{ rank: 1, worldSize: 2, timeoutMs: NaN }, /timeoutMs NaN/],
    [{ rank: 1, worldSize: 2, timeoutMs: -5 }, /timeoutMs -5/],
    [{ rank: 1, worldSize: 2, timeoutMs: Infinity }, /timeoutMs Infinity/],
    [{ rank: 1, worldSize: 2, timeoutMs: 0 }, /timeoutMs 0/],
    [{ rank: 1, worldSize: 2, localRank: -3 }, /localRank -3/],
  ]
  for (const [o, msg] of bad) {
    const started = Date.now()
    await t.throwsAsync(
      within(initProcessGroup({ masterAddr: '127.0.0.1', masterPort: port, useAgentStore: true, ...o } as never), 2000, JSON.stringify(o)),
      { code: 'ERR_DISTCP_INVALID_INPUT', message: msg } as never,
      JSON.stringify(o),
    )
    t.true(Date.now() - started < 500)
  }
  // the store's own entry points check their timeout and port too (NaN made connect's loop spin forever, a port
  // out of range was retried for the whole timeout, and listen threw a RangeError)
  await t.throwsAsync(within(TcpStore.connect({ host: '127.0.0.1', port, timeoutMs: NaN }), 2000, 'connect NaN'), { code: 'ERR_DISTCP_INVALID_INPUT' } as never)
  for (const bad of [0, 70000, -1, 1.5]) {
    await t.throwsAsync(within(TcpStore.connect({ host: '127.0.0.1', port: bad, timeoutMs: 60_000 }), 2000, `connect port ${bad}`), { code: 'ERR_DISTCP_INVALID_INPUT', message: /port is not in \[1, 65535\]/ } as never)
  }
  await t.throwsAsync(TcpStoreServer.listen(70000, '127.0.0.1'), { code: 'ERR_DISTCP_STORE_LISTEN', message: /127\.0\.0\.1:70000/ } as never)
})

test('initProcessGroup: an unresolvable MASTER_ADDR ends at the timeout with ERR_DISTCP_STORE_CONNECT naming the address and rank', async (t) => {
  const started = Date.now()
  await t.throwsAsync(
    within(initProcessGroup({ rank: 1, worldSize: 2, masterAddr: 'no-such-host.invalid', masterPort: 29511, timeoutMs: 300, useAgentStore: true }), 3000, 'connect'),
    { code: 'ERR_DISTCP_STORE_CONNECT', message: /no-such-host\.invalid:29511 \(rank 1\): could not connect within 300 ms/ } as never,
  )
  t.true(Date.now() - started < 2000)
})

test('initProcessGroup: WORLD_SIZE=1e9 and RANK=abc from the environment are refused, naming the variable or range', async (t) => {
  const saved = { ...process.env }
  try {
    Object.assign(process.env, { RANK: '1', WORLD_SIZE: '1e9', MASTER_PORT: String(await freePort()), MASTER_ADDR: '127.0.0.1', TORCHELASTIC_USE_AGENT_STORE: 'True' })
    await t.throwsAsync(within(initProcessGroup(), 2000, 'WORLD_SIZE=1e9'), { code: 'ERR_DISTCP_INVALID_INPUT', message: /world size 1000000000/ } as never)
    process.env.RANK = 'abc'
    process.env.WORLD_SIZE = '2'
    await t.throwsAsync(within(initProcessGroup(), 2000, 'RANK=abc'), { code: 'ERR_DISTCP_INVALID_INPUT', message: /RANK=abc/ } as never)
  } finally {
    for (const k of ['RANK', 'WORLD_SIZE', 'MASTER_PORT', 'MASTER_ADDR', 'TORCHELASTIC_USE_AGENT_STORE']) {
      if (saved[k] === undefined) delete process.env[k]
      else process.env[k] = saved[k]
    }
  }
})

test('distcp convert --master-port 0 / --world 0 / --rank 2 --world 2: exit 1 with the coded error at once', async (t) => {
  const write = process.stderr.write.bind(process.stderr)
  let err = ''
  process.stderr.write = ((s: string | Uint8Array) => {
    err += String(s)
    return true
  }) as typeof process.stderr.write
  try {
    for (const [flags, msg] of [
      [['--rank', '0', '--world', '2', '--master-port', '0'], /port 0/],
      [['--rank', '0', '--world', '0', '--master-port', '29400'], /world size 0/],
      [['--rank', '2', '--world', '2', '--master-port', '29400'], /rank 2 of world size 2/],
      [['--rank', '0', '--world', '2', '--master-port', '70000'], /port 70000/],
    ] as [string[], RegExp][]) {
      err = ''
      const code = await within(cli(['convert', '/nonexistent-dcp', join(tmpdir(), 'never-out'), '--config', '/nonexistent-config', ...flags]), 2000, flags.join(' '))
      t.is(code, 1, err)
      t.regex(err, msg)
      t.regex(err, /ERR_DISTCP_INVALID_INPUT/)
    }
  } finally {
    process.stderr.write = write
  }
})

// ---- collectives against a hostile or buggy rank ----

test('reduceScatter: a rank whose outcome is not distcp JSON fails every rank with a CheckpointError naming it (not a SyntaxError on rank 0)', async (t) => {
  for (const body of ['not json {', 'null', '[1]', '{"err":5}']) {
    const masterPort = await freePort()
    const prefix = 'hj'
    const [pg0, raw] = await Promise.all([
      initProcessGroup({ rank: 0, worldSize: 2, masterAddr: '127.0.0.1', masterPort, timeoutMs: 2000, useAgentStore: false, prefix }),
      // rank 1 is a raw client writing its outcome by hand, where a distcp rank would
      TcpStore.connect({ host: '127.0.0.1', port: masterPort, timeoutMs: 2000, rank: 1 }),
    ])
    await raw.set(`${prefix}/0/plan/gather/1/n`, head(0n, body))
    const e = await t.throwsAsync(within(pg0.reduceScatter('plan', async () => 1, (all) => all), 3000, body), { instanceOf: CheckpointError })
    t.is(e?.code, 'ERR_DISTCP_RANK_FAILED')
    t.deepEqual(Object.keys((e as CheckpointError).failures), ['1'], e?.message)
    t.regex(e?.message ?? '', /rank 1: sent an outcome that is not distcp's/)
    // and rank 1 is told the same
    const verdict = JSON.parse((await raw.get(`${prefix}/1/plan/result/1/n`)).subarray(8).toString()) as { fail: Record<string, string> }
    t.deepEqual(Object.keys(verdict.fail), ['1'])
    // leave as rank 1 would, so rank 0's destroy does not wait for it
    await raw.add(`${prefix}/left/count`, 1)
    raw.close()
    await pg0.destroy()
  }
})

test('reduceScatter: a rank 0 whose verdict is not distcp JSON makes rank 1 reject with a CheckpointError naming rank 0', async (t) => {
  const server = await TcpStoreServer.listen(0, '127.0.0.1')
  const raw = await TcpStore.connect({ host: '127.0.0.1', port: server.port, timeoutMs: 2000, rank: 0 })
  const pg1 = await initProcessGroup({ rank: 1, worldSize: 2, masterAddr: '127.0.0.1', masterPort: server.port, timeoutMs: 2000, useAgentStore: true, prefix: 'hv' })
  await raw.set('hv/1/plan/result/1/n', head(0n, '{"ok": 1'))
  const e = await t.throwsAsync(within(pg1.reduceScatter('plan', async () => 1, (all) => all), 3000, 'verdict'), { instanceOf: CheckpointError })
  t.deepEqual(Object.keys((e as CheckpointError).failures), ['0'])
  t.regex(e?.message ?? '', /rank 0: answered with a verdict that is not distcp's/)
  raw.close()
  pg1.store.close()
  await server.close()
})

test('gather: a rank whose head announces parts that are not there is ERR_DISTCP_STORE_PROTOCOL naming its key, and the root keeps its store connection', async (t) => {
  // 3: a CHECK finds them missing; more than MAX_COLLECTIVE_PARTS (512): refused before the store is asked
  for (const parts of [3n, 513n, 100_000n, 2n ** 40n]) {
    const masterPort = await freePort()
    const prefix = 'hp'
    const [pg0, raw] = await Promise.all([
      initProcessGroup({ rank: 0, worldSize: 2, masterAddr: '127.0.0.1', masterPort, timeoutMs: 2000, useAgentStore: false, prefix }),
      TcpStore.connect({ host: '127.0.0.1', port: masterPort, timeoutMs: 2000, rank: 1 }),
    ])
    await raw.set(`${prefix}/0/gather/1/n`, head(parts, 'x'))
    const e = await t.throwsAsync(within(pg0.gather(Buffer.from('mine')), 3000, `gather ${parts}`), { instanceOf: DistcpError })
    t.is(e?.code, 'ERR_DISTCP_STORE_PROTOCOL', e?.message)
    t.true(e?.message.includes(`${prefix}/0/gather/1/n`), e?.message)
    t.regex(e?.message ?? '', parts === 3n ? /announces 3 part\(s\) that are not all in the store/ : /over the 512 a distcp rank sends \(MAX_COLLECTIVE_PARTS\)/)
    // the root's connection survived: it still talks to the store
    await raw.set('after', '1')
    t.is((await pg0.store.get('after')).toString(), '1')
    await raw.add(`${prefix}/left/count`, 1)
    raw.close()
    await pg0.destroy()
  }
})

test('a very long but valid timeout (1.5e9 ms) does not overflow the timer of a non-root rank waiting for rank 0', async (t) => {
  const pgs = await group(2, 1.5e9)
  const got = await within(
    Promise.all(
      pgs.map((pg) =>
        pg.allReduce(
          'slow',
          async () => {
            if (pg.rank === 0) await new Promise((r) => setTimeout(r, 300))
            return pg.rank
          },
          (all) => all.reduce((a, b) => a + b, 0),
        ),
      ),
    ),
    5000,
    'allReduce',
  )
  t.deepEqual(got, [1, 1])
  // destroy waits for every rank to leave, bounded by min(timeout, 30 s): all leave together here
  await Promise.all(pgs.map((pg) => pg.destroy()))
})

// serial, and 1 s rather than a few hundred ms: the group's timeout also bounds each store reply, and rank 0 serves
// the store on this event loop, which the concurrent tests of this file (800 connections, 8 MiB values) hold for
// hundreds of ms at a time on a loaded machine
test('ranks calling collectives in different orders end in coded errors naming the other rank within their bounds', async (t) => {
  const pgs = await group(2, 1000)
  try {
    const started = Date.now()
    const [b, a] = await Promise.allSettled([pgs[0].barrier(), pgs[1].allGather(Buffer.from('x'))])
    t.is((b as PromiseRejectedResult).reason?.code, 'ERR_DISTCP_COLLECTIVE_TIMEOUT')
    t.deepEqual((b as PromiseRejectedResult).reason?.missing, [1])
    t.deepEqual((a as PromiseRejectedResult).reason?.missing, [0])
    // reduceScatter on rank 0, allReduce on rank 1: rank 0 names rank 1 at its timeout, rank 1 names rank 0 at 2x + 1 s
    const [p, w] = await Promise.allSettled([pgs[0].reduceScatter('plan', async () => 1, (all) => all), pgs[1].allReduce('write', async () => 1, (all) => all.length)])
    t.regex(String((p as PromiseRejectedResult).reason?.message), /rank 1: did not report within 1000 ms/)
    t.regex(String((w as PromiseRejectedResult).reason?.message), /rank 0: rank 0 did not answer within 3000 ms/)
    // 1 s for the first pair, 3 s for rank 1 in the second, and slack for a loaded machine
    t.true(Date.now() - started < 10_000, `${Date.now() - started} ms`)
  } finally {
    await Promise.all(pgs.map((pg) => pg.destroy().catch(() => undefined)))
  }
})

// ---- multi-rank saves with inputs that disagree ----

const f32 = (v: number, n = 2) => ({ dtype: 'float32' as const, shape: [n], data: new Float32Array(n).fill(v) })

test('save: ranks given different checkpointIds (both folders exist) fail on every rank naming rank 1, with no .metadata anywhere', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'distcp-hostile-'))
  const ids = [join(dir, 'a'), join(dir, 'b')]
  mkdirSync(ids[1])
  const pgs = await group(2)
  const r = await within(Promise.allSettled(pgs.map((pg) => save({ [`w${pg.rank}`]: f32(pg.rank) }, { checkpointId: ids[pg.rank], processGroup: pg }))), 8000, 'save')
  for (const x of r) {
    t.is(x.status, 'rejected')
    const e = (x as PromiseRejectedResult).reason as CheckpointError
    t.true(e instanceof CheckpointError, String(e))
    t.is(e.code, 'ERR_DISTCP_RANK_FAILED')
    t.regex(e.message, /rank 1 wrote `__1_0\.distcp` \(\d+ bytes\), which is not in .*\/a/)
  }
  t.false(existsSync(join(ids[0], '.metadata')), readdirSync(ids[0]).join(','))
  t.false(existsSync(join(ids[1], '.metadata')))
  await Promise.all(pgs.map((pg) => pg.destroy()))
  rmSync(dir, { recursive: true, force: true })
})

test('save: ranks started with different world sizes fail on every rank naming the one that differs, and nothing is written', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'distcp-hostile-'))
  t.teardown(() => rmSync(dir, { recursive: true, force: true }))
  const masterPort = await freePort()
  const join2 = (rank: number, worldSize: number) =>
    initProcessGroup({ rank, worldSize, masterAddr: '127.0.0.1', masterPort, timeoutMs: 3000, useAgentStore: false, prefix: 'hw' })
  // rank 1 was told WORLD_SIZE=3 (a typo in one launcher): before, rank 0 committed a checkpoint of ranks 0 and 1
  // only while rank 1 planned for three
  const pgs = await Promise.all([join2(0, 2), join2(1, 3)])
  const ckpt = join(dir, 'ckpt')
  const r = await within(Promise.allSettled(pgs.map((pg) => save({ [`w${pg.rank}`]: f32(pg.rank + 1) }, { checkpointId: ckpt, processGroup: pg }))), 10_000, 'save')
  for (const x of r) {
    t.is(x.status, 'rejected')
    const e = (x as PromiseRejectedResult).reason as CheckpointError
    t.true(e instanceof CheckpointError, String(e))
    t.deepEqual(Object.keys(e.failures), ['1'], e.message)
    t.regex(e.message, /rank 1: was started with world size 3, rank 0 with 2 \(WORLD_SIZE must be the same on every rank\)/)
  }
  t.false(existsSync(join(ckpt, '.metadata')))
  t.deepEqual(existsSync(ckpt) ? readdirSync(ckpt).filter((f) => f.endsWith('.distcp')) : [], [])
  await Promise.all(pgs.map((pg) => pg.destroy()))
})

test('convertDcpToHf: ranks given different output folders fail on every rank naming rank 1, and neither folder is written', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'distcp-hostile-'))
  t.teardown(() => rmSync(dir, { recursive: true, force: true }))
  const dcp = join(dir, 'dcp')
  await save({ 'model.w': f32(3, 8) }, { checkpointId: dcp })
  mkdirSync(join(dir, 'model'))
  writeFileSync(join(dir, 'model', 'config.json'), '{}')
  const outs = [join(dir, 'hf-a'), join(dir, 'hf-b')]
  const pgs = await group(2)
  // before: both resolved, rank 1 with `hf-b`, where nothing was written (its shards went to rank 0's `hf-a`)
  const r = await within(
    Promise.allSettled(pgs.map((pg) => convertDcpToHf(dcp, outs[pg.rank], join(dir, 'model'), undefined, { processGroup: pg, onWarning: () => {} }))),
    8000,
    'convert',
  )
  for (const x of r) {
    t.is(x.status, 'rejected')
    const e = (x as PromiseRejectedResult).reason as CheckpointError
    t.true(e instanceof CheckpointError, String(e))
    t.regex(e.message, /rank 1 planned a different conversion than rank 0 \(every rank must convert the same input into the same output folder/)
  }
  t.false(existsSync(outs[0]))
  t.false(existsSync(outs[1]))
  await Promise.all(pgs.map((pg) => pg.destroy()))
})

test('save: a replicated tensor with a different dtype or shape on two ranks is a coded error on every rank naming both, not one rank\'s copy saved', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'distcp-hostile-'))
  const pgs = await group(2)
  const cases: [string, (r: number) => ReturnType<typeof f32> | { dtype: 'float64'; shape: number[]; data: Float64Array }, RegExp][] = [
    ['dtype', (r) => (r === 0 ? f32(1) : { dtype: 'float64', shape: [2], data: new Float64Array(2) }), /`w`: rank 0 saves it as a tensor float32 \[2\] of \[2\], rank 1 as a tensor float64 \[2\] of \[2\]/],
    ['shape', (r) => f32(1, r + 2), /`w`: rank 0 saves it as a tensor float32 \[2\] of \[2\], rank 1 as a tensor float32 \[3\] of \[3\]/],
  ]
  for (const [name, w, msg] of cases) {
    const id = join(dir, name)
    const r = await within(Promise.allSettled(pgs.map((pg) => save({ w: w(pg.rank), same: f32(5) }, { checkpointId: id, processGroup: pg }))), 8000, name)
    for (const x of r) {
      t.is(x.status, 'rejected', name)
      const e = (x as PromiseRejectedResult).reason as CheckpointError
      t.is(e.code, 'ERR_DISTCP_RANK_FAILED')
      t.regex(e.message, msg)
    }
    t.false(existsSync(join(id, '.metadata')), name)
  }
  // the same replicated tensor on both ranks still saves (dedup keeps one copy)
  const ok = await Promise.all(pgs.map((pg) => save({ w: f32(1), [`own${pg.rank}`]: f32(pg.rank) }, { checkpointId: join(dir, 'ok'), processGroup: pg })))
  t.deepEqual(ok[0].keys.slice().sort(), ['own0', 'own1', 'w'])
  await Promise.all(pgs.map((pg) => pg.destroy()))
  rmSync(dir, { recursive: true, force: true })
})
