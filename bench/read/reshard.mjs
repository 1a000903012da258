// bench/read/reshard: a tensor-parallel checkpoint read as a differently sharded consumer reads it (issue 15 §2, "the
// same for boxes read through `read` with `offsets`/`sizes`"). The checkpoint is bench/convert's `--tp` one: the
// attention/MLP projections `Shard(1)` on 3 ranks (column-sharded), the rest `Shard(0)`. Every 2-D tensor is read as
// `--parts` boxes into reused buffers (`read({ offsets, sizes, into })`, 4 reads in flight), against `cat` of the same
// files, in interleaved rounds that each start one contestant later, warm and cold:
//   whole   every tensor whole: column-sharded chunks gathered row by row
//   cols    `--parts` column boxes per 2-D tensor (another TP degree): boxes that cut across the saved chunks
//   rows    `--parts` row boxes per 2-D tensor: each box takes a band of rows from every chunk
// Peak RSS is the process's, the reused destination buffers included (given separately).
// usage: node bench/read/reshard.mjs [checkpoint] [--parts 4] [--reps 5] [--passes warm,cold]
//   checkpoint: default bench/data/convert-llama-18L-3rank-tp (`node bench/convert/run.mjs --tp --layers 18 --ranks 3
//   --keep` makes it with torch)
import { existsSync, readdirSync, statSync } from 'node:fs'
import { join } from 'node:path'
import { best, cli, interleaved, loadAverage, median, perRound, python, root, run, timed } from '../lib/harness.mjs'

const { flag, has, positional } = cli()
const ckpt = positional[0] ?? join(root, 'bench/data/convert-llama-18L-3rank-tp')
const parts = Number(flag('--parts', 4))
const CONCURRENCY = 4

if (has('--child')) {
  // one timed run in a process of its own: `--child <mode>`
  const { openCheckpoint } = await import('../../dist/index.js')
  const mode = flag('--child')
  let ck = await openCheckpoint(ckpt) // for the shapes, untimed
  const reads = []
  for (const key of ck.keys()) {
    const info = ck.info(key)
    if (info.kind !== 'tensor') continue
    const shape = info.shape
    if (mode === 'whole' || shape.length !== 2) {
      reads.push({ key, offsets: shape.map(() => 0), sizes: shape })
      continue
    }
    const dim = mode === 'cols' ? 1 : 0
    for (let p = 0; p < parts; p++) {
      const from = Math.floor((shape[dim] * p) / parts)
      const to = Math.floor((shape[dim] * (p + 1)) / parts)
      const offsets = [0, 0]
      const sizes = [...shape]
      offsets[dim] = from
      sizes[dim] = to - from
      reads.push({ key, offsets, sizes })
    }
  }
  const esize = { bfloat16: 2, float16: 2, float32: 4 }
  const bytesOf = (r) => r.sizes.reduce((a, b) => a * b, esize[ck.info(r.key).dtype])
  const largest = Math.max(...reads.map(bytesOf))
  // a consumer's parameters exist before it loads: written memory, not fresh pages, and written before timing
  // (until session 10 the fill was timed: 500 MiB of fresh pages billed to distcp and not to `cat`)
  const buffers = Array.from({ length: CONCURRENCY }, () => new Uint8Array(largest).fill(1))
  ck.close()
  const t0 = performance.now()
  ck = await openCheckpoint(ckpt)
  let next = 0
  let bytes = 0
  async function worker(buf) {
    while (next < reads.length) {
      const r = reads[next++]
      const n = bytesOf(r)
      await ck.read(r.key, { offsets: r.offsets, sizes: r.sizes, into: buf.subarray(0, n) })
      bytes += n
    }
  }
  await Promise.all(buffers.map(worker))
  ck.close()
  const seconds = (performance.now() - t0) / 1000
  console.log(JSON.stringify({ seconds, bytes, reads: reads.length, bufferBytes: largest * CONCURRENCY }))
  process.exit(0)
}

const reps = Number(flag('--reps', 5))
if (!existsSync(join(ckpt, '.metadata'))) {
  console.error(`${ckpt} has no .metadata: make it with \`node bench/convert/run.mjs --tp --layers 18 --ranks 3 --keep\``)
  process.exit(1)
}
const files = readdirSync(ckpt).filter((f) => f.endsWith('.distcp')).map((f) => join(ckpt, f))
const distcp = (mode) => () => timed('node', ['bench/read/reshard.mjs', ckpt, '--parts', String(parts), '--child', mode])
const contestants = {
  cat: () => timed('sh', ['-c', `cat ${files.join(' ')} > /dev/null`]),
  'distcp whole': distcp('whole'),
  [`distcp ${parts} column boxes`]: distcp('cols'),
  [`distcp ${parts} row boxes`]: distcp('rows'),
}
const fileBytes = files.reduce((a, f) => a + statSync(f).size, 0)
for (const cache of flag('--passes', 'warm,cold').split(',')) {
  const load = loadAverage()
  const names = Object.keys(contestants)
  if (cache === 'warm') for (const n of names) contestants[n]()
  const runs = interleaved(names, reps, (n) => {
    if (cache === 'cold') run(python, ['bench/lib/evict.py', ...files])
    return contestants[n]()
  })
  const first = runs['distcp whole'][0]
  console.log(`\n${cache} page cache — ${ckpt}: ${(first.bytes / 1e9).toFixed(2)} GB of tensors in ${files.length} files; ${reps} interleaved rounds; load average before: ${load}`)
  console.log('contestant                   reads   GB/s   best s  median s  peak RSS (buffers)  vs cat  per round')
  for (const n of names) {
    const b = best(runs[n]).seconds
    const r0 = runs[n][0]
    const gbs = (n === 'cat' ? fileBytes : r0.bytes) / b / 1e9
    const rss = Math.max(...runs[n].map((r) => r.maxRssKb)) / 1024
    const buffers = r0.bufferBytes === undefined ? '' : `(${(r0.bufferBytes / 2 ** 20).toFixed(0)} MiB)`
    const med = median(runs[n].map((r) => r.seconds))
    console.log(
      `${n.padEnd(27)} ${String(r0.reads ?? '').padStart(5)}  ${gbs.toFixed(2).padStart(5)}  ${b.toFixed(3).padStart(7)}  ${med.toFixed(3).padStart(8)}  ${rss.toFixed(0).padStart(5)} MiB ${buffers.padStart(9)}  ${(best(runs.cat).seconds / b).toFixed(2).padStart(5)}×  ${perRound(runs[n], runs.cat).toFixed(2).padStart(8)}×`,
    )
  }
}
