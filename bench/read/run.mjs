// bench/read: distcp vs `cat` vs torch dcp.load on the same ≥1 GiB Llama-shaped 2-rank checkpoint.
// usage: [REPS=3] [PASSES=warm,cold] node bench/read/run.mjs [checkpoint-dir]   (generated with real torch on first run)
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

const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]
for (const cache of (process.env.PASSES ?? 'warm,cold').split(',')) {
  const loadBefore = readFileSync('/proc/loadavg', 'utf8').split(' ').slice(0, 3).join(' ')
  const names = Object.keys(contestants)
  if (cache === 'warm') for (const name of names) contestants[name]() // warm the page cache and the code
  // rounds interleave the contestants, and each round starts one later (cat, distcp, …; distcp, …, cat; …): this
  // VM's disk drifts over minutes, and a cold run depends on what ran before it (cat's cold time here: 0.56–0.61 s
  // run back to back, 1.5–1.9 s interleaved with the others; perhaps memory the one before freed, which the VM's
  // host took back, perhaps its write-back)
  const runs = Object.fromEntries(names.map((n) => [n, []]))
  for (let round = 0; round < reps; round++) {
    for (const name of [...names.slice(round % names.length), ...names.slice(0, round % names.length)]) {
      if (cache === 'cold') evict()
      runs[name].push(contestants[name]())
    }
  }
  const seconds = (name) => runs[name].map((r) => r.seconds)
  const bytes = runs.distcp[0].bytes
  console.log(`\n${cache} page cache — ${ckpt}: ${(bytes / 1e9).toFixed(2)} GB of tensors in ${files.length} files (${(fileBytes / 1e9).toFixed(2)} GB on disk); ${reps} interleaved rounds; load average before: ${loadBefore}`)
  console.log('contestant                GB/s   best s  median s  peak RSS   vs cat  per round  vs torch')
  for (const name of names) {
    const best = Math.min(...seconds(name))
    const gbs = (name === 'cat' ? fileBytes : bytes) / best / 1e9
    const vsCat = (Math.min(...seconds('cat')) / best).toFixed(2)
    // per round: the median over rounds of (that round's cat) / (this one), robust to the disk's drift
    const perRound = median(seconds(name).map((s, i) => seconds('cat')[i] / s)).toFixed(2)
    const vsTorch = (Math.min(...seconds('torch dcp.load')) / best).toFixed(2)
    const rss = Math.max(...runs[name].map((r) => r.maxRssKb)) / 1024
    console.log(`${name.padEnd(24)} ${gbs.toFixed(2).padStart(5)}  ${best.toFixed(3).padStart(7)}  ${median(seconds(name)).toFixed(3).padStart(8)}  ${rss.toFixed(0).padStart(5)} MiB  ${vsCat.padStart(5)}×  ${perRound.padStart(8)}×  ${vsTorch.padStart(7)}×`)
  }
}
