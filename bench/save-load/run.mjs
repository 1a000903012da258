// bench/save-load: distcp save/load vs raw dd write/read vs torch dcp.save/dcp.load, same 1.08 GB bf16
// Llama-shaped state dict, one process. Saves write a new checkpoint folder each time and fsync their files (dd with
// conv=fsync, dcp.save's default sync_files, distcp always); loads go into preallocated memory with a warm page cache
// (each contestant reads its own files once untimed first), either fresh (never touched: every page faults in
// during the load) or touched (written before timing, like the parameters of a model being resumed).
// usage: node bench/save-load/run.mjs [--reps N]; the async case (saveAsync blocked time, loop slowdown): bench/save-load/async.mjs
import { mkdirSync, rmSync, statSync, readdirSync } from 'node:fs'
import { join } from 'node:path'
import { best, cli, interleaved, perRound, python, root, timed } from '../lib/harness.mjs'

const reps = Number(cli().flag('--reps', 3))
const work = join(root, 'bench/out/save-load')
rmSync(work, { recursive: true, force: true })
mkdirSync(work, { recursive: true })

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

// each phase's contestants run in interleaved rounds (bench/lib/harness.mjs says why); loads read their own files
// once untimed first (warm page cache); saves write a new folder every time
for (const [phase, entries] of Object.entries(contestants)) {
  const names = Object.keys(entries)
  if (phase !== 'save') for (const name of names) entries[name]()
  const runs = interleaved(names, reps, (name) => entries[name]())
  const raw = runs[phase === 'save' ? 'dd write' : 'dd read']
  const torch = runs[phase === 'save' ? 'torch dcp.save' : 'torch dcp.load']
  console.log(`\n${phase}: ${(BYTES / 1e9).toFixed(2)} GB bf16 Llama-shaped state dict; best of ${reps} interleaved rounds`)
  console.log('contestant                GB/s    seconds  peak RSS   vs raw  per round  vs torch')
  for (const name of names) {
    const r = best(runs[name])
    const gbs = BYTES / r.seconds / 1e9
    const rss = Math.max(...runs[name].map((x) => x.maxRssKb)) / 1024
    console.log(`${name.padEnd(24)} ${gbs.toFixed(2).padStart(5)}  ${r.seconds.toFixed(3).padStart(8)}  ${rss.toFixed(0).padStart(5)} MiB  ${(best(raw).seconds / r.seconds).toFixed(2).padStart(5)}×  ${perRound(runs[name], raw).toFixed(2).padStart(8)}×  ${(best(torch).seconds / r.seconds).toFixed(2).padStart(6)}×`)
  }
}
console.log(`\non disk: distcp ${(dirSize(join(work, 'distcp')) / 1e9).toFixed(3)} GB, torch ${(dirSize(join(work, 'torch')) / 1e9).toFixed(3)} GB`)
rmSync(work, { recursive: true, force: true })
