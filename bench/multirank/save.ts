// distcp's side of bench/multirank/save-bench.ts: one Node rank (under torchrun --no-python, or any launcher that sets
// RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT) holds its dim-0 slice of every tensor of the Llama-shaped state dict in
// shapes.json and times two `save`s with the process group, each after a barrier. Prints
// {"rank", "save", "seconds", "maxRssKb", "bytes"} per save.
//   node --import @oxc-node/core/register bench/multirank/save.ts <dir>
import { randomFillSync } from 'node:crypto'
import { readFileSync, rmSync } from 'node:fs'
import { join } from 'node:path'

import { initProcessGroup, save, type DType } from '../../src/index.js'

const cfg = JSON.parse(readFileSync(new URL('./shapes.json', import.meta.url), 'utf8')) as { vocab: number; hidden: number; intermediate: number; layers: number }

function shapes(): [string, number[]][] {
  const { vocab: v, hidden: h, intermediate: i } = cfg
  const out: [string, number[]][] = [['model.embed_tokens.weight', [v, h]]]
  for (let l = 0; l < cfg.layers; l++) {
    const p = `model.layers.${l}.`
    out.push([`${p}input_layernorm.weight`, [h]])
    for (const n of 'qkvo') out.push([`${p}self_attn.${n}_proj.weight`, [h, h]])
    out.push([`${p}post_attention_layernorm.weight`, [h]])
    out.push([`${p}mlp.gate_proj.weight`, [i, h]], [`${p}mlp.up_proj.weight`, [i, h]], [`${p}mlp.down_proj.weight`, [h, i]])
  }
  out.push(['model.norm.weight', [h]], ['lm_head.weight', [v, h]])
  return out
}

const pg = await initProcessGroup({ timeoutMs: 600_000 })
const local = shapes().map(([name, g]) => ({ name, global: g, local: [g[0] / pg.worldSize, ...g.slice(1)] }))
const total = local.reduce((n, t) => n + t.local.reduce((a, b) => a * b, 1), 0)
const flat = new Uint16Array(total)
for (let at = 0; at < flat.byteLength; at += 1 << 30) randomFillSync(new Uint8Array(flat.buffer, at, Math.min(1 << 30, flat.byteLength - at)))
const model: Record<string, unknown> = {}
let at = 0
for (const t of local) {
  const n = t.local.reduce((a, b) => a * b, 1)
  const globalOffsets = t.global.map((_, d) => (d === 0 ? pg.rank * t.local[0] : 0))
  model[t.name] = { dtype: 'bfloat16' as DType, shape: t.local, data: flat.subarray(at, at + n), globalShape: t.global, globalOffsets }
  at += n
}
// save 1 is a process's first (its staging memory is allocated on the way), save 2 a later one (reused), as in a
// training run that saves every few hundred steps; the first save's folder is removed before the second
for (const n of [1, 2]) {
  await pg.barrier()
  const t0 = performance.now()
  await save({ model }, { checkpointId: join(process.argv[2], `s${n}`), processGroup: pg })
  const seconds = (performance.now() - t0) / 1000
  console.log(JSON.stringify({ rank: pg.rank, save: n, seconds, maxRssKb: process.resourceUsage().maxRSS, bytes: total * 2 }))
  await pg.barrier()
  if (n === 1 && pg.rank === 0) rmSync(join(process.argv[2], 's1'), { recursive: true, force: true })
}
await pg.destroy()
