// bench/save-load/async.mjs: how long saveAsync blocks the trainer (until `staged`: the copy into reused staging
// memory) against a blocking `save` (until the checkpoint is on disk, fsynced), on the same 1.08 GB bf16
// Llama-shaped state dict; and how much a CPU-bound "training loop" slows down while a save writes behind it.
// The same measurements of torch's `dcp.async_save` run in the same invocation (bench/save-load/torch_async.py,
// through DISTCP_PYTHON or .venv), so the ratios compare like with like.
// Before each timed save the bench runs a "training step" that touches every page of every parameter (a step of
// an optimizer writes them all): a trainer's tensors are in use between its saves. On this VM, memory left idle for
// a second or more is slow to touch again (~3 µs per 4 KiB page: the host reclaims it), which a bench that saves
// idle buffers back to back charges to whichever save runs first; `--idle` measures that case (both sides).
// usage: node bench/save-load/async.mjs [--reps N] [--layers L] [--no-torch] [--idle]   (after `npm run build`)
import { spawnSync } from 'node:child_process'
import { randomFillSync } from 'node:crypto'
import { mkdirSync, rmSync } from 'node:fs'
import { join } from 'node:path'
import { save, saveAsync, stagingPool } from '../../dist/index.js'
import { cli, median, python, root } from '../lib/harness.mjs'
import { llamaShapes } from '../lib/llama_shapes.mjs'

const arg = (name, dflt) => Number(cli().flag(name, dflt))
const reps = arg('--reps', 3)
const work = join(root, 'bench/out/save-load-async')
rmSync(work, { recursive: true, force: true })
mkdirSync(work, { recursive: true })

const model = {}
let bytes = 0
for (const [name, shape] of llamaShapes({ layers: arg('--layers', 8) })) {
  const data = new Uint8Array(shape.reduce((a, b) => a * b, 1) * 2)
  randomFillSync(data)
  model[name] = { dtype: 'bfloat16', shape, data }
  bytes += data.byteLength
}
const fresh = (name) => {
  const d = join(work, name)
  rmSync(d, { recursive: true, force: true })
  return d
}
const idle = process.argv.includes('--idle')
const tensors = Object.values(model).map((t) => t.data)
function step() {
  if (idle) return
  for (const d of tensors) for (let i = 0; i < d.length; i += 4096) d[i] ^= 1
}

// blocking save (its staging copy included: it is part of what the trainer waits for)
const blocking = []
await save({ model }, { checkpointId: fresh('warmup') }) // warms the pool and the page cache paths
for (let i = 0; i < reps; i++) {
  const dir = fresh('blocking')
  step()
  const t0 = performance.now()
  await save({ model }, { checkpointId: dir })
  blocking.push(performance.now() - t0)
}

// saveAsync: blocked = from the call until `staged`; the first one after a cold pool is reported apart
stagingPool.clear()
const cold = saveAsync({ model }, { checkpointId: fresh('async-cold') })
const coldMs = (await cold.staged).ms
await cold.committed
const blocked = []
const commitMs = []
for (let i = 0; i < reps; i++) {
  const dir = fresh('async')
  step()
  const t0 = performance.now()
  const h = saveAsync({ model }, { checkpointId: dir })
  blocked.push((await h.staged).ms)
  await h.committed
  commitMs.push(performance.now() - t0)
}

// a CPU-bound loop (fixed work units) alone, and while a save writes behind it
function unit() {
  let x = 0
  for (let i = 0; i < 2_000_000; i++) x = (x * 1664525 + 1013904223) >>> 0
  return x
}
async function loop(ms) {
  const t0 = performance.now()
  let units = 0
  while (performance.now() - t0 < ms) {
    unit()
    units++
    if (units % 8 === 0) await new Promise((r) => setImmediate(r)) // a trainer yields to the event loop now and then
  }
  return units / ((performance.now() - t0) / 1000)
}
const window = Math.max(1000, median(commitMs))
const alone = await loop(window)
const h = saveAsync({ model }, { checkpointId: fresh('async-loop') })
await h.staged
const during = await loop(window)
await h.committed
const aloneAfter = await loop(window)

const ratio = median(blocked) / median(blocking)

// torch, same shapes, same machine, right after
let torch = 'skipped (--no-torch)'
if (!process.argv.includes('--no-torch')) {
  const r = spawnSync(python, ['bench/save-load/torch_async.py', join(work, 'torch'), '--layers', String(arg('--layers', 8)), '--reps', String(reps), ...(idle ? ['--idle'] : [])], {
    cwd: root,
    encoding: 'utf8',
  })
  torch = r.status === 0 ? JSON.parse(r.stdout.trim().split('\n').pop()) : `failed: ${r.stderr.slice(-400)}`
}
console.log(
  JSON.stringify(
    {
      bytes,
      reps,
      betweenSaves: idle ? 'idle buffers (--idle)' : 'a training step touches every parameter page',
      blockingSaveMs: blocking.map(Math.round),
      saveAsyncBlockedMs: blocked.map((x) => Math.round(x * 10) / 10),
      saveAsyncColdBlockedMs: Math.round(coldMs),
      saveAsyncCommitMs: commitMs.map(Math.round),
      blockedRatio: Math.round(ratio * 1000) / 1000,
      target: '≤ 0.15',
      loopUnitsPerSecond: { alone: Math.round(alone), whileWriting: Math.round(during), aloneAfter: Math.round(aloneAfter) },
      loopSlowdown: Math.round((1 - during / ((alone + aloneAfter) / 2)) * 1000) / 1000,
      pool: stagingPool.stats(),
      torch,
      vsTorch:
        typeof torch === 'object'
          ? {
              blockedMs: `${median(blocked).toFixed(1)} vs ${median(torch.asyncCpuStager.blockedMs)} (${(median(torch.asyncCpuStager.blockedMs) / median(blocked)).toFixed(1)}x less)`,
              blockingSaveMs: `${Math.round(median(blocking))} vs ${median(torch.blockingSaveMs)}`,
            }
          : undefined,
    },
    null,
    2,
  ),
)
rmSync(work, { recursive: true, force: true })
