// 4 Node ranks saving a 4.16 GB sharded state (Llama-7B-shaped, 9 layers, bf16, every tensor Shard(0)) with
// `save(..., { processGroup })` vs torch's `dcp.save` with 4 gloo ranks on the same shapes (DTensors built from the
// local shards), both launched by torchrun, alternating, best of N. Each rank times its save after a barrier (fsync
// included: both sync their files); the save's time is its slowest rank's. Peak RSS per rank (includes the 1 GB
// each rank holds). Each launch saves twice: the process's first save (distcp allocates its staging memory on the
// way) and a later one (reused, as in a training run); each save writes a new folder, removed afterwards. The raw
// disk runs in the same loop: as many dd writers as ranks, each writing one rank's bytes (O_DIRECT, and buffered +
// fsync).
//   nice -n 10 node --import @oxc-node/core/register bench/multirank/save-bench.ts [--reps N] [--ranks 4]
import { spawnSync } from 'node:child_process'
import { mkdirSync, readdirSync, rmSync, statSync } from 'node:fs'
import { createServer } from 'node:net'
import { join } from 'node:path'

const root = new URL('../..', import.meta.url).pathname
const python = process.env.DISTCP_PYTHON ?? join(root, '.venv/bin/python')
const torchrun = join(python, '..', 'torchrun')
const arg = (name: string, dflt: number): number => {
  const i = process.argv.indexOf(name)
  return i >= 0 ? Number(process.argv[i + 1]) : dflt
}
const reps = arg('--reps', 3)
const ranks = arg('--ranks', 4)
const work = join(root, 'bench/out/multirank')
rmSync(work, { recursive: true, force: true })
mkdirSync(work, { recursive: true })

async function freePort(): Promise<number> {
  return new Promise((resolve) => {
    const s = createServer().listen(0, '127.0.0.1', () => {
      const port = (s.address() as { port: number }).port
      s.close(() => resolve(port))
    })
  })
}

type RankResult = { rank: number; save: number; seconds: number; maxRssKb: number; bytes: number }
type Run = { seconds: number; ranks: RankResult[] }

/** One torchrun launch: two saves (the process's first, then a later one); each save's time is its slowest rank's. */
async function launch(args: string[], out: string): Promise<{ first: Run; later: Run; onDisk: number }> {
  rmSync(out, { recursive: true, force: true })
  const port = await freePort()
  const r = spawnSync(torchrun, ['--nproc-per-node', String(ranks), '--master-port', String(port), ...args, out], {
    cwd: root,
    encoding: 'utf8',
    maxBuffer: 1 << 26,
    env: { ...process.env, OMP_NUM_THREADS: '1' },
  })
  // the ranks' lines may interleave on torchrun's stdout
  const lines = r.stdout.match(/\{"rank"[^}]*\}/g) ?? []
  if (lines.length !== 2 * ranks) throw new Error(`${args.join(' ')}: ${r.status}\n${r.stdout}\n${r.stderr.slice(-3000)}`)
  const results = lines.map((l) => JSON.parse(l) as RankResult).sort((a, b) => a.rank - b.rank)
  const run = (n: number): Run => {
    const mine = results.filter((x) => x.save === n)
    return { seconds: Math.max(...mine.map((x) => x.seconds)), ranks: mine }
  }
  const onDisk = readdirSync(join(out, 's2')).reduce((n, f) => n + statSync(join(out, 's2', f)).size, 0)
  rmSync(out, { recursive: true, force: true })
  return { first: run(1), later: run(2), onDisk }
}

const contestants: Record<string, string[]> = {
  distcp: ['--no-python', 'node', '--import', '@oxc-node/core/register', 'bench/multirank/save.ts'],
  'torch dcp.save': ['bench/multirank/torch_save.py'],
}
/**
 * The raw disk in the same run: `ranks` dd processes each writing one rank's bytes of zeros to its own file at once,
 * with O_DIRECT (the fastest the disk takes new bytes) or through the page cache with a final fsync (what torch's
 * writer does). Seconds until the last one is done.
 */
function disk(perRank: number, how: 'direct' | 'fsync'): Run {
  const dir = join(work, `dd-${how}`)
  mkdirSync(dir, { recursive: true })
  spawnSync('sync')
  const mib = Math.ceil(perRank / 2 ** 20)
  const flag = how === 'direct' ? 'oflag=direct' : 'conv=fsync'
  const cmd = Array.from({ length: ranks }, (_, r) => `dd if=/dev/zero of=${dir}/f${r} bs=1M count=${mib} ${flag} status=none &`).join(' ')
  const t0 = performance.now()
  const r = spawnSync('sh', ['-c', `${cmd} wait`])
  const seconds = (performance.now() - t0) / 1000
  if (r.status !== 0) throw new Error(`dd ${how}: ${r.status} ${r.stderr}`)
  rmSync(dir, { recursive: true, force: true })
  return { seconds, ranks: [] }
}
const DISK = { 'disk, dd O_DIRECT': 'direct', 'disk, dd + fsync': 'fsync' } as const

const runs: Record<string, Awaited<ReturnType<typeof launch>>[]> = { distcp: [], 'torch dcp.save': [] }
const diskRuns: Record<string, Run[]> = Object.fromEntries(Object.keys(DISK).map((k) => [k, []]))
for (let i = 0; i < reps; i++) {
  for (const [name, args] of Object.entries(contestants)) {
    const r = await launch(args, join(work, name.split(' ')[0]))
    runs[name].push(r)
    const fmt = (x: Run) => `${x.seconds.toFixed(2)} s (ranks ${x.ranks.map((y) => y.seconds.toFixed(2)).join(', ')})`
    console.error(`${name} #${i + 1}: first ${fmt(r.first)}, later ${fmt(r.later)}`)
  }
  const perRank = Math.max(...runs.distcp[i].later.ranks.map((x) => x.bytes))
  for (const [name, how] of Object.entries(DISK)) {
    diskRuns[name].push(disk(perRank, how))
    console.error(`${name} #${i + 1}: ${diskRuns[name][i].seconds.toFixed(2)} s`)
  }
}
const bytes = runs.distcp[0].later.ranks.reduce((n, r) => n + r.bytes, 0)
for (const which of ['first', 'later'] as const) {
  const fastest = (v: Run[]): Run => v.reduce((a, b) => (b.seconds < a.seconds ? b : a))
  const best: Record<string, Run> = {
    ...Object.fromEntries(Object.entries(runs).map(([k, v]) => [k, fastest(v.map((x) => x[which]))])),
    ...Object.fromEntries(Object.entries(diskRuns).map(([k, v]) => [k, fastest(v)])),
  }
  console.log(`\n${which === 'first' ? "a process's first save" : 'a later save (staging memory reused)'}: ${ranks} ranks, ${(bytes / 1e9).toFixed(2)} GB bf16 sharded on dim 0 (${(bytes / ranks / 1e9).toFixed(2)} GB per rank); best of ${reps}`)
  console.log('contestant          seconds   GB/s   vs torch   vs disk (O_DIRECT)   peak RSS per rank (MiB)')
  for (const [name, r] of Object.entries(best)) {
    const rss = r.ranks.map((x) => (Math.max(...runs[name].flatMap((run) => run[which].ranks.filter((y) => y.rank === x.rank).map((y) => y.maxRssKb))) / 1024).toFixed(0)).join(' / ')
    const vsDisk = (best['disk, dd O_DIRECT'].seconds / r.seconds).toFixed(2)
    console.log(`${name.padEnd(18)} ${r.seconds.toFixed(2).padStart(7)}  ${(bytes / r.seconds / 1e9).toFixed(2).padStart(5)}  ${(best['torch dcp.save'].seconds / r.seconds).toFixed(2).padStart(7)}×   ${vsDisk.padStart(17)}×   ${rss}`)
  }
}
console.log(`\non disk: distcp ${(runs.distcp[0].onDisk / 1e9).toFixed(3)} GB, torch ${(runs['torch dcp.save'][0].onDisk / 1e9).toFixed(3)} GB`)
rmSync(work, { recursive: true, force: true })
