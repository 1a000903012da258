// bench/convert: DCP → Hugging Face safetensors. distcp vs `cp -r` of the same checkpoint vs the PyTorch ways, same data,
// same run, warm and cold page cache.
//
// usage: node bench/convert/run.mjs [--layers 38] [--ranks 2] [--tp | --moe] [--reps 2] [--dtype <cast>] [--only a,b] [--keep]
//   --layers   Llama layers of the generated checkpoint (hidden 2048, intermediate 5632, vocab 32000, bf16, 2 ranks,
//              Shard(0) DTensors, the seed's {"model": …} layout; bench/lib/make_llama_checkpoint.py). 38 → 4.17 GB.
//   --ranks    ranks of the generated checkpoint (3 gives uneven shards)
//   --tp       tensor-parallel layout: the attention/MLP projections Shard(1) (column-sharded), the rest Shard(0);
//              distcp cannot move these with copy_file_range and goes through its slab path
//   --moe      MoE-shaped checkpoint instead: 6,144 bf16 tensors of 64×64 on 1 rank (bench/convert/make_moe_checkpoint.py),
//              where the cost per tensor shows and the bytes do not
//   --dtype    make distcp cast (e.g. float32); default: keep bf16 (what the PyTorch ways do). Adds two contestants:
//              `distcp (no cast)` (the same conversion without the cast) and `torch cast` (safetensors' load_file →
//              .to(dtype) → save_file + fsync of the same tensors as one model.safetensors, made once by distcp, untimed)
//   --keep     keep the generated checkpoints (bench/data/convert-*) for the next run; deleted otherwise
//
// Contestants (each a separate process, timed inside, peak RSS from /usr/bin/time -f '%e %M'):
//   cp -r             the checkpoint folder copied: the raw cost of moving the bytes (no fsync)
//   cp -r + sync      the same, then `sync` of the copied files: what durable output costs (distcp fsyncs its files)
//   distcp            convertDcpToHf (library call): shards + config, fsync, atomic rename
//   torch (seed way)  NeMo-RL's convert_dcp_to_hf path ending in safetensors: dcp_to_torch_save → torch.load →
//                     safetensors.torch.save_file (bench/convert/torch_convert.py seed)
//   distcp (hf shards) convertDcpToHf of those HuggingFaceStorageWriter shards (the layout NeMo-RL v2 writes by default):
//                     the same job as `torch consolidate`, checked against its output tensor for tensor first
//   torch consolidate torch's consolidate_safetensors_files. It consumes HuggingFaceStorageWriter(save_distributed=True)
//                     shards, not a DCP checkpoint, so it gets its own input: the same tensors saved that way
//                     (bench/convert/make_hf_sharded.py, generated once, not timed)
// Warm: each contestant runs once untimed first (page cache and code warm). Cold: the contestant's input files are
// evicted from the page cache (posix_fadvise DONTNEED, bench/lib/evict.py) before every run. Between runs the output
// is deleted and `sync` flushes dirty pages, so one contestant's write-back does not bill the next. Rounds interleave
// the contestants; the table gives each one's best and median, and "per round" the median of (that round's
// `cp -r` + sync) / (this one): this VM's disk drifts, and only runs side by side compare.
import { spawnSync } from 'node:child_process'
import { existsSync, mkdirSync, readdirSync, rmSync, writeFileSync, statSync } from 'node:fs'
import { cpus, totalmem } from 'node:os'
import { join } from 'node:path'
import { best, cli, interleaved, median, perRound, python, root, run, timed } from '../lib/harness.mjs'

const { flag, has } = cli()
const layers = Number(flag('--layers', '38'))
const ranks = Number(flag('--ranks', '2'))
const reps = Number(flag('--reps', process.env.REPS ?? '2'))
const castTo = flag('--dtype', '')
const onlyList = (flag('--only', '') ?? '').split(',').filter(Boolean)
const only = onlyList.length ? onlyList : null
const keep = has('--keep')
const tp = has('--tp')
const moe = has('--moe')

const shape = { hidden: 2048, intermediate: 5632, vocab: 32000 }
const genArgs = [...(tp ? ['--tp'] : []), '--ranks', String(ranks), '--layers', String(layers), '--hidden', String(shape.hidden), '--intermediate', String(shape.intermediate), '--vocab', String(shape.vocab), '--dtype', 'bfloat16']
const data = join(root, 'bench/data')
const tag = `${layers}L-${ranks}rank${tp ? '-tp' : ''}`
const ckpt = join(data, moe ? 'convert-moe-6144' : `convert-llama-${tag}`)
const hfSharded = join(data, `convert-llama-${tag}-hf-sharded`)
const modelDir = join(data, `convert-llama-${layers}L-config`)
const outRoot = join(root, 'bench/out/convert')

const files = (dir) => readdirSync(dir).map((f) => join(dir, f)).filter((f) => statSync(f).isFile())
const duBytes = (dir) => files(dir).reduce((a, f) => a + statSync(f).size, 0)

// ---- data (generated with real torch; not timed)
mkdirSync(data, { recursive: true })
if (moe && !existsSync(join(ckpt, '.metadata'))) {
  console.log(`generating ${ckpt} with torch (1 rank, 6,144 tensors of 64×64) …`)
  console.log(run(python, ['bench/convert/make_moe_checkpoint.py', ckpt]).stdout.trim())
}
if (!existsSync(join(ckpt, '.metadata'))) {
  console.log(`generating ${ckpt} with torch (${ranks} gloo ranks${tp ? ', projections Shard(1)' : ''}) …`)
  console.log(run(python, ['bench/lib/make_llama_checkpoint.py', ckpt, ...genArgs]).stdout.trim())
}
const wantConsolidate = !moe && (!only || only.includes('torch consolidate') || only.includes('distcp (hf shards)'))
let haveConsolidate = false
if (wantConsolidate) {
  const probe = spawnSync(python, ['-c', 'from torch.distributed.checkpoint._consolidate_hf_safetensors import consolidate_safetensors_files'], { encoding: 'utf8' })
  haveConsolidate = probe.status === 0
  if (!haveConsolidate) console.log(`torch consolidate: not in this torch (${probe.stderr.trim().split('\n').pop()}); skipped`)
  else if (!existsSync(hfSharded) || !readdirSync(hfSharded).some((f) => f.endsWith('.safetensors'))) {
    console.log(`generating ${hfSharded} (same tensors, HuggingFaceStorageWriter(save_distributed=True)) …`)
    console.log(run(python, ['bench/convert/make_hf_sharded.py', hfSharded, ...genArgs]).stdout.trim())
  }
}
mkdirSync(modelDir, { recursive: true })
writeFileSync(
  join(modelDir, 'config.json'),
  JSON.stringify(
    {
      architectures: ['LlamaForCausalLM'],
      model_type: 'llama',
      hidden_size: shape.hidden,
      intermediate_size: shape.intermediate,
      num_hidden_layers: layers,
      num_attention_heads: 16,
      num_key_value_heads: 16,
      vocab_size: shape.vocab,
      max_position_embeddings: 4096,
      rms_norm_eps: 1e-5,
      hidden_act: 'silu',
      tie_word_embeddings: false,
      dtype: 'bfloat16',
    },
    null,
    2,
  ),
)

// ---- contestants (distcp and torch time themselves, start-up excluded; cp by its wall time)
const ckptFiles = files(ckpt)
const ckptBytes = duBytes(ckpt)
const contestants = {
  'cp -r': { inputs: ckptFiles, run: (out) => ({ ...timed('cp', ['-r', ckpt, out]), bytes: ckptBytes }) },
  'cp -r + sync': {
    inputs: ckptFiles,
    run: (out) => ({ ...timed('sh', ['-c', `cp -r "${ckpt}" "${out}" && sync "${out}"/* "${out}"/.metadata "${out}"`]), bytes: ckptBytes }),
  },
  distcp: { inputs: ckptFiles, run: (out) => timed('node', ['bench/convert/distcp_convert.mjs', ckpt, out, modelDir, castTo]) },
  'torch (seed way)': { inputs: ckptFiles, run: (out) => timed(python, ['bench/convert/torch_convert.py', 'seed', ckpt, out]) },
}
if (haveConsolidate) {
  contestants['distcp (hf shards)'] = { inputs: files(hfSharded), run: (out) => timed('node', ['bench/convert/distcp_convert.mjs', hfSharded, out, modelDir, castTo]) }
  contestants['torch consolidate'] = { inputs: files(hfSharded), run: (out) => timed(python, ['bench/convert/torch_convert.py', 'consolidate', hfSharded, out]) }
}
if (castTo) {
  contestants['distcp (no cast)'] = { inputs: ckptFiles, run: (out) => timed('node', ['bench/convert/distcp_convert.mjs', ckpt, out, modelDir]) }
  const hf = join(data, `${ckpt.split('/').pop()}-hf`)
  if (!existsSync(join(hf, 'model.safetensors'))) run('node', ['bench/convert/distcp_convert.mjs', ckpt, hf, modelDir])
  contestants['torch cast'] = {
    inputs: files(hf),
    run: (out) => timed(python, ['bench/convert/torch_convert.py', `cast:${castTo}`, hf, out]),
  }
}
for (const name of Object.keys(contestants)) if (only && !only.includes(name)) delete contestants[name]

const evict = (paths) => run(python, ['bench/lib/evict.py', ...paths])
function once(name, c, cold) {
  const out = join(outRoot, name.replace(/[^\w]+/g, '-'))
  rmSync(out, { recursive: true, force: true })
  mkdirSync(outRoot, { recursive: true })
  run('sync', [])
  if (cold) evict(c.inputs)
  const r = c.run(out)
  rmSync(out, { recursive: true, force: true })
  run('sync', [])
  return r
}

// ---- the distcp output is checked against torch's before anything is timed (tensor for tensor, bit for bit)
if (contestants.distcp && contestants['torch (seed way)'] && !castTo) {
  const a = join(outRoot, 'verify-distcp')
  const b = join(outRoot, 'verify-torch')
  for (const d of [a, b]) rmSync(d, { recursive: true, force: true })
  run('node', ['bench/convert/distcp_convert.mjs', ckpt, a, modelDir])
  run(python, ['bench/convert/torch_convert.py', 'seed', ckpt, b])
  const v = run(python, [
    '-c',
    `import sys, torch
from safetensors import safe_open
a = safe_open(sys.argv[1], framework="pt"); b = safe_open(sys.argv[2], framework="pt")
assert set(a.keys()) == set(b.keys()), (sorted(set(a.keys()) ^ set(b.keys())))
bad = [k for k in a.keys() if not torch.equal(a.get_tensor(k).view(torch.uint8), b.get_tensor(k).view(torch.uint8))]
assert a.metadata() == {"format": "pt"}, a.metadata()
assert not bad, bad
print(f"verified: distcp's model.safetensors = torch's, {len(list(a.keys()))} tensors bit for bit")`,
    join(a, 'model.safetensors'),
    join(b, 'model.safetensors'),
  ])
  console.log(v.stdout.trim())
  for (const d of [a, b]) rmSync(d, { recursive: true, force: true })
}

// ---- distcp's consolidation of the HF-storage shards equals torch's consolidate_safetensors_files, bit for bit
if (contestants['distcp (hf shards)'] && !castTo) {
  const a = join(outRoot, 'verify-distcp-hf')
  rmSync(a, { recursive: true, force: true })
  run('node', ['bench/convert/distcp_convert.mjs', hfSharded, a, modelDir])
  const v = JSON.parse(run(python, ['interop/check_consolidated.py', hfSharded, a]).stdout.trim().split('\n').pop())
  if (v.mismatches.length) throw new Error(`distcp (hf shards) differs from torch's consolidation: ${v.mismatches.slice(0, 5).join('; ')}`)
  console.log(`verified: distcp's consolidation of the HF-storage shards = torch's consolidate_safetensors_files, ${v.keys.length} tensors bit for bit`)
  rmSync(a, { recursive: true, force: true })
}

const commit = spawnSync('git', ['rev-parse', '--short', 'HEAD'], { cwd: root, encoding: 'utf8' }).stdout.trim()
const torchVersion = run(python, ['-c', 'import torch; print(torch.__version__)']).stdout.trim()
const fsType = run('df', ['-T', data]).stdout.trim().split('\n').pop().split(/\s+/)[1]
console.log(
  `\nmachine: ${cpus().length} CPUs (${cpus()[0]?.model}), ${(totalmem() / 2 ** 30).toFixed(0)} GiB RAM, ${fsType} at ${data}; node ${process.version}, torch ${torchVersion}, distcp ${commit}`,
)

const tableRows = []
for (const cache of ['warm', 'cold']) {
  const results = {}
  // rounds interleave the contestants, each round starting one later (bench/lib/harness.mjs says why)
  if (cache === 'warm') for (const [name, c] of Object.entries(contestants)) once(name, c, false)
  const rounds = interleaved(Object.keys(contestants), reps, (name) => once(name, contestants[name], cache === 'cold'))
  // the same round's cp -r + sync over each contestant's time: the ratio least moved by the disk's drift
  const sync = rounds['cp -r + sync']
  for (const [name, runs] of Object.entries(rounds)) {
    const { stdout: _, ...b } = best(runs)
    results[name] = { ...b, median: median(runs.map((r) => r.seconds)), maxRssKb: Math.max(...runs.map((r) => r.maxRssKb)) }
    if (sync) results[name].roundRatio = perRound(runs, sync)
  }
  const tensorBytes = (results.distcp ?? results['torch (seed way)'] ?? Object.values(results)[0]).bytes
  console.log(
    `\n${cache} page cache: ${(tensorBytes / 1e9).toFixed(2)} GB of tensors, checkpoint ${(ckptBytes / 1e9).toFixed(2)} GB in ${ckptFiles.length} files; best and median of ${reps} interleaved rounds${castTo ? `; distcp casts to ${castTo}` : ''}`,
  )
  console.log(
    `contestant            GB/s   seconds   median   peak RSS   vs cp -r   vs cp+sync   per round   vs torch   vs consolidate${castTo ? '   vs torch cast   vs no cast' : ''}`,
  )
  for (const [name, r] of Object.entries(results)) {
    const gbs = r.bytes / r.seconds / 1e9
    const ratio = (ref) => (results[ref] ? `${(results[ref].seconds / r.seconds).toFixed(2)}×` : '-')
    console.log(
      `${name.padEnd(20)} ${gbs.toFixed(2).padStart(6)}  ${r.seconds.toFixed(2).padStart(8)}  ${r.median.toFixed(2).padStart(7)}  ${(r.maxRssKb / 1024).toFixed(0).padStart(6)} MiB  ${ratio('cp -r').padStart(8)}  ${ratio('cp -r + sync').padStart(10)}  ${(r.roundRatio === undefined ? '-' : `${r.roundRatio.toFixed(2)}×`).padStart(10)}  ${ratio('torch (seed way)').padStart(8)}  ${ratio('torch consolidate').padStart(13)}${castTo ? `${ratio('torch cast').padStart(16)}${ratio('distcp (no cast)').padStart(12)}` : ''}`,
    )
    tableRows.push({ cache, name, ...r })
  }
}
writeFileSync(join(outRoot, 'results.json'), JSON.stringify({ layers, ranks, tp, reps, castTo: castTo || null, ckptBytes, rows: tableRows }, null, 2))
console.log(
  `\n(ratios are speed-ups: the other's seconds / this one's seconds, of the best runs; "per round": the median over rounds of that round's cp -r + sync / this one; results also in ${join(outRoot, 'results.json')})`,
)

if (!keep) {
  for (const d of [ckpt, hfSharded, modelDir, `${ckpt}-hf`]) rmSync(d, { recursive: true, force: true })
  console.log(`deleted the generated data (${ckpt}, ${hfSharded}); pass --keep to reuse it`)
}
