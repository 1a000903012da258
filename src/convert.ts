import { existsSync, readFileSync, readdirSync, statSync } from 'node:fs'
import { copyFile, mkdir, open, writeFile } from 'node:fs/promises'
import { dirname, join, resolve } from 'node:path'

import { openCheckpoint, type Checkpoint } from './checkpoint.js'
import { awaitNative, callNative, DistcpError } from './errors.js'
import { resolveModel, TOKENIZER_DIRS, TOKENIZER_FILES } from './hf.js'
import { native, type CheckpointLayout } from './native.js'
import type { DType } from './tensor.js'
import type { ProcessGroup } from './distributed/group.js'
import { convertRanks } from './distributed/convert.js'

/**
 * Progress of a conversion. Reported at a bounded interval (about every 100 ms) while the native job writes, and
 * once at the end with every tensor done; tensors complete in plan order.
 */
export interface ConvertProgress {
  bytesDone: number
  bytesTotal: number
  tensorsDone: number
  tensorsTotal: number
  /** The shard being written. */
  file: string
}

export interface ConvertOptions {
  /**
   * Write into an existing output folder. Only the files distcp writes are replaced (weights, index, config,
   * generation config, tokenizer files); earlier weights that would mix with the new ones are removed (the
   * shards an earlier `model.safetensors.index.json` lists, files named `model-NNNNN-of-NNNNN.safetensors` as
   * transformers' `save_pretrained` removes them, a single `model.safetensors` / `pytorch_model.bin` / index the
   * new output does not have); every other file in the folder is kept. The new files are staged in a temporary folder inside
   * it and moved in at the end (config last; an interrupted move is finished by the next run). A regular file at
   * the output path is refused (`ERR_DISTCP_NOT_A_DIRECTORY`).
   */
  overwrite?: boolean
  /**
   * Cast floating tensors (round to nearest even, as torch's `.to()`, fp8 included: into `float8_e4m3fn` an overflow
   * saturates to ±448 as torch ≥ 2.15 does, into `float8_e5m2` it becomes ±inf); default: keep what was stored.
   */
  dtype?: DType | 'bf16' | 'fp16' | 'fp32'
  /** Largest shard: bytes, or "5GB" / "500MB" / "2GiB". Default 50GB, as transformers v5. */
  maxShardSize?: number | string
  /** Rename tensors by prefix: `{ 'model.': '' }` strips `model.`. Applied after the seed's `model.` unwrap. */
  keyMap?: Record<string, string>
  /**
   * Only tensors whose output name matches one of these globs, as a whole: `*` matches any run of characters,
   * dots included, `?` any one character; everything else is literal (`model.layers.*.mlp.*`).
   */
  include?: string[]
  /** Leave out tensors whose output name matches one of these globs (as `include`); applied after `include`. */
  exclude?: string[]
  /**
   * Write the seed's artefact instead of safetensors: one `pytorch_model.bin` (a `torch.save` of the
   * `{name: tensor}` dict, loadable with `torch.load(weights_only=True)`). Holds one tensor in memory at a time.
   */
  pytorchModelBin?: boolean
  /** Plan only: print what would be written and write nothing. */
  dryRun?: boolean
  /** Called about every 100 ms while tensors are written, and once when all are (see {@link ConvertProgress}). */
  onProgress?: (p: ConvertProgress) => void
  /** Stops between tensors (and between slabs of a large one); nothing is left behind. */
  signal?: AbortSignal
  /** Where warnings go (default: console.warn). */
  onWarning?: (message: string) => void
  /** Called with the plan before any data moves. */
  onPlan?: (plan: ConvertPlan) => void
  /**
   * Fields set on the model's config before it is written, as NeMo-RL's `convert_dcp_to_hf(hf_overrides=...)`
   * passes them to `AutoConfig.from_pretrained(name, **hf_overrides)`: the written `config.json` carries them.
   */
  hfOverrides?: Record<string, unknown>
  /**
   * Convert together with the other ranks of this group (see `initProcessGroup`; every rank calls with the same
   * arguments): each rank writes its share of the shards, rank 0 the index and config once all succeeded; the
   * output is the same bytes as a single-process conversion, and a failure on any rank fails every rank and leaves
   * nothing. The output folder must be the same folder for every rank (a shared file system across hosts).
   * `onProgress` reports this rank's share.
   */
  processGroup?: ProcessGroup
}

export interface PlannedTensor {
  key: string
  name: string
  sourceDtype: DType
  dtype: DType
  shape: number[]
  offset: number
  nbytes: number
  shard: number
}

export interface ConvertPlan {
  shards: { file: string; size: number; headerLen: number; tensors: number[] }[]
  tensors: PlannedTensor[]
  totalSize: number
  indexJson: string | null
  /** Tensors of the checkpoint left out, and why. */
  skipped: { key: string; reason: string }[]
  /** Files copied next to the weights (config, generation config, tokenizer). */
  extraFiles: string[]
  /** The folder the checkpoint was found in (`.metadata`, or the safetensors files). */
  checkpoint: string
  /** The layout found there. */
  layout: CheckpointLayout
  /** Which writer produced the input, in words. */
  writer: string
  /** The folder the tokenizer files are copied from (null: none), and why that one. */
  tokenizer: { dir: string; source: 'given' | 'model' | 'nemo-rl' } | null
}

const DEFAULT_MAX_SHARD = 50e9
/** @internal How often `onProgress` hears from a running conversion (here and in `distributed/convert.ts`). */
export const PROGRESS_INTERVAL_MS = 100
const DTYPE_ALIASES: Record<string, DType> = { bf16: 'bfloat16', fp16: 'float16', half: 'float16', fp32: 'float32', float: 'float32' }
const CAST_TARGETS = new Set<DType>(['bfloat16', 'float16', 'float32', 'float64', 'float8_e4m3fn', 'float8_e5m2'])

/**
 * Opens the input whatever its layout (the core detects it: `.metadata` in the folder (DTensor v1) or in
 * `model/` (v2), safetensors files, a NeMo-RL run folder); when there is none, the seed's error.
 */
async function openInput(dcpPath: string): Promise<Checkpoint> {
  try {
    return await openCheckpoint(dcpPath)
  } catch (e) {
    if (e instanceof DistcpError && e.code === 'ERR_DISTCP_NO_CHECKPOINT') {
      throw new DistcpError(
        'ERR_DISTCP_NO_CHECKPOINT',
        `No metadata file found in ${dcpPath}(Dtensor V1 ckpt path) or ${join(dcpPath, 'model')}(Dtensor V2 ckpt path).`,
        { cause: e },
      )
    }
    throw e
  }
}

function parseMaxShard(v: number | string | undefined): number {
  if (v === undefined) return DEFAULT_MAX_SHARD
  const n = typeof v === 'number' ? v : native.parseSize(v)
  if (n === null || n === undefined || !Number.isFinite(n) || n < 1) {
    throw new DistcpError('ERR_DISTCP_BAD_REQUEST', `maxShardSize: cannot read ${JSON.stringify(v)} as a size (e.g. 5GB, 500MB, 2GiB)`)
  }
  return n
}

function resolveDtype(d: ConvertOptions['dtype']): DType | undefined {
  if (d === undefined) return undefined
  const dtype = (DTYPE_ALIASES[d] ?? d) as DType
  if (!CAST_TARGETS.has(dtype)) {
    throw new DistcpError('ERR_DISTCP_BAD_REQUEST', `unknown dtype ${JSON.stringify(d)}: use one of ${[...CAST_TARGETS].join(', ')}`)
  }
  return dtype
}

/** What every conversion (single-process, or one rank's, `src/distributed/convert.ts`) works from. @internal */
export interface Prepared {
  ck: Checkpoint
  ckDir: string
  layout: CheckpointLayout
  writer: string
  tokenizer: ConvertPlan['tokenizer']
  /** The tensors to write and their names, chosen natively (`keyMap` / `include` / `exclude`, tied embeddings). */
  selection: ReturnType<typeof native.selectConvertEntries>
  dtype?: DType
  maxShard: number
  config: Record<string, unknown> | null
  modelDir: string | null
  tokenizerDir: string | null
}

const EMBEDDING_NAMES = ['model.embed_tokens.weight', 'transformer.wte.weight', 'model.decoder.embed_tokens.weight', 'embed_tokens.weight']

/** @internal */
export async function prepare(dcpPath: string, hfPath: string, modelNameOrPath: string, tokenizerNameOrPath: string | undefined, options: ConvertOptions): Promise<Prepared> {
  const warn = options.onWarning ?? ((m: string) => console.warn(`distcp: ${m}`))
  // the output may not be, contain or lie inside the input (after realpath): the rule lives in the core
  callNative(() => native.checkConvertOutput(hfPath, [dcpPath]))
  for (const name of ['onProgress', 'onWarning', 'onPlan'] as const) {
    if (options[name] !== undefined && typeof options[name] !== 'function') {
      throw new DistcpError('ERR_DISTCP_BAD_REQUEST', `${name}: expected a function, not ${typeof options[name]}`)
    }
  }
  if (options.signal !== undefined && !(options.signal instanceof AbortSignal)) {
    throw new DistcpError('ERR_DISTCP_BAD_REQUEST', 'signal: expected an AbortSignal')
  }
  const dtype = resolveDtype(options.dtype)
  const maxShard = parseMaxShard(options.maxShardSize)
  const overrides = options.hfOverrides ?? {}
  if (typeof overrides !== 'object' || overrides === null || Array.isArray(overrides)) {
    throw new DistcpError('ERR_DISTCP_BAD_REQUEST', 'hfOverrides: expected an object of config fields')
  }
  const ck = await openInput(dcpPath)
  try {
    return await prepareOpen(ck, dcpPath, hfPath, modelNameOrPath, tokenizerNameOrPath, options, { warn, dtype, maxShard, overrides })
  } catch (e) {
    ck.close()
    throw e
  }
}

async function prepareOpen(
  ck: Checkpoint,
  dcpPath: string,
  hfPath: string,
  modelNameOrPath: string,
  tokenizerNameOrPath: string | undefined,
  options: ConvertOptions,
  o: { warn: (m: string) => void; dtype: DType | undefined; maxShard: number; overrides: Record<string, unknown> },
): Promise<Prepared> {
  const { warn, dtype, maxShard } = o
  const summary = ck.summary()
  const ckDir = summary.path
  callNative(() => native.checkConvertOutput(hfPath, [dcpPath, ckDir]))

  const model = resolveModel(modelNameOrPath)
  if ('looked' in model) {
    throw new DistcpError('ERR_DISTCP_NOT_FOUND', `model ${JSON.stringify(modelNameOrPath)} is neither a folder nor in the Hugging Face cache (looked at ${model.looked.join(', ')})`)
  }
  const configPath = join(model.dir, 'config.json')
  if (!existsSync(configPath)) {
    throw new DistcpError('ERR_DISTCP_NOT_FOUND', `${configPath} does not exist: the model folder needs a config.json`)
  }
  const config = { ...(JSON.parse(readFileSync(configPath, 'utf8')) as Record<string, unknown>), ...o.overrides }
  // NeMo-RL's converter prefers the tokenizer saved beside the weights (`policy/tokenizer`) when none is given
  const beside = tokenizerNameOrPath === undefined ? summary.tokenizerBeside ?? undefined : undefined
  const tokenizerSource: 'given' | 'model' | 'nemo-rl' = tokenizerNameOrPath !== undefined ? 'given' : beside ? 'nemo-rl' : 'model'
  const tok = resolveModel(tokenizerNameOrPath ?? beside ?? modelNameOrPath)
  if ('looked' in tok) {
    throw new DistcpError('ERR_DISTCP_NOT_FOUND', `tokenizer ${JSON.stringify(tokenizerNameOrPath)} is neither a folder nor in the Hugging Face cache (looked at ${tok.looked.join(', ')})`)
  }
  const hasTokenizer = TOKENIZER_FILES.some((f) => existsSync(join(tok.dir, f)))
  if (!hasTokenizer) {
    if (tokenizerNameOrPath !== undefined) throw new DistcpError('ERR_DISTCP_NOT_FOUND', `no tokenizer files in ${tok.dir}`)
    warn(`no tokenizer files in ${tok.dir}; the output will have none`)
  }

  // the naming rules (the seed's `model.` unwrap, keyMap, include/exclude) live in the core: no key crosses here
  const selection = callNative(() =>
    native.selectConvertEntries(ck.nativeHandle(), {
      keyMap: Object.entries(options.keyMap ?? {}).map(([from, to]) => ({ from, to })),
      include: options.include,
      exclude: options.exclude,
    }),
  )

  // tied embeddings: drop lm_head only if the config ties it and it is bit-identical to the input embedding
  const textConfig = (config.text_config ?? {}) as Record<string, unknown>
  const tied = (config.tie_word_embeddings ?? textConfig.tie_word_embeddings) === true
  const headKey = selection.keyOf('lm_head.weight')
  const embedName = EMBEDDING_NAMES.find((n) => selection.keyOf(n) != null)
  const embedKey = embedName === undefined ? null : selection.keyOf(embedName)
  // the seed's pytorch_model.bin keeps both keys (torch.save shares nothing here), so only safetensors drops it
  if (tied && headKey != null && embedName !== undefined && embedKey != null && !options.pytorchModelBin) {
    const same = await awaitNative(() => native.tensorsEqual(ck.nativeHandle(), headKey, embedKey))
    if (same) {
      selection.leaveOut('lm_head.weight', `tied to ${embedName} (tie_word_embeddings)`)
    } else {
      warn(`config.json ties word embeddings, but lm_head.weight differs from ${embedName}: keeping both (the config is probably wrong)`)
    }
  }
  return {
    ck,
    ckDir,
    layout: summary.layout,
    writer: summary.writer,
    tokenizer: hasTokenizer ? { dir: tok.dir, source: tokenizerSource } : null,
    selection,
    dtype,
    maxShard,
    config,
    modelDir: model.dir,
    tokenizerDir: hasTokenizer ? tok.dir : null,
  }
}

/** @internal */
export function extraFileList(p: Prepared): { from: string; to: string }[] {
  const files: { from: string; to: string }[] = []
  if (p.modelDir && existsSync(join(p.modelDir, 'generation_config.json'))) {
    files.push({ from: join(p.modelDir, 'generation_config.json'), to: 'generation_config.json' })
  }
  if (p.tokenizerDir) {
    for (const f of TOKENIZER_FILES) {
      if (existsSync(join(p.tokenizerDir, f))) files.push({ from: join(p.tokenizerDir, f), to: f })
    }
    for (const d of TOKENIZER_DIRS) {
      const dir = join(p.tokenizerDir, d)
      if (existsSync(dir) && statSync(dir).isDirectory()) {
        for (const f of readdirSync(dir)) files.push({ from: join(dir, f), to: join(d, f) })
      }
    }
  }
  return files
}

/** @internal The plan, made and held natively (a job takes it). */
export function planNative(p: Prepared): ReturnType<typeof native.planConvertNative> {
  return callNative(() => native.planConvertNative(p.ck.nativeHandle(), p.selection, p.dtype, p.maxShard))
}

/** @internal The whole plan, as `onPlan` and `planDcpToHf` give it. */
export function planOf(p: Prepared, handle = planNative(p)): ConvertPlan {
  const raw = callNative(() => handle.plan())
  return {
    shards: raw.shards,
    tensors: raw.tensors.map((t) => ({ ...t, sourceDtype: t.sourceDtype as DType, dtype: t.dtype as DType })),
    totalSize: raw.totalSize,
    indexJson: raw.indexJson ?? null,
    skipped: p.selection.skipped(),
    extraFiles: ['config.json', ...extraFileList(p).map((f) => f.to)],
    checkpoint: p.ckDir,
    layout: p.layout,
    writer: p.writer,
    tokenizer: p.tokenizer,
  }
}

/** The config with its dtype field(s) set to what the weights are stored as. */
/** @internal */
export function configFor(config: Record<string, unknown>, plan: ConvertPlan): string {
  const bytesByDtype = new Map<string, number>()
  for (const t of plan.tensors) bytesByDtype.set(t.dtype, (bytesByDtype.get(t.dtype) ?? 0) + t.nbytes)
  return configForBytes(config, bytesByDtype)
}

/** {@link configFor} from the output bytes per dtype (in order of first appearance in the plan). */
function configForBytes(config: Record<string, unknown>, bytesByDtype: Map<string, number>): string {
  const floats = [...bytesByDtype.entries()].filter(([d]) => ['float32', 'bfloat16', 'float16', 'float64'].includes(d))
  const dtype = floats.sort((a, b) => b[1] - a[1])[0]?.[0]
  const out = { ...config }
  if (dtype) {
    const hasNew = 'dtype' in config
    const hasOld = 'torch_dtype' in config
    if (hasNew || !hasOld) out.dtype = dtype
    if (hasOld || !hasNew) out.torch_dtype = dtype
  }
  return JSON.stringify(out, null, 2) + '\n'
}

/** Plans a conversion without writing anything (what `dryRun` prints). */
export async function planDcpToHf(
  dcpCkptPath: string,
  hfCkptPath: string,
  modelNameOrPath: string,
  tokenizerNameOrPath?: string,
  options: ConvertOptions = {},
): Promise<ConvertPlan> {
  const p = await prepare(dcpCkptPath, hfCkptPath, modelNameOrPath, tokenizerNameOrPath, options)
  try {
    return planOf(p)
  } finally {
    p.ck.close()
  }
}

/** @internal */
export async function fsyncPath(path: string): Promise<void> {
  const fh = await open(path, 'r')
  try {
    await fh.sync()
  } finally {
    await fh.close()
  }
}

/**
 * Converts a DCP checkpoint to a Hugging Face folder: safetensors shards (+ index), config.json with the dtype
 * actually written, generation_config.json and the tokenizer files. Streams stored bytes into place in bounded
 * memory. Atomic: the output appears complete or not at all. Returns `hfCkptPath`, like the seed.
 */
export async function convertDcpToHf(
  dcpCkptPath: string,
  hfCkptPath: string,
  modelNameOrPath: string,
  tokenizerNameOrPath?: string,
  options: ConvertOptions = {},
): Promise<string> {
  if (options.processGroup) return convertRanks(dcpCkptPath, hfCkptPath, modelNameOrPath, tokenizerNameOrPath, { ...options, processGroup: options.processGroup })
  callNative(() => native.checkConvertOutput(hfCkptPath, [dcpCkptPath]))
  if (existsSync(hfCkptPath) && !options.overwrite && !options.dryRun) {
    throw new DistcpError('ERR_DISTCP_EXISTS', `HF checkpoint already exists at ${hfCkptPath}. Delete it to run or set overwrite=True.`)
  }
  const { signal } = options
  const aborted = (cause?: unknown) =>
    new DistcpError('ERR_DISTCP_ABORTED', `conversion of ${dcpCkptPath} aborted; nothing was written`, { cause })
  if (signal?.aborted) throw aborted(signal.reason)
  const p = await prepare(dcpCkptPath, hfCkptPath, modelNameOrPath, tokenizerNameOrPath, options)
  // planned once, natively; the per-tensor plan crosses into JavaScript only when someone reads it
  let handle: ReturnType<typeof native.planConvertNative>
  let summary: ReturnType<typeof handle.summary>
  try {
    handle = planNative(p)
    if (options.onPlan || options.dryRun) {
      const plan = planOf(p, handle)
      options.onPlan?.(plan)
      if (options.dryRun) {
        printPlan(plan, hfCkptPath)
        p.ck.close()
        return hfCkptPath
      }
    }
    summary = callNative(() => handle.summary())
  } catch (e) {
    p.ck.close()
    throw e
  }

  // the core owns the commit: it locks the output folder, stages a temporary folder inside it, and on commit
  // moves the new files in (journalled, config last), removing only the earlier output's weights
  const out = resolve(hfCkptPath)
  let staged: ReturnType<typeof native.beginConvertOutput> | undefined
  try {
    await mkdir(dirname(out), { recursive: true })
    staged = callNative(() => native.beginConvertOutput(out, [resolve(dcpCkptPath), p.ckDir]))
    const tmp = staged.tmpDir
    const job = callNative(() => native.createConvertJobFromPlan(p.ck.nativeHandle(), handle, tmp))
    const onAbort = () => job.cancel()
    signal?.addEventListener('abort', onAbort)
    try {
      const n = summary.tensors
      const report = (bytesDone: number, tensorsDone: number, file: string) =>
        options.onProgress?.({ bytesDone, bytesTotal: summary.totalSize, tensorsDone, tensorsTotal: n, file })
      if (options.pytorchModelBin) {
        await awaitNative(() => job.writePytorchModelBin())
        report(summary.totalSize, n, 'pytorch_model.bin')
      } else {
        // the whole write loop runs natively; progress is polled, not sent per tensor
        const fileOf = (t: number) => {
          // the plan's tensors go shard by shard: tensor t is in the first shard whose tensors reach past it
          if (n === 0) return ''
          let end = 0
          for (let s = 0; s < summary.shardFiles.length; s++) {
            end += summary.shardTensors[s]
            if (Math.min(t, n - 1) < end) return summary.shardFiles[s]
          }
          return ''
        }
        let last = -1
        let failed: { error: unknown } | undefined
        const poll = () => {
          const p = job.progress()
          // completion is reported once, below, after the fsyncs: a poll that lands between the last tensor and
          // the end of the run would report it twice (a progress stream that stalls)
          if (p.tensorsDone === last || p.tensorsDone >= n) return
          last = p.tensorsDone
          try {
            report(p.bytesDone, p.tensorsDone, fileOf(p.tensorsDone))
          } catch (error) {
            // thrown out of a timer it would be an uncaught exception, which ends the process: it fails the run
            failed ??= { error }
            job.cancel()
          }
        }
        signal?.throwIfAborted()
        const timer = options.onProgress ? setInterval(poll, PROGRESS_INTERVAL_MS) : undefined
        try {
          await awaitNative(() => job.run())
        } catch (e) {
          if (!failed) throw e
        } finally {
          if (timer) clearInterval(timer)
        }
        if (failed) throw failed.error
        signal?.throwIfAborted()
        report(summary.totalSize, n, fileOf(n - 1))
      }
      signal?.throwIfAborted()
    } finally {
      signal?.removeEventListener('abort', onAbort)
    }
    const bytesByDtype = new Map(summary.dtypes.map((d, i) => [d, summary.dtypeBytes[i]] as const))
    await writeFile(join(tmp, 'config.json'), configForBytes(p.config ?? {}, bytesByDtype))
    for (const f of extraFileList(p)) {
      await mkdir(dirname(join(tmp, f.to)), { recursive: true })
      await copyFile(f.from, join(tmp, f.to))
    }
    for (const f of ['config.json', ...extraFileList(p).map((x) => x.to)]) await fsyncPath(join(tmp, f))
    await fsyncPath(tmp)
    signal?.throwIfAborted()
    const committing = staged
    staged = undefined
    callNative(() => committing.commit())
    return hfCkptPath
  } catch (e) {
    staged?.abort()
    if (signal?.aborted) throw aborted(e)
    if (e instanceof DistcpError) throw e
    // file-system failures (read-only, full disk, permissions) keep their errno code inside a DistcpError
    const code = (e as NodeJS.ErrnoException | undefined)?.code
    throw new DistcpError('ERR_DISTCP_IO', `converting ${dcpCkptPath} to ${hfCkptPath} failed${code ? ` (${code})` : ''}: ${e instanceof Error ? e.message : String(e)}; nothing was written`, { cause: e })
  } finally {
    p.ck.close()
  }
}

function human(n: number): string {
  const u = ['B', 'KB', 'MB', 'GB', 'TB']
  let i = 0
  while (n >= 1000 && i < u.length - 1) {
    n /= 1000
    i++
  }
  return i === 0 ? `${n} B` : `${n.toFixed(2)} ${u[i]}`
}

export function printPlan(plan: ConvertPlan, out: string): void {
  console.log(`plan: ${plan.checkpoint} → ${out}`)
  console.log(`  input: ${plan.layout} (${plan.writer})`)
  console.log(`  tokenizer: ${plan.tokenizer ? `${plan.tokenizer.dir} (${plan.tokenizer.source})` : 'none'}`)
  for (const s of plan.shards) {
    console.log(`  ${s.file}  ${human(s.size)}  ${s.tensors.length} tensors`)
    for (const i of s.tensors) {
      const t = plan.tensors[i]
      const cast = t.sourceDtype === t.dtype ? t.dtype : `${t.sourceDtype} → ${t.dtype}`
      console.log(`    ${t.name}  ${cast}  [${t.shape.join(', ')}]  ${human(t.nbytes)}`)
    }
  }
  if (plan.indexJson) console.log('  model.safetensors.index.json')
  for (const f of plan.extraFiles) console.log(`  ${f}`)
  for (const s of plan.skipped) console.log(`  (skipped ${s.key}: ${s.reason})`)
  console.log(`total: ${plan.tensors.length} tensors, ${human(plan.totalSize)} in ${plan.shards.length} file(s)`)
}
