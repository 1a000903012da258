// distcp: read every tensor of a checkpoint into memory (whole tensors, gathered from all shards).
// Timing starts at openCheckpoint (metadata parse included).
import { openCheckpoint } from '../../dist/index.js'

const path = process.argv[2]
// 'new': a new buffer per tensor; 'into': preallocated buffers, like dcp.load; 'into-touched': preallocated buffers
// written before timing, like the parameters of a model being resumed
const mode = process.argv[3] ?? 'new' 
const concurrency = Number(process.argv[4] ?? 4)
let ck = await openCheckpoint(path)
const keys = ck.keys().filter((k) => ck.info(k).kind === 'tensor')
const targets = mode.startsWith('into') ? new Map(keys.map((k) => [k, new Uint8Array(ck.info(k).nbytes)])) : null
if (mode === 'into-touched') for (const b of targets.values()) b.fill(1)
ck.close()
const t0 = performance.now()
ck = await openCheckpoint(path)
let bytes = 0
let next = 0
const held = []
async function worker() {
  while (next < keys.length) {
    const key = keys[next++]
    const t = await ck.read(key, targets ? { into: targets.get(key) } : {})
    bytes += t.data.byteLength
    held.push(t) // keep everything in memory, as a loaded state dict would
  }
}
await Promise.all(Array.from({ length: concurrency }, worker))
const seconds = (performance.now() - t0) / 1000
console.log(JSON.stringify({ seconds, bytes, maxRssKb: process.resourceUsage().maxRSS, tensors: held.length }))
