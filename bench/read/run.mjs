// bench/read: distcp vs `cat` vs torch dcp.load on the same ≥1 GiB Llama-shaped 2-rank checkpoint.
// usage: [REPS=3] [PASSES=warm,cold] node bench/read/run.mjs [checkpoint-dir]   (generated with real torch on first run)
// Two passes: warm page cache (each contestant runs once untimed first: CPU-side cost), and cold (the files are
// evicted from the page cache with posix_fadvise before every run: what the disk allows; COLD=drop drops the whole
// page cache instead, `sync; echo 3 > /proc/sys/vm/drop_caches`, which needs root and slows everyone else's work).
// What fresh memory itself costs on a machine: `cargo run --release -p distcp-core --example fresh_memory -- FILE`.
import { existsSync, readdirSync } from 'node:fs'
import { join } from 'node:path'
import { best, interleaved, loadAverage, median, perRound, python, root, run, timed } from '../lib/harness.mjs'

const ckpt = process.argv[2] ?? join(root, 'bench/data/llama-2rank')
const reps = Number(process.env.REPS ?? 3)

if (!existsSync(join(ckpt, '.metadata'))) {
  console.log(`generating ${ckpt} with torch …`)
  console.log(run(python, ['bench/lib/make_llama_checkpoint.py', ckpt]).stdout.trim())
}
const files = readdirSync(ckpt).filter((f) => f.endsWith('.distcp')).map((f) => join(ckpt, f))

// each contestant in a process of its own; distcp and torch time themselves (start-up excluded), cat by its wall time
const contestants = {
  cat: () => timed('sh', ['-c', `cat ${files.join(' ')} > /dev/null`]),
  distcp: () => timed('node', ['bench/read/distcp_read.mjs', ckpt, 'new']),
  'distcp (into)': () => timed('node', ['bench/read/distcp_read.mjs', ckpt, 'into']),
  'distcp (into, touched)': () => timed('node', ['bench/read/distcp_read.mjs', ckpt, 'into-touched']),
  'torch dcp.load': () => timed(python, ['bench/read/torch_load.py', ckpt]),
}

const evict =
  process.env.COLD === 'drop'
    ? () => run('sh', ['-c', 'sync && echo 3 > /proc/sys/vm/drop_caches'])
    : () => run(python, ['bench/lib/evict.py', ...files])
const fileBytes = Number(run('du', ['-sb', ...files]).stdout.split('\n').filter(Boolean).reduce((a, l) => a + Number(l.split('\t')[0]), 0))

for (const cache of (process.env.PASSES ?? 'warm,cold').split(',')) {
  const loadBefore = loadAverage()
  const names = Object.keys(contestants)
  if (cache === 'warm') for (const name of names) contestants[name]() // warm the page cache and the code
  const runs = interleaved(names, reps, (name) => {
    if (cache === 'cold') evict()
    return contestants[name]()
  })
  const bytes = runs.distcp[0].bytes
  console.log(`\n${cache} page cache — ${ckpt}: ${(bytes / 1e9).toFixed(2)} GB of tensors in ${files.length} files (${(fileBytes / 1e9).toFixed(2)} GB on disk); ${reps} interleaved rounds; load average before: ${loadBefore}`)
  console.log('contestant                GB/s   best s  median s  peak RSS   vs cat  per round  vs torch')
  for (const name of names) {
    const b = best(runs[name]).seconds
    const gbs = (name === 'cat' ? fileBytes : bytes) / b / 1e9
    const vsCat = (best(runs.cat).seconds / b).toFixed(2)
    const vsTorch = (best(runs['torch dcp.load']).seconds / b).toFixed(2)
    const rss = Math.max(...runs[name].map((r) => r.maxRssKb)) / 1024
    const med = median(runs[name].map((r) => r.seconds))
    console.log(`${name.padEnd(24)} ${gbs.toFixed(2).padStart(5)}  ${b.toFixed(3).padStart(7)}  ${med.toFixed(3).padStart(8)}  ${rss.toFixed(0).padStart(5)} MiB  ${vsCat.padStart(5)}×  ${perRound(runs[name], runs.cat).toFixed(2).padStart(8)}×  ${vsTorch.padStart(7)}×`)
  }
}
