// Store collectives of a process group, several ranks in one process (rank 0 hosts the TCPStore): payloads across
// the store's 8 MiB value limit, torch's reduce_scatter failure model (every rank rejects with the same error naming
// the failed rank), timeouts that list the ranks that never arrived, torchrun's environment variables, keys removed
// once read, and the NeMo-style saveCheckpoint / loadCheckpoint across ranks.
import test from 'ava'
import { existsSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

import { AsyncSaver, CheckpointError, initProcessGroup, loadCheckpoint, openCheckpoint, save, saveCheckpoint, type Model, type ProcessGroup } from '../src/index.js'
import { freePort } from './helpers.js'


async function group(n: number, timeoutMs = 5000): Promise<ProcessGroup[]> {
  const masterPort = await freePort()
  return Promise.all(Array.from({ length: n }, (_, rank) => initProcessGroup({ rank, worldSize: n, masterAddr: '127.0.0.1', masterPort, timeoutMs, useAgentStore: false, prefix: `t${masterPort}` })))
}

test('gather, scatter, broadcast, allGather and barrier carry payloads of 0 B, 1 B, either side of one store value (8 MiB less the 8-byte head) and over 8 MiB', async (t) => {
  const pgs = await group(3)
  const payload = (r: number, n: number): Buffer => Buffer.alloc(n, r + 1)
  for (const n of [0, 1, 8 * 1024 * 1024 - 8, 8 * 1024 * 1024 - 7, 8 * 1024 * 1024, 20 * 1024 * 1024]) {
    const got = await Promise.all(pgs.map((pg) => pg.gather(payload(pg.rank, n))))
    t.deepEqual(got[0]?.map((b) => [b.length, b[n - 1]]), [0, 1, 2].map((r) => [n, n ? r + 1 : undefined]))
    t.is(got[1], null)
    const sc = await Promise.all(pgs.map((pg) => pg.scatter(pg.rank === 0 ? [0, 1, 2].map((r) => payload(r, n)) : null)))
    t.deepEqual(sc.map((b) => [b.length, b[0]]), [0, 1, 2].map((r) => [n, n ? r + 1 : undefined]))
    const bc = await Promise.all(pgs.map((pg) => pg.broadcast(pg.rank === 0 ? payload(6, n) : null)))
    t.true(bc.every((b) => b.length === n && (n === 0 || b[n - 1] === 7)))
    const ag = await Promise.all(pgs.map((pg) => pg.allGather(payload(pg.rank, n))))
    t.true(ag.every((all) => all.every((b, r) => b.length === n && (n === 0 || b[0] === r + 1))))
    await Promise.all(pgs.map((pg) => pg.barrier()))
  }
  await Promise.all(pgs.map((pg) => pg.destroy()))
})

test('collectives leave nothing behind in the store: a trainer saving for weeks does not grow it', async (t) => {
  const pgs = await group(3)
  const round = async (i: number) => {
    await Promise.all(pgs.map((pg) => pg.reduceScatter('plan', async () => pg.rank + i, (all) => all.map((x) => x * 2))))
    await Promise.all(pgs.map((pg) => pg.allReduce('write', async () => pg.rank, (all) => all.length)))
    await Promise.all(pgs.map((pg) => pg.gather(Buffer.alloc(100, i))))
    await Promise.all(pgs.map((pg) => pg.scatter(pg.rank === 0 ? [0, 1, 2].map(() => Buffer.alloc(100)) : null)))
    await Promise.all(pgs.map((pg) => pg.broadcast(pg.rank === 0 ? Buffer.alloc(100) : null)))
    await Promise.all(pgs.map((pg) => pg.allGather(Buffer.alloc(100))))
    await Promise.all(pgs.map((pg) => pg.barrier()))
  }
  await round(0)
  const after1 = await pgs[0].store.numKeys()
  for (let i = 1; i < 20; i++) await round(i)
  const after20 = await pgs[0].store.numKeys()
  // what is left is the last round's shared keys (removed by the next collective) and the group's own few
  t.is(after20, after1, `keys after 1 round: ${after1}, after 20: ${after20}`)
  t.true(after1 < 20, `${after1} keys`)
  await Promise.all(pgs.map((pg) => pg.destroy()))
})

test('reduceScatter: a rank that fails makes every rank reject with the same error naming it', async (t) => {
  const pgs = await group(3)
  const ok = await Promise.all(pgs.map((pg) => pg.reduceScatter('plan', async () => pg.rank * 10, (all) => all.map((x) => x + 1))))
  t.deepEqual(ok, [1, 11, 21])
  const results = await Promise.allSettled(
    pgs.map((pg) =>
      pg.reduceScatter(
        'plan',
        async () => {
          if (pg.rank === 1) throw new Error('disk full')
          return pg.rank
        },
        (all) => all,
      ),
    ),
  )
  for (const r of results) {
    t.is(r.status, 'rejected')
    const e = (r as PromiseRejectedResult).reason as CheckpointError
    t.true(e instanceof CheckpointError)
    t.is(e.code, 'ERR_DISTCP_RANK_FAILED')
    t.deepEqual(e.failures, { 1: 'disk full' })
    t.is(e.message, 'step `plan` failed on 1 rank(s): rank 1: disk full')
  }
  // and the group still works afterwards
  t.deepEqual(await Promise.all(pgs.map((pg) => pg.allReduce('write', async () => pg.rank, (all) => all.join(',')))), ['0,1,2', '0,1,2', '0,1,2'])
  await Promise.all(pgs.map((pg) => pg.destroy()))
})

// serial: ava runs serial tests before the concurrent ones, so no 8 MiB payload test shares the event loop with
// these 400 ms timeouts
test.serial('a barrier or collective that a rank never reaches times out listing the missing ranks', async (t) => {
  const pgs = await group(4, 400)
  const e = await t.throwsAsync(Promise.all([pgs[0].barrier(), pgs[2].barrier()]), { code: 'ERR_DISTCP_COLLECTIVE_TIMEOUT' })
  t.deepEqual((e as unknown as { missing: number[] }).missing, [1, 3])
  t.regex(e?.message ?? '', /barrier: rank\(s\) 1, 3 of 4 did not arrive within 400 ms/)
  await Promise.all(pgs.map((pg) => pg.destroy()))
  // a reduce_scatter where rank 3 never shows up (a fresh group: a timed-out collective leaves a group out of step,
  // as in torch): the three others reject naming it
  const fresh = await group(4, 400)
  const r = await Promise.allSettled(fresh.slice(0, 3).map((pg) => pg.reduceScatter('write', async () => 1, (all) => all)))
  for (const x of r) t.deepEqual(((x as PromiseRejectedResult).reason as CheckpointError).failures, { 3: 'did not report within 400 ms (crashed, killed or hung)' })
  await Promise.all(fresh.map((pg) => pg.destroy()))
})

test.serial('initProcessGroup reads torchrun’s variables and says which are missing', async (t) => {
  const saved = { ...process.env }
  try {
    delete process.env.RANK
    delete process.env.WORLD_SIZE
    delete process.env.MASTER_PORT
    const e = await t.throwsAsync(initProcessGroup(), { code: 'ERR_DISTCP_INVALID_INPUT' })
    t.regex(e?.message ?? '', /RANK, WORLD_SIZE, MASTER_PORT not given/)
    const port = await freePort()
    Object.assign(process.env, { RANK: '0', WORLD_SIZE: '1', MASTER_ADDR: '127.0.0.1', MASTER_PORT: String(port), TORCHELASTIC_USE_AGENT_STORE: 'False' })
    const pg = await initProcessGroup({ timeoutMs: 2000 })
    t.deepEqual([pg.rank, pg.worldSize, pg.localRank, pg.store.port], [0, 1, 0, port])
    await pg.barrier()
    await pg.destroy()
    // an agent store that is not there: a coded error naming the address and rank
    Object.assign(process.env, { RANK: '1', WORLD_SIZE: '2', TORCHELASTIC_USE_AGENT_STORE: 'True' })
    const e2 = await t.throwsAsync(initProcessGroup({ timeoutMs: 300 }), { code: 'ERR_DISTCP_STORE_CONNECT' })
    t.regex(e2?.message ?? '', new RegExp(`127\\.0\\.0\\.1:${port} \\(rank 1\\)`))
  } finally {
    for (const k of ['RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT', 'TORCHELASTIC_USE_AGENT_STORE']) delete process.env[k]
    Object.assign(process.env, saved)
  }
})

test('saveCheckpoint / loadCheckpoint with a process group (also async): each rank its slice, the tokenizer written once by rank 0 before any rank returns', async (t) => {
  const pgs = await group(2)
  const dir = mkdtempSync(join(tmpdir(), 'distcp-ranks-ckpt-'))
  const full = new Float32Array([0, 1, 2, 3, 4, 5, 6, 7])
  // rank r holds rows 2r..2r+1 of a 4 x 2 weight (Shard(0))
  const slice = (r: number) => ({
    dtype: 'float32' as const,
    shape: [2, 2],
    data: new Uint8Array(full.slice(4 * r, 4 * r + 4).buffer),
    globalShape: [4, 2],
    globalOffsets: [2 * r, 0],
  })
  const model = (r: number, w = slice(r)): Model => ({
    namedParameters: () => [['w', w]],
    stateDict: () => ({ w }),
    loadStateDict: () => undefined,
  })
  const calls: number[] = []
  let written = 0
  const tokenizer = (r: number) => ({
    async savePretrained(to: string) {
      calls.push(r)
      await new Promise((res) => setTimeout(res, 300))
      mkdirSync(to, { recursive: true })
      writeFileSync(join(to, 'tokenizer.json'), '{}')
      written = performance.now()
    },
  })
  const returned = await Promise.all(
    pgs.map(async (pg) => {
      await saveCheckpoint(model(pg.rank), join(dir, 'weights'), { processGroup: pg, tokenizer: tokenizer(pg.rank), tokenizerPath: join(dir, 'tokenizer') })
      return performance.now()
    }),
  )
  t.deepEqual(calls, [0], 'only rank 0 wrote the tokenizer')
  t.true(returned.every((at) => at >= written), 'no rank returned before the tokenizer was written')
  t.true(existsSync(join(dir, 'tokenizer', 'tokenizer.json')))
  t.deepEqual(readdirSync(join(dir, 'weights')).sort(), ['.metadata', '__0_0.distcp', '__1_0.distcp'])
  const ck = await openCheckpoint(join(dir, 'weights'))
  t.deepEqual([...new Float32Array(new Uint8Array((await ck.read('model.w')).data).slice().buffer)], [...full])
  ck.close()
  // and each rank loads its own slice back
  const into = pgs.map((pg) => ({ ...slice(pg.rank), data: new Uint8Array(16) }))
  await Promise.all(pgs.map((pg) => loadCheckpoint(model(pg.rank, into[pg.rank]), join(dir, 'weights'), { processGroup: pg })))
  for (const pg of pgs) t.deepEqual([...new Float32Array(into[pg.rank].data.slice().buffer)], [...full.slice(4 * pg.rank, 4 * pg.rank + 4)])
  // async: each rank's slice is staged at once (the trainer may change it from then on), the ranks coordinate as
  // they write, and the tokenizer is written once after both saves committed
  calls.length = 0
  const live = pgs.map((pg) => slice(pg.rank))
  // one saver per rank, as each rank's process would have (the ranks of this test share one process)
  const savers = pgs.map(() => new AsyncSaver())
  const handles = pgs.map((pg) =>
    saveCheckpoint(model(pg.rank, live[pg.rank]), join(dir, 'w2'), {
      processGroup: pg,
      async: true,
      saver: savers[pg.rank],
      tokenizer: tokenizer(pg.rank),
      tokenizerPath: join(dir, 'tok2'),
    }),
  )
  await Promise.all(handles.map((h) => h.staged))
  for (const w of live) w.data.fill(0xff)
  await Promise.all(handles.map((h) => h.committed))
  t.deepEqual(calls, [0])
  t.true(existsSync(join(dir, 'tok2', 'tokenizer.json')))
  const ck2 = await openCheckpoint(join(dir, 'w2'))
  t.deepEqual([...new Float32Array(new Uint8Array((await ck2.read('model.w')).data).slice().buffer)], [...full], 'what was staged, not what changed after')
  ck2.close()
  // a rank whose staging fails makes every rank's save reject with the same error, and nothing is committed
  const bad = (r: number): Model => ({ namedParameters: () => [], stateDict: () => ({ w: r === 1 ? { dtype: 'float32', shape: 3, data: 1 } : slice(0) }), loadStateDict: () => undefined })
  const failing = pgs.map((pg) => saveCheckpoint(bad(pg.rank), join(dir, 'w3'), { processGroup: pg, async: true, saver: savers[pg.rank] }))
  const errs = await Promise.all(failing.map((h) => t.throwsAsync(h.committed, { instanceOf: CheckpointError })))
  t.true(errs.every((e) => e?.message === errs[0]?.message && e.message.includes('rank 1')), errs.map((e) => e?.message).join(' | '))
  t.false(existsSync(join(dir, 'w3', '.metadata')))
  await Promise.all(pgs.map((pg) => pg.destroy()))
  rmSync(dir, { recursive: true, force: true })
})

// as a single-rank saveAsync, the ranks' data files are written on a thread of their own at nice 10
// (crates/distcp-node/src/background.rs), a blocking save's are not. Seen from /proc while the writes run (Linux).
test.serial('saveAsync with a process group writes each rank’s data file on a lower-priority thread; save does not', async (t) => {
  if (process.platform !== 'linux') return t.pass()
  const threads = (): { tid: string; name: string; nice: number }[] =>
    readdirSync('/proc/self/task').flatMap((tid) => {
      try {
        const name = readFileSync(`/proc/self/task/${tid}/comm`, 'utf8').trim()
        // field 19 of stat is the nice value; the command name (field 2) may hold spaces, so count after its ')'
        const stat = readFileSync(`/proc/self/task/${tid}/stat`, 'utf8')
        return [{ tid, name, nice: Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[16]) }]
      } catch {
        return []
      }
    })
  const base = threads()[0].nice
  const pgs = await group(2, 60_000)
  const dir = mkdtempSync(join(tmpdir(), 'distcp-prio-'))
  // rank r holds rows [r*32, r*32+32) of a 64 × 1 Mi float32 tensor: 128 MiB per rank
  const slice = (r: number) => ({ w: { dtype: 'float32' as const, shape: [32, 1024 * 1024], data: new Uint8Array(128 * 2 ** 20).fill(r + 1), globalShape: [64, 1024 * 1024], globalOffsets: [r * 32, 0] } })
  const watch = async (p: Promise<unknown>) => {
    const seen = new Map<string, number>()
    let done = false
    void p.finally(() => (done = true)).catch(() => undefined)
    while (!done) {
      for (const th of threads()) if (th.name.startsWith('distcp-backgrou')) seen.set(th.tid, th.nice)
      await new Promise((r) => setTimeout(r, 2))
    }
    await p
    return seen
  }
  const savers = pgs.map(() => new AsyncSaver())
  const bg = await watch(Promise.all(pgs.map((pg, r) => savers[r].save(slice(r), { checkpointId: join(dir, 'async'), processGroup: pg }).committed)))
  t.true(bg.size > 0, 'a background writer was seen')
  t.deepEqual([...new Set(bg.values())], [Math.max(base, 10)], `threads seen: ${JSON.stringify([...bg])}`)
  const fg = await watch(Promise.all(pgs.map((pg, r) => save(slice(r), { checkpointId: join(dir, 'blocking'), processGroup: pg }))))
  t.is(fg.size, 0)
  t.true(threads().every((th) => th.nice === base || th.name.startsWith('distcp-backgrou')), 'no other thread was made nicer')
  await Promise.all(savers.map((s) => s.close()))
  await Promise.all(pgs.map((pg) => pg.destroy()))
  const ck = await openCheckpoint(join(dir, 'async'))
  const row = await ck.read('w', { offsets: [63, 0], sizes: [1, 4] })
  t.deepEqual([...row.data.subarray(0, 4)], [2, 2, 2, 2])
  ck.close()
  rmSync(dir, { recursive: true, force: true })
})
