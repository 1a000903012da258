// Coordination cost of a multi-rank save (plan gather + scatter + write-result gather + commit broadcast over the
// rank-0-hosted TCPStore), for N = 2, 4, 8, 16 Node ranks on this machine: p50/p99 per save.
//   node --import @oxc-node/core/register bench/multirank/coord.ts [N …]
import { spawn } from 'node:child_process'
import { createServer } from 'node:net'
import { fileURLToPath } from 'node:url'

const rankScript = fileURLToPath(new URL('./rank.ts', import.meta.url))
const sizes = process.argv.slice(2).map(Number)

async function freePort(): Promise<number> {
  return new Promise((resolve) => {
    const s = createServer().listen(0, '127.0.0.1', () => {
      const port = (s.address() as { port: number }).port
      s.close(() => resolve(port))
    })
  })
}

for (const n of sizes.length ? sizes : [2, 4, 8, 16]) {
  const port = await freePort()
  const procs = Array.from({ length: n }, (_, r) =>
    spawn(process.execPath, ['--import', '@oxc-node/core/register', rankScript], {
      stdio: ['ignore', r === 0 ? 'inherit' : 'ignore', 'inherit'],
      env: { ...process.env, RANK: String(r), WORLD_SIZE: String(n), MASTER_ADDR: '127.0.0.1', MASTER_PORT: String(port) },
    }),
  )
  await Promise.all(procs.map((p) => new Promise((r) => p.on('exit', r))))
}
