import { basename } from 'node:path'
import { openCheckpoint, retarget, type Checkpoint, type TensorInfo, type ObjectInfo } from './checkpoint.js'
import { convertDcpToHf, planDcpToHf, printPlan, type ConvertOptions, type ConvertPlan, type ConvertProgress } from './convert.js'
import { DistcpError } from './errors.js'
import { initProcessGroup, type ProcessGroup } from './distributed/group.js'

const USAGE = `usage:
  distcp inspect <checkpoint-dir> [--json] [--rank N]
  distcp convert <dcp-dir> <hf-out> --config <model dir or hub name> [--tokenizer <dir or hub name>]
                 [--dtype bf16|fp16|fp32|float8_e4m3fn|float8_e5m2] [--max-shard-size 5GB] [--hf-override key=value]... [--overwrite]
                 [--dry-run] [--json] [--rank R --world W [--master-addr HOST] [--master-port PORT]]
  distcp retarget <checkpoint-dir> --torch 2.13 [--no-keep-original] [--json]

  inspect   list every key of a checkpoint (dtype, shape, chunks, bytes, files), its layout and writer, and totals
  convert   write a Hugging Face folder (safetensors shards, config, tokenizer) from a checkpoint: DCP (torch.save
            or safetensors records), torch's HF storage shards, a Hugging Face folder or a NeMo-RL run folder
            (with no --tokenizer, the tokenizer NeMo-RL saved beside the weights is used when there is one);
            with --rank/--world (or under torchrun: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) every rank writes
            its share of the shards and rank 0 commits the output once all succeeded (same bytes as one process)
  retarget  rewrite only .metadata (and rank-local __N.metadata) so that an older torch loads the checkpoint
            (torch 2.15's .metadata needs torch >= 2.15); each original is kept as <name>.orig

exit codes: 0 done, 1 failed (the message says why), 2 bad usage
`

function humanBytes(n: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB']
  let i = 0
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024
    i++
  }
  return i === 0 ? `${n} B` : `${n.toFixed(1)} ${units[i]}`
}

interface Inventory {
  path: string
  items: (TensorInfo | ObjectInfo)[]
  totals: {
    keys: number
    tensors: number
    objects: number
    tensorBytes: number
    objectBytes: number
    chunks: number
    ranks: number
    files: string[]
  }
  format: {
    layout: string
    writer: string
    nemoRlWeights: string | null
    tokenizerBeside: string | null
    loadableByTorch: string | null
    metadataFile: string
    dcpVersion: string | null
    writtenBy: string
    keyLayout: string
    tensorPropertiesModule: string | null
    saveId: string | null
  }
}

/** torch records no version of its own in a checkpoint; these fields still date the writer. */
function writerHint(module: string | undefined, hasStorageMeta: boolean, version: string | undefined): string {
  if (version) return `torch >= 2.9 (DCP format ${version})`
  if (hasStorageMeta) return 'torch 2.4 - 2.8'
  if (module === 'torch.distributed.checkpoint.metadata') return 'torch 2.3'
  if (module) return 'torch 2.0 - 2.2 (or a writer targeting every torch 2.x)'
  return 'unknown'
}

export function inventory(ck: Checkpoint): Inventory {
  const s = ck.summary()
  const items = ck.keys().map((k) => ck.info(k))
  const tensors = items.filter((i): i is TensorInfo => i.kind === 'tensor')
  const objects = items.filter((i): i is ObjectInfo => i.kind === 'object')
  const writtenBy = writerHint(s.tensorPropertiesModule, s.hasStorageMeta, s.version)
  return {
    path: ck.path,
    items,
    totals: {
      keys: items.length,
      tensors: tensors.length,
      objects: objects.length,
      tensorBytes: tensors.reduce((a, t) => a + t.nbytes, 0),
      objectBytes: objects.reduce((a, o) => a + o.nbytes, 0),
      chunks: tensors.reduce((a, t) => a + t.chunks.length, 0),
      ranks: s.ranks,
      files: s.files,
    },
    format: {
      layout: s.layout,
      writer: s.writer,
      nemoRlWeights: s.nemoRlWeights ?? null,
      tokenizerBeside: s.tokenizerBeside ?? null,
      loadableByTorch: s.oldestTorch ? `>= ${s.oldestTorch}` : s.layout.startsWith('hf') ? '>= 2.9 (HuggingFaceStorageReader)' : null,
      metadataFile: s.metadataFile,
      dcpVersion: s.version ?? null,
      writtenBy,
      keyLayout: s.hasStorageMeta || s.version ? 'torch >= 2.4 (every dict recursed)' : 'torch <= 2.3 or >= 2.4',
      tensorPropertiesModule: s.tensorPropertiesModule ?? null,
      saveId: s.saveId ?? null,
    },
  }
}

function table(rows: string[][]): string {
  const widths = rows[0].map((_, c) => Math.max(...rows.map((r) => r[c].length)))
  return rows.map((r) => r.map((cell, c) => cell.padEnd(widths[c])).join('  ').trimEnd()).join('\n')
}

function printInventory(inv: Inventory): void {
  const rows = [['key', 'dtype', 'shape', 'chunks', 'bytes', 'files']]
  for (const i of inv.items) {
    if (i.kind === 'tensor') {
      rows.push([i.key, i.dtype, `[${i.shape.join(', ')}]`, String(i.chunks.length), humanBytes(i.nbytes), i.files.join(',')])
    } else {
      rows.push([i.key, '(object)', '', '', humanBytes(i.nbytes), i.files.join(',')])
    }
  }
  const t = inv.totals
  const f = inv.format
  console.log(table(rows))
  console.log()
  console.log(`checkpoint   ${inv.path}`)
  console.log(`keys         ${t.keys} (${t.tensors} tensors in ${t.chunks} chunks, ${t.objects} other values)`)
  console.log(`bytes        ${humanBytes(t.tensorBytes)} of tensors, ${humanBytes(t.objectBytes)} of other values`)
  console.log(`ranks        ${t.ranks} (${t.files.length} data files)`)
  console.log(`layout       ${f.layout}: ${f.writer}`)
  if (f.nemoRlWeights) console.log(`NeMo-RL      weights ${f.nemoRlWeights}${f.tokenizerBeside ? `, tokenizer ${f.tokenizerBeside}` : ''}`)
  if (f.layout === 'dcp' || f.layout === 'dcp-safetensors') {
    console.log(`written by   ${f.writtenBy}`)
    console.log(`key layout   ${f.keyLayout}`)
  }
  if (f.loadableByTorch) {
    const warn = f.layout === 'dcp' && f.loadableByTorch !== '>= 2.0' ? ` (older torch fails on it; \`distcp retarget <dir> --torch <version>\` rewrites .metadata for it)` : ''
    console.log(`torch        loads with torch ${f.loadableByTorch}${warn}`)
  }
  console.log(`metadata     ${f.metadataFile}${f.tensorPropertiesModule ? `, TensorProperties from ${f.tensorPropertiesModule}` : ''}`)
}

/** A `--hf-override` value: JSON when it parses (numbers, booleans, null, lists, objects), else the string. */
function parseOverride(v: string): unknown {
  try {
    return JSON.parse(v)
  } catch {
    return v
  }
}

function usageError(msg: string): number {
  process.stderr.write(`distcp: ${msg}\n${USAGE}`)
  return 2
}

function fail(e: unknown): number {
  const msg = e instanceof DistcpError ? `${e.message} (${e.code})` : e instanceof Error ? e.message : String(e)
  process.stderr.write(`distcp: ${msg}\n`)
  return 1
}

function progressReporter(json: boolean): (p: ConvertProgress) => void {
  const tty = process.stderr.isTTY && !json
  const start = performance.now()
  let lastLine = 0
  return (p) => {
    const secs = (performance.now() - start) / 1000
    const rate = p.bytesDone / Math.max(secs, 1e-6)
    const eta = rate > 0 ? (p.bytesTotal - p.bytesDone) / rate : 0
    const pct = p.bytesTotal ? (100 * p.bytesDone) / p.bytesTotal : 100
    if (tty) {
      const width = 30
      const filled = Math.round((pct / 100) * width)
      process.stderr.write(
        `\r[${'#'.repeat(filled)}${'.'.repeat(width - filled)}] ${pct.toFixed(1)}%  ${(p.bytesDone / 1e9).toFixed(2)}/${(p.bytesTotal / 1e9).toFixed(2)} GB  ${(rate / 1e9).toFixed(2)} GB/s  ETA ${eta.toFixed(0)}s  ${p.file}   `,
      )
      if (p.tensorsDone === p.tensorsTotal) process.stderr.write('\n')
    } else if (!json && (performance.now() - lastLine > 2000 || p.tensorsDone === p.tensorsTotal)) {
      lastLine = performance.now()
      process.stderr.write(`${p.tensorsDone}/${p.tensorsTotal} tensors, ${(p.bytesDone / 1e9).toFixed(2)}/${(p.bytesTotal / 1e9).toFixed(2)} GB, ${p.file}\n`)
    }
  }
}

async function convertCommand(rest: string[]): Promise<number> {
  const positional: string[] = []
  const opts: ConvertOptions = {}
  let config: string | undefined
  let tokenizer: string | undefined
  let json = false
  const valued = new Set(['--config', '--tokenizer', '--dtype', '--max-shard-size', '--hf-override', '--rank', '--world', '--master-addr', '--master-port'])
  const group: { rank?: number; worldSize?: number; masterAddr?: string; masterPort?: number } = {}
  for (let i = 0; i < rest.length; i++) {
    const a = rest[i]
    if (valued.has(a)) {
      const v = rest[++i]
      if (v === undefined) return usageError(`${a} needs a value`)
      if (a === '--config') config = v
      else if (a === '--tokenizer') tokenizer = v
      else if (a === '--dtype') opts.dtype = v as ConvertOptions['dtype']
      else if (a === '--rank' || a === '--world' || a === '--master-port') {
        if (!/^\d+$/.test(v)) return usageError(`${a} needs a non-negative integer, got \`${v}\``)
        group[a === '--rank' ? 'rank' : a === '--world' ? 'worldSize' : 'masterPort'] = Number(v)
      } else if (a === '--master-addr') group.masterAddr = v
      else if (a === '--hf-override') {
        const eq = v.indexOf('=')
        if (eq < 1) return usageError(`--hf-override needs key=value, got \`${v}\``)
        opts.hfOverrides = { ...opts.hfOverrides, [v.slice(0, eq)]: parseOverride(v.slice(eq + 1)) }
      }
      else opts.maxShardSize = /^\d+$/.test(v) ? Number(v) : v
    } else if (a === '--overwrite') opts.overwrite = true
    else if (a === '--dry-run') opts.dryRun = true
    else if (a === '--json') json = true
    else if (a.startsWith('-')) return usageError(`unknown option \`${a}\``)
    else positional.push(a)
  }
  if (positional.length !== 2) return usageError('convert needs <dcp-dir> and <hf-out>')
  if (!config) return usageError('convert needs --config <model dir or hub name> (for config.json)')
  const [dcp, out] = positional
  if ((group.rank === undefined) !== (group.worldSize === undefined)) return usageError('--rank and --world go together')
  // under torchrun (or any launcher setting its variables) every rank converts its share
  const ranked = group.worldSize !== undefined || Number(process.env.WORLD_SIZE ?? '1') > 1
  let pg: ProcessGroup | undefined
  try {
    if (ranked && !opts.dryRun) opts.processGroup = pg = await initProcessGroup(group)
    if (opts.dryRun) {
      const plan = await planDcpToHf(dcp, out, config, tokenizer, opts)
      if (json) console.log(JSON.stringify(plan, null, 2))
      else printPlan(plan, out)
      return 0
    }
    const started = performance.now()
    let planned: ConvertPlan | undefined
    await convertDcpToHf(dcp, out, config, tokenizer, { ...opts, onProgress: progressReporter(json), onPlan: (p) => (planned = p) })
    const plan = planned as ConvertPlan
    // one summary for the output, from the rank that committed it
    if (pg && pg.rank !== 0) return 0
    const seconds = (performance.now() - started) / 1000
    const summary = {
      output: out,
      files: [...plan.shards.map((s) => s.file), ...(plan.indexJson ? ['model.safetensors.index.json'] : []), ...plan.extraFiles],
      tensors: plan.tensors.length,
      bytes: plan.totalSize,
      seconds,
      skipped: plan.skipped,
      layout: plan.layout,
      writer: plan.writer,
      tokenizer: plan.tokenizer,
    }
    if (json) console.log(JSON.stringify(summary, null, 2))
    else {
      console.log(`wrote ${out}: ${summary.tensors} tensors, ${(summary.bytes / 1e9).toFixed(2)} GB in ${plan.shards.length} shard(s), ${seconds.toFixed(1)} s (${(summary.bytes / 1e9 / seconds).toFixed(2)} GB/s)`)
      console.log(`  input: ${plan.layout} (${plan.writer})`)
      console.log(`  tokenizer: ${plan.tokenizer ? `${plan.tokenizer.dir} (${plan.tokenizer.source})` : 'none'}`)
      for (const s of plan.skipped) console.log(`  skipped ${s.key}: ${s.reason}`)
    }
    return 0
  } catch (e) {
    return fail(e)
  } finally {
    await pg?.destroy()
  }
}

function retargetCommand(rest: string[]): number {
  let torch: string | undefined
  let keepOriginal = true
  let json = false
  const positional: string[] = []
  for (let i = 0; i < rest.length; i++) {
    const a = rest[i]
    if (a === '--torch') {
      torch = rest[++i]
      if (torch === undefined) return usageError('--torch needs a version, e.g. 2.13')
    } else if (a === '--no-keep-original') keepOriginal = false
    else if (a === '--json') json = true
    else if (a.startsWith('-')) return usageError(`unknown option \`${a}\``)
    else positional.push(a)
  }
  if (positional.length !== 1 || !torch) return usageError('retarget needs <checkpoint-dir> and --torch <version>')
  try {
    const r = retarget(positional[0], { torch, keepOriginal })
    if (json) console.log(JSON.stringify(r, null, 2))
    else if (!r.rewritten) console.log(`${positional[0]}: already loads with torch >= ${r.before}; nothing written`)
    else console.log(`${positional[0]}: ${r.files.map((f) => basename(f)).join(', ')} rewritten (torch >= ${r.before} → >= ${r.after})${r.original ? `, original${r.files.length > 1 ? 's' : ''} kept as <name>.orig` : ''}`)
    return 0
  } catch (e) {
    return fail(e)
  }
}

export async function main(argv: string[]): Promise<number> {
  const [command, ...rest] = argv
  if (!command || command === '--help' || command === '-h') {
    process.stdout.write(USAGE)
    return command ? 0 : 2
  }
  if (command === 'convert') return convertCommand(rest)
  if (command === 'retarget') return retargetCommand(rest)
  if (command !== 'inspect') {
    process.stderr.write(`distcp: unknown command \`${command}\`\n${USAGE}`)
    return 2
  }
  let json = false
  let rank: number | undefined
  const positional: string[] = []
  for (let i = 0; i < rest.length; i++) {
    const a = rest[i]
    if (a === '--json') json = true
    else if (a === '--rank') rank = Number(rest[++i])
    else if (a.startsWith('-')) {
      process.stderr.write(`distcp: unknown option \`${a}\`\n${USAGE}`)
      return 2
    } else positional.push(a)
  }
  if (positional.length !== 1 || (rank !== undefined && !Number.isInteger(rank))) {
    process.stderr.write(USAGE)
    return 2
  }
  try {
    const ck = await openCheckpoint(positional[0], { rank })
    const inv = inventory(ck)
    ck.close()
    if (json) console.log(JSON.stringify(inv, null, 2))
    else printInventory(inv)
    return 0
  } catch (e) {
    const msg = e instanceof DistcpError ? `${e.message} (${e.code})` : String(e)
    process.stderr.write(`distcp: ${msg}\n`)
    return 1
  }
}
