// bench/read: distcp vs `cat` vs torch dcp.load on the same ≥1 GiB Llama-shaped 2-rank checkpoint.
// usage: node bench/read/run.mjs [checkpoint-dir]   (generated with real torch on first run)
// Two passes: warm page cache (each contestant runs once untimed first: CPU-side cost), and cold (the files are
// evicted from the page cache with posix_fadvise before every run: what the disk allows; COLD=drop drops the whole
// page cache instead, `sync; echo 3 > /proc/sys/vm/drop_caches`, which needs root and slows everyone else's work).
// What fresh memory itself costs on a machine: `cargo run --release -p distcp-core --example fresh_memory -- FILE`.
import { spawnSync } from 'node:child_process'
import { existsSync, readdirSync, readFileSync } from 'node:fs'
import { join } from 'node:path'

const root = new URL('../..', import.meta.url).pathname
const python = process.env.DISTCP_PYTHON ?? join(root, '.venv/bin/python')
const ckpt = process.argv[2] ?? join(root, 'bench/data/llama-2rank')
const reps = Number(process.env.REPS ?? 3)

function run(cmd, args) {
  const r = spawnSync(cmd, args, { cwd: root, encoding: 'utf8', maxBuffer: 1 << 26 })
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')}: ${r.stderr}`)
  return r
}

if (!existsSync(join(ckpt, '.metadata'))) {
  console.log(`generating ${ckpt} with torch …`)
  console.log(run(python, ['bench/lib/make_llama_checkpoint.py', ckpt]).stdout.trim())
}
const files = readdirSync(ckpt).filter((f) => f.endsWith('.distcp')).map((f) => join(ckpt, f))

// /usr/bin/time -f gives wall seconds and peak RSS of any command
function timed(cmd, args) {
  const r = run('/usr/bin/time', ['-f', '%e %M', cmd, ...args])
  const [secs, kb] = r.stderr.trim().split('\n').pop().split(' ').map(Number)
  return { seconds: secs, maxRssKb: kb, stdout: r.stdout }
}

const contestants = {
  cat: () => timed('sh', ['-c', `cat ${files.join(' ')} > /dev/null`]),
  distcp: () => {
    const r = timed('node', ['bench/read/distcp_read.mjs', ckpt, 'new'])
    const inner = JSON.parse(r.stdout)
    return { seconds: inner.seconds, maxRssKb: r.maxRssKb, bytes: inner.bytes }
  },
  'distcp (into)': () => {
    const r = timed('node', ['bench/read/distcp_read.mjs', ckpt, 'into'])
    const inner = JSON.parse(r.stdout)
    return { seconds: inner.seconds, maxRssKb: r.maxRssKb, bytes: inner.bytes }
  },
  'distcp (into, touched)': () => {
    const r = timed('node', ['bench/read/distcp_read.mjs', ckpt, 'into-touched'])
    const inner = JSON.parse(r.stdout)
    return { seconds: inner.seconds, maxRssKb: r.maxRssKb, bytes: inner.bytes }
  },
  'torch dcp.load': () => {
    const r = timed(python, ['bench/read/torch_load.py', ckpt])
    const inner = JSON.parse(r.stdout.trim().split('\n').pop())
    return { seconds: inner.seconds, maxRssKb: r.maxRssKb, bytes: inner.bytes }
  },
}

const evict =
  process.env.COLD === 'drop'
    ? () => run('sh', ['-c', 'sync && echo 3 > /proc/sys/vm/drop_caches'])
    : () => run(python, ['bench/lib/evict.py', ...files])
const fileBytes = Number(run('du', ['-sb', ...files]).stdout.split('\n').filter(Boolean).reduce((a, l) => a + Number(l.split('\t')[0]), 0))

for (const cache of (process.env.PASSES ?? 'warm,cold').split(',')) {
  const loadBefore = readFileSync('/proc/loadavg', 'utf8').split(' ').slice(0, 3).join(' ')
  const results = {}
  for (const [name, f] of Object.entries(contestants)) {
    if (cache === 'warm') f() // warm the page cache and the code
    const runs = Array.from({ length: reps }, () => {
      if (cache === 'cold') evict()
      return f()
    })
    const best = runs.reduce((a, b) => (b.seconds < a.seconds ? b : a))
    results[name] = { ...best, maxRssKb: Math.max(...runs.map((r) => r.maxRssKb)) }
  }
  const bytes = results.distcp.bytes
  console.log(`\n${cache} page cache — ${ckpt}: ${(bytes / 1e9).toFixed(2)} GB of tensors in ${files.length} files (${(fileBytes / 1e9).toFixed(2)} GB on disk); best of ${reps}; load average before: ${loadBefore}`)
  console.log('contestant                GB/s    seconds  peak RSS   vs cat  vs torch')
  for (const [name, r] of Object.entries(results)) {
    const b = name === 'cat' ? fileBytes : bytes
    const gbs = b / r.seconds / 1e9
    const vsCat = (results.cat.seconds / r.seconds).toFixed(2)
    const vsTorch = (results['torch dcp.load'].seconds / r.seconds).toFixed(2)
    console.log(`${name.padEnd(24)} ${gbs.toFixed(2).padStart(5)}  ${r.seconds.toFixed(3).padStart(8)}  ${(r.maxRssKb / 1024).toFixed(0).padStart(5)} MiB  ${vsCat.padStart(5)}×  ${vsTorch.padStart(6)}×`)
  }
}
