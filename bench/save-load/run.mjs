// bench/save-load: distcp save/load vs raw dd write/read vs torch dcp.save/dcp.load, same 1.08 GB bf16
// Llama-shaped state dict, one process. Saves write a new checkpoint folder each time and fsync their files (dd with
// conv=fsync, dcp.save's default sync_files, distcp always); loads go into preallocated memory with a warm page cache
// (each contestant reads its own files once untimed first), either fresh (never touched: every page faults in
// during the load) or touched (written before timing, like the parameters of a model being resumed).
// usage: node bench/save-load/run.mjs [--reps N]; the async case (saveAsync blocked time, loop slowdown): bench/save-load/async.mjs
import { spawnSync } from 'node:child_process'
import { mkdirSync, rmSync, statSync, readdirSync } from 'node:fs'
import { join } from 'node:path'

const root = new URL('../..', import.meta.url).pathname
const python = process.env.DISTCP_PYTHON ?? join(root, '.venv/bin/python')
const repsAt = process.argv.indexOf('--reps')
const reps = repsAt >= 0 ? Number(process.argv[repsAt + 1]) : 3 // (argv[0] is node's path: never read it as a count)
const work = join(root, 'bench/out/save-load')
rmSync(work, { recursive: true, force: true })
mkdirSync(work, { recursive: true })

function timed(cmd, args) {
  const r = spawnSync('/usr/bin/time', ['-f', '%e %M', cmd, ...args], { cwd: root, encoding: 'utf8', maxBuffer: 1 << 26 })
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')}: ${r.stderr}`)
  const [wall, kb] = r.stderr.trim().split('\n').pop().split(' ').map(Number)
  let inner = {}
  try {
    inner = JSON.parse(r.stdout.trim().split('\n').pop())
  } catch {}
  return { seconds: inner.seconds ?? wall, maxRssKb: kb, bytes: inner.bytes }
}

/** Removes a contestant's previous checkpoint (untimed), so every save writes a new folder. */
const fresh = (name) => {
  rmSync(join(work, name), { recursive: true, force: true })
  return true
}

const dirSize = (d) => readdirSync(d).reduce((a, f) => a + statSync(join(d, f)).size, 0)
const BYTES = 1084297216
const MB16 = 16 << 20
const count = Math.ceil(BYTES / MB16)

const contestants = {
  save: {
    'dd write': () => timed('dd', [`if=/dev/zero`, `of=${join(work, 'raw.bin')}`, `bs=${MB16}`, `count=${count}`, 'conv=fsync', 'status=none']),
    distcp: () => fresh('distcp') && timed('node', ['bench/save-load/distcp_save_load.mjs', join(work, 'distcp'), 'save']),
    'torch dcp.save': () => fresh('torch') && timed(python, ['bench/save-load/torch_save_load.py', join(work, 'torch'), 'save']),
  },
  load: {
    'dd read': () => timed('dd', [`if=${join(work, 'raw.bin')}`, 'of=/dev/null', `bs=${MB16}`, 'status=none']),
    distcp: () => timed('node', ['bench/save-load/distcp_save_load.mjs', join(work, 'distcp'), 'load']),
    'torch dcp.load': () => timed(python, ['bench/save-load/torch_save_load.py', join(work, 'torch'), 'load']),
  },
  'load (touched)': {
    'dd read': () => timed('dd', [`if=${join(work, 'raw.bin')}`, 'of=/dev/null', `bs=${MB16}`, 'status=none']),
    distcp: () => timed('node', ['bench/save-load/distcp_save_load.mjs', join(work, 'distcp'), 'load-touched']),
    'torch dcp.load': () => timed(python, ['bench/save-load/torch_save_load.py', join(work, 'torch'), 'load-touched']),
  },
}

for (const [phase, entries] of Object.entries(contestants)) {
  const results = {}
  for (const [name, f] of Object.entries(entries)) {
    if (phase !== 'save') f()
    const runs = Array.from({ length: reps }, f)
    const best = runs.reduce((a, b) => (b.seconds < a.seconds ? b : a))
    results[name] = { ...best, maxRssKb: Math.max(...runs.map((r) => r.maxRssKb)) }
  }
  const raw = results[phase === 'save' ? 'dd write' : 'dd read']
  const torch = results[phase === 'save' ? 'torch dcp.save' : 'torch dcp.load']
  console.log(`\n${phase}: ${(BYTES / 1e9).toFixed(2)} GB bf16 Llama-shaped state dict; best of ${reps}`)
  console.log('contestant                GB/s    seconds  peak RSS   vs raw  vs torch')
  for (const [name, r] of Object.entries(results)) {
    const gbs = BYTES / r.seconds / 1e9
    console.log(`${name.padEnd(24)} ${gbs.toFixed(2).padStart(5)}  ${r.seconds.toFixed(3).padStart(8)}  ${(r.maxRssKb / 1024).toFixed(0).padStart(5)} MiB  ${(raw.seconds / r.seconds).toFixed(2).padStart(5)}×  ${(torch.seconds / r.seconds).toFixed(2).padStart(6)}×`)
  }
}
console.log(`\non disk: distcp ${(dirSize(join(work, 'distcp')) / 1e9).toFixed(3)} GB, torch ${(dirSize(join(work, 'torch')) / 1e9).toFixed(3)} GB`)
rmSync(work, { recursive: true, force: true })
