// One rank of bench/multirank/coord.ts: the coordination a multi-rank save does (plan gather + scatter, write
// result gather + commit broadcast) with plan-sized payloads (ITEMS entries, default 200) and no I/O, ITER times;
// rank 0 prints the latencies.
import { initProcessGroup } from '../../src/index.js'

const iters = Number(process.env.ITER ?? '50')
const pg = await initProcessGroup({ timeoutMs: 60_000 })
// a plan of 200 items by default, about what a small model's rank sends
const plan = Array.from({ length: Number(process.env.ITEMS ?? 200) }, (_, i) => ({ fqn: `layers.${i}.weight`, type: 'shard', dtype: 'bfloat16', size: [4096, 4096], offsets: [pg.rank * 512, 0], sizes: [512, 4096] }))
const times: number[] = []
for (let i = 0; i < iters + 5; i++) {
  const t0 = performance.now()
  const mine = await pg.reduceScatter('plan', async () => plan, (all) => all.map((p) => p.map((w) => [w.fqn, w.offsets])))
  await pg.allReduce('write', async () => mine.map(([f]) => [f, 0, 100]), (all) => all.length)
  if (i >= 5) times.push(performance.now() - t0)
}
if (pg.rank === 0) {
  times.sort((a, b) => a - b)
  const q = (p: number): string => times[Math.min(times.length - 1, Math.floor(p * times.length))].toFixed(2)
  console.log(JSON.stringify({ ranks: pg.worldSize, iters, p50_ms: q(0.5), p99_ms: q(0.99) }))
}
await pg.destroy()
