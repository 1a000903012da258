/**
 * `convertDcpToHf` across ranks (`options.processGroup`, or `distcp convert --rank R --world W` / torchrun):
 * 1. `reduce_scatter("convert-plan")`: every rank opens the input and plans the conversion from its metadata (the
 *    same plan everywhere: the ranks check it by digest); rank 0 then locks the output folder and stages a
 *    temporary folder inside it (the core's `commit` rules, as a single-process conversion), and tells every
 *    rank where it is;
 * 2. `all_reduce("convert-write")`: each rank writes the shards it was given ({@link assignShards}) into that
 *    folder with the core's conversion job and fsyncs them (rank 0 also the index); once every rank reported
 *    success, rank 0 writes the config, the generation config and the tokenizer files and commits, once.
 * Each shard is written by one rank with the same job a single-process conversion runs, so the output is the same
 * bytes. A failure on any rank (or a rank that never reports) fails every rank with the same `CheckpointError`,
 * and rank 0 removes the staged folder: nothing is left. The output folder must be one folder for every rank (on
 * a shared file system across hosts).
 */
import { createHash } from 'node:crypto'
import { existsSync } from 'node:fs'
import { copyFile, mkdir, writeFile } from 'node:fs/promises'
import { dirname, join, resolve } from 'node:path'

import { configFor, convertDcpToHf, extraFileList, fsyncPath, planNative, planOf, prepare, PROGRESS_INTERVAL_MS, type ConvertOptions, type ConvertPlan, type Prepared } from '../convert.js'
import { awaitNative, callNative, DistcpError } from '../errors.js'
import { native } from '../native.js'
import type { ProcessGroup } from './group.js'

/**
 * Which rank writes each shard (by shard index): the largest shard first, each to the rank with the fewest bytes
 * so far (ties: the lower shard first, the lower rank), so the ranks finish together. Every rank computes it.
 */
export function assignShards(sizes: number[], worldSize: number): number[] {
  const order = sizes.map((_, i) => i).sort((a, b) => sizes[b] - sizes[a] || a - b)
  const load = new Array<number>(worldSize).fill(0)
  const owner = new Array<number>(sizes.length).fill(0)
  for (const s of order) {
    let r = 0
    for (let q = 1; q < worldSize; q++) if (load[q] < load[r]) r = q
    owner[s] = r
    load[r] += sizes[s]
  }
  return owner
}

/** What the ranks must agree on: every output byte follows from it. */
function digest(p: Prepared, plan: ConvertPlan, options: ConvertOptions, out: string): string {
  const what = {
    // every rank writes into rank 0's staging folder (a path it is sent): a rank given another output would
    // report a folder where nothing was written
    out,
    shards: plan.shards,
    tensors: plan.tensors,
    indexJson: plan.indexJson,
    config: configFor(p.config ?? {}, plan),
    extra: extraFileList(p).map((f) => f.to),
    pytorchModelBin: options.pytorchModelBin === true,
  }
  return createHash('sha256').update(JSON.stringify(what)).digest('hex')
}

/** @internal `convertDcpToHf` with `options.processGroup`; see the module docs. */
export async function convertRanks(
  dcpCkptPath: string,
  hfCkptPath: string,
  modelNameOrPath: string,
  tokenizerNameOrPath: string | undefined,
  options: ConvertOptions & { processGroup: ProcessGroup },
): Promise<string> {
  const { processGroup: pg, signal } = options
  const single = { ...options, processGroup: undefined }
  if (options.dryRun) {
    // nothing is written: rank 0 prints the plan, as a single process would
    return pg.rank === 0 ? convertDcpToHf(dcpCkptPath, hfCkptPath, modelNameOrPath, tokenizerNameOrPath, single) : hfCkptPath
  }
  const aborted = (cause?: unknown) =>
    new DistcpError('ERR_DISTCP_ABORTED', `rank ${pg.rank}: conversion of ${dcpCkptPath} aborted; nothing was written`, { cause })
  const out = resolve(hfCkptPath)
  let p: Prepared | null = null
  let plan: ConvertPlan | null = null
  // the plan, made once and held natively until this rank's job takes it
  let handle: ReturnType<typeof planNative> | null = null
  // rank 0's staged output (the lock and the temporary folder), until committed
  let staged: ReturnType<typeof native.beginConvertOutput> | undefined
  try {
    const tmp = await pg.reduceScatter(
      'convert-plan',
      async () => {
        callNative(() => native.checkConvertOutput(hfCkptPath, [dcpCkptPath]))
        // only rank 0 looks: the others may find the folder rank 0 is creating
        if (pg.rank === 0 && existsSync(hfCkptPath) && !options.overwrite) {
          throw new DistcpError('ERR_DISTCP_EXISTS', `HF checkpoint already exists at ${hfCkptPath}. Delete it to run or set overwrite=True.`)
        }
        if (signal?.aborted) throw aborted(signal.reason)
        p = await prepare(dcpCkptPath, hfCkptPath, modelNameOrPath, tokenizerNameOrPath, single)
        handle = planNative(p)
        plan = planOf(p, handle)
        return digest(p, plan, options, out)
      },
      async (digests: string[]) => {
        const other = digests.findIndex((d) => d !== digests[0])
        if (other >= 0) {
          throw new DistcpError(
            'ERR_DISTCP_INVALID_INPUT',
            `rank ${other} planned a different conversion than rank 0 (every rank must convert the same input into the same output folder, with the same model, tokenizer and options)`,
          )
        }
        const mine = p as Prepared
        await mkdir(dirname(out), { recursive: true })
        staged = callNative(() => native.beginConvertOutput(out, [resolve(dcpCkptPath), mine.ckDir]))
        return digests.map(() => (staged as NonNullable<typeof staged>).tmpDir)
      },
    )
    const prepared = p as unknown as Prepared
    const planned = plan as unknown as ConvertPlan
    options.onPlan?.(planned)

    await pg.allReduce(
      'convert-write',
      () => writeShare(prepared, planned, handle as NonNullable<typeof handle>, tmp, pg, options),
      async () => {
        // rank 0, once every rank's shards are written and durable
        const files = extraFileList(prepared)
        await writeFile(join(tmp, 'config.json'), configFor(prepared.config ?? {}, planned))
        for (const f of files) {
          await mkdir(dirname(join(tmp, f.to)), { recursive: true })
          await copyFile(f.from, join(tmp, f.to))
        }
        for (const f of ['config.json', ...files.map((x) => x.to)]) await fsyncPath(join(tmp, f))
        await fsyncPath(tmp)
        const committing = staged as NonNullable<typeof staged>
        staged = undefined
        callNative(() => committing.commit())
        return null
      },
    )
    return hfCkptPath
  } catch (e) {
    if (e instanceof DistcpError) throw e
    const code = (e as NodeJS.ErrnoException | undefined)?.code
    throw new DistcpError(
      'ERR_DISTCP_IO',
      `rank ${pg.rank}: converting ${dcpCkptPath} to ${hfCkptPath} failed${code ? ` (${code})` : ''}: ${e instanceof Error ? e.message : String(e)}; nothing was written`,
      { cause: e },
    )
  } finally {
    // a failure on any rank: the staged folder goes, and the output folder is as it was
    staged?.abort()
    ;(p as Prepared | null)?.ck.close()
  }
}

/** This rank's shards (or, for `pytorchModelBin`, rank 0's one file), written into `tmp` and fsynced. */
async function writeShare(
  p: Prepared,
  plan: ConvertPlan,
  handle: ReturnType<typeof planNative>,
  tmp: string,
  pg: ProcessGroup,
  options: ConvertOptions,
): Promise<null> {
  const { signal } = options
  // one file for pytorchModelBin: rank 0 writes it, the others wait for it at the commit
  if (options.pytorchModelBin && pg.rank !== 0) return null
  const job = callNative(() => native.createConvertJobFromPlan(p.ck.nativeHandle(), handle, tmp))
  if (options.pytorchModelBin) {
    await awaitNative(() => job.writePytorchModelBin())
    const n = plan.tensors.length
    options.onProgress?.({ bytesDone: plan.totalSize, bytesTotal: plan.totalSize, tensorsDone: n, tensorsTotal: n, file: 'pytorch_model.bin' })
    return null
  }
  const owner = assignShards(
    plan.shards.map((s) => s.size),
    pg.worldSize,
  )
  const shards = plan.shards.map((_, i) => i).filter((i) => owner[i] === pg.rank)
  // this rank's tensors, in plan order (the order the job writes them in)
  const tensors = shards.flatMap((s) => plan.shards[s].tensors).sort((a, b) => a - b)
  const bytesTotal = tensors.reduce((n, i) => n + plan.tensors[i].nbytes, 0)
  const report = (bytesDone: number, tensorsDone: number) =>
    options.onProgress?.({
      bytesDone,
      bytesTotal,
      tensorsDone,
      tensorsTotal: tensors.length,
      file: tensors.length === 0 ? '' : plan.shards[plan.tensors[tensors[Math.min(tensorsDone, tensors.length - 1)]].shard].file,
    })
  const onAbort = () => job.cancel()
  signal?.addEventListener('abort', onAbort)
  // the whole share runs natively, as a single-process conversion does; progress is polled, not sent per tensor
  let last = -1
  let failed: { error: unknown } | undefined
  const poll = () => {
    const now = job.progress()
    // completion is reported once, after the run (see convertDcpToHf)
    if (now.tensorsDone === last || now.tensorsDone >= tensors.length) return
    last = now.tensorsDone
    try {
      report(now.bytesDone, now.tensorsDone)
    } catch (error) {
      // thrown out of a timer it would be an uncaught exception, which ends the process: it fails the run
      failed ??= { error }
      job.cancel()
    }
  }
  const timer = options.onProgress ? setInterval(poll, PROGRESS_INTERVAL_MS) : undefined
  try {
    signal?.throwIfAborted()
    try {
      await awaitNative(() => job.runShards(shards, pg.rank === 0))
    } catch (e) {
      if (!failed) throw e
    }
    if (failed) throw failed.error
    signal?.throwIfAborted()
    report(bytesTotal, tensors.length)
    // an abort from the last report still fails the conversion, as in a single-process one
    signal?.throwIfAborted()
  } finally {
    if (timer) clearInterval(timer)
    signal?.removeEventListener('abort', onAbort)
  }
  return null
}
