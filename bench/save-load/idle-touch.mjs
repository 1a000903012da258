// bench/save-load/idle-touch.mjs: is memory left idle slow to touch again on this machine? Stages the async bench's
// 1.08 GB state dict into reused staging memory after a 3 s pause, three ways: at once; after touching one byte of
// every source page first (that touch timed apart); and after 200 ms of pure CPU spin (a CPU waking up is not it).
// usage: node bench/save-load/idle-touch.mjs [--rounds N]   (after `npm run build`)
import { randomFillSync } from 'node:crypto'
import { stagingPool } from '../../dist/index.js'
import { llamaShapes } from '../lib/llama_shapes.mjs'

const rounds = process.argv.includes('--rounds') ? Number(process.argv[process.argv.indexOf('--rounds') + 1]) : 4
const sources = []
for (const [, shape] of llamaShapes({ layers: 8 })) {
  const d = new Uint8Array(shape.reduce((a, b) => a * b, 1) * 2)
  randomFillSync(d)
  sources.push(d)
}
const sleep = (ms) => new Promise((r) => setTimeout(r, ms))
const timed = (f) => {
  const t0 = performance.now()
  f()
  return Math.round(performance.now() - t0)
}
const stage = () => timed(() => stagingPool.stage(sources).lease.release())
const touch = () => timed(() => {
  let x = 0
  for (const s of sources) for (let i = 0; i < s.length; i += 4096) x += s[i]
  return x
})
const spin = (ms) => {
  const t0 = performance.now()
  while (performance.now() - t0 < ms);
}
stage()
const out = { stageAfterPauseMs: [], touchThenStageMs: [], spinThenStageMs: [], stageAgainMs: [] }
for (let i = 0; i < rounds; i++) {
  await sleep(3000)
  out.stageAfterPauseMs.push(stage())
  out.stageAgainMs.push(stage())
  await sleep(3000)
  out.touchThenStageMs.push(`${touch()} + ${stage()}`)
  await sleep(3000)
  spin(200)
  out.spinThenStageMs.push(stage())
}
console.log(JSON.stringify(out, null, 2))
