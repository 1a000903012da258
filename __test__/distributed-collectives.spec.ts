// Store collectives of a process group, several ranks in one process (rank 0 hosts the TCPStore): payloads across
// the store's 8 MiB value limit, torch's reduce_scatter failure model (every rank rejects with the same error naming
// the failed rank), timeouts that list the ranks that never arrived, and torchrun's environment variables.
import test from 'ava'
import { createServer } from 'node:net'

import { CheckpointError, initProcessGroup, type ProcessGroup } from '../src/index.js'

async function freePort(): Promise<number> {
  return new Promise((resolve) => {
    const s = createServer().listen(0, '127.0.0.1', () => {
      const port = (s.address() as { port: number }).port
      s.close(() => resolve(port))
    })
  })
}

async function group(n: number, timeoutMs = 5000): Promise<ProcessGroup[]> {
  const masterPort = await freePort()
  return Promise.all(Array.from({ length: n }, (_, rank) => initProcessGroup({ rank, worldSize: n, masterAddr: '127.0.0.1', masterPort, timeoutMs, useAgentStore: false, prefix: `t${masterPort}` })))
}

test('gather, scatter, broadcast, allGather and barrier carry payloads of 0 B, 1 B and over 8 MiB', async (t) => {
  const pgs = await group(3)
  const payload = (r: number, n: number): Buffer => Buffer.alloc(n, r + 1)
  for (const n of [0, 1, 8 * 1024 * 1024, 8 * 1024 * 1024 + 1, 20 * 1024 * 1024]) {
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

test('a barrier or collective that a rank never reaches times out listing the missing ranks', async (t) => {
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

test('initProcessGroup reads torchrun’s variables and says which are missing', async (t) => {
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
