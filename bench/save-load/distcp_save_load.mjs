// distcp: save a bf16 Llama-shaped state dict ({model: …}) with fsync, then load it into preallocated buffers.
// usage: node bench/save-load/distcp_save_load.mjs <dir> save|load|load-touched
// load-touched: the target buffers are written before timing, as a model's parameters are when a trainer resumes.
import { randomFillSync } from 'node:crypto'
import { save, load } from '../../dist/index.js'
import { llamaShapes } from '../lib/llama_shapes.mjs'

const [dir, mode] = process.argv.slice(2)
const model = {}
let bytes = 0
for (const [name, shape] of llamaShapes()) {
  const n = shape.reduce((a, b) => a * b, 1) * 2
  const data = new Uint8Array(n)
  if (mode === 'save') randomFillSync(data)
  if (mode === 'load-touched') data.fill(1)
  model[name] = { dtype: 'bfloat16', shape, data }
  bytes += n
}
const t0 = performance.now()
if (mode === 'save') await save({ model }, { checkpointId: dir })
else await load({ model }, { checkpointId: dir })
const seconds = (performance.now() - t0) / 1000
console.log(JSON.stringify({ seconds, bytes }))
