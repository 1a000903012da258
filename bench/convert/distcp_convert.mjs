// distcp: convertDcpToHf of a checkpoint into a fresh folder (library call). Timing covers the whole call:
// .metadata parse, plan, every tensor written, config copied, fsync of every file, atomic rename.
// usage: node bench/convert/distcp_convert.mjs <dcp-dir> <out-dir> <model-config-dir> [dtype] [maxShardSize]
import { convertDcpToHf } from '../../dist/index.js'

const [dcp, out, config, dtype, maxShardSize] = process.argv.slice(2)
let bytes = 0
let tensors = 0
const t0 = performance.now()
await convertDcpToHf(dcp, out, config, undefined, {
  dtype: dtype || undefined,
  maxShardSize: maxShardSize || undefined,
  onWarning: () => undefined, // the bench model has no tokenizer
  onProgress: (p) => {
    bytes = p.bytesTotal
    tensors = p.tensorsTotal
  },
})
const seconds = (performance.now() - t0) / 1000
console.log(JSON.stringify({ seconds, bytes, tensors, maxRssKb: process.resourceUsage().maxRSS }))
