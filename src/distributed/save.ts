/**
 * `dcp.save` across Node ranks (torch's `_save_state_dict` with its `_DistWrapper`): every rank plans its items;
 * `reduce_scatter("plan")` — rank 0 gathers the plans, removes replicated duplicates, takes the folder lock and
 * names every rank's file, sends each rank its final plan; each rank writes its data file; `all_reduce("write")` —
 * rank 0 gathers the write results and, only when every rank succeeded, writes `.metadata` last. Any failure makes
 * every rank reject with the same {@link CheckpointError} naming the failed ranks, and no `.metadata` is written.
 *
 * Without collectives (`useCollectives: false`, torch's `use_collectives=False`) each rank plans, writes and
 * commits alone: `__{rank}_0.distcp` and its own `__{rank}.metadata` (all its items, replicated ones included;
 * its chunks of a sharded tensor), under the folder lock held shared and its rank's lock held exclusively.
 */
import { stat } from 'node:fs/promises'
import { join } from 'node:path'
import { deviceLeavesOf } from '../cuda.js'
import { stagingPool, type Staged, type StagingLease, type StagingPool } from '../staging.js'
import { awaitNative, callNative, DistcpError } from '../errors.js'
import { flattenEncoded } from '../load.js'
import { native, type StorageEntry, type TaggedValue } from '../native.js'
import { Encoder, topLevel, type SaveResult, type SaveStateDict } from '../save.js'
import type { DType } from '../tensor.js'
import type { ProcessGroup } from './group.js'
import { dedupSavePlans, globalMetadata, type LocalPlan, type WriteItem } from './plan.js'

/** A rank's slice of a tensor: its own bytes (`shape` is the slice's) and where they sit in the whole tensor. */
export interface ShardedTensor {
  dtype: DType
  shape: number[]
  data: ArrayBufferView
  /** The whole tensor's shape (DTensor's `size()`, `CheckpointableTensor`'s global shape). */
  globalShape: number[]
  /** Where this slice starts in the whole tensor, per dimension. */
  globalOffsets: number[]
}

/** What a multi-rank save reports on every rank. */
export interface RanksSaveResult extends SaveResult {
  rank: number
  worldSize: number
}

/** @internal */
export interface RanksSaveOptions {
  checkpointId: string
  processGroup: ProcessGroup
  layout?: '2.4' | '2.3'
  /** torch's `dedup_save_to_lowest_rank`. */
  saveToLowestRank?: boolean
  /** `false`: torch's `use_collectives=False` (see the module docs). */
  useCollectives?: boolean
  /** Write the data file at a lower CPU priority (`saveAsync`). */
  background?: boolean
}

function isInt(n: unknown): n is number {
  return typeof n === 'number' && Number.isSafeInteger(n) && n >= 0
}

/** The slice description of a tensor leaf, checked; `null` for a plain (replicated) tensor. */
export function shardOf(v: unknown, key: string, checkpointId: string): { globalShape: number[]; globalOffsets: number[] } | null {
  const t = v as Partial<ShardedTensor>
  if (t.globalShape === undefined && t.globalOffsets === undefined) return null
  const shape = t.shape as number[]
  const bad = (why: string): never => {
    throw new DistcpError('ERR_DISTCP_INVALID_INPUT', `${checkpointId}: key \`${key}\`: ${why}`)
  }
  if (!Array.isArray(t.globalShape) || !Array.isArray(t.globalOffsets)) bad('a slice needs both globalShape and globalOffsets')
  const gs = t.globalShape as number[]
  const go = t.globalOffsets as number[]
  if (gs.length !== shape.length || go.length !== shape.length) {
    bad(`globalShape [${gs}] and globalOffsets [${go}] must have one entry per dimension of the slice's shape [${shape}]`)
  }
  if (![...gs, ...go].every(isInt)) bad('globalShape and globalOffsets must hold non-negative integers')
  shape.forEach((s, d) => {
    if (go[d] + s > gs[d]) bad(`the slice [${go}] + [${shape}] lies outside the whole tensor [${gs}]`)
  })
  return { globalShape: gs, globalOffsets: go }
}

/**
 * A rank's part of a multi-rank save, staged: its plan made and its tensor bytes copied into staging memory (the
 * caller's buffers are free from here on). `write()` then coordinates with the other ranks, writes and commits.
 * A staging failure does not throw: `error` holds it and `write()` reports it to every rank (torch's failure
 * model: all ranks reject with the same error), so that the other ranks do not wait for a rank that gave up.
 * @internal
 */
export interface StagedRanks {
  checkpointId: string
  lease: StagingLease | null
  error?: unknown
  write(): Promise<RanksSaveResult>
}

/** Stages this rank's part of a multi-rank save (see {@link StagedRanks}); `saveAsync` calls it in the call. @internal */
export async function stageRanks(stateDict: SaveStateDict, options: RanksSaveOptions, pool: StagingPool = stagingPool): Promise<StagedRanks> {
  const { checkpointId, layout = '2.4' } = options
  let staged: Staged | null = null
  try {
    // awaited only when there is something to wait for, so that a host-only state dict is copied in the call, as
    // in a single-rank save
    const t = topLevel(stateDict, checkpointId)
    const top = t instanceof Promise ? await t : t
    // device tensors are encoded and staged as in a single-rank save (device-to-host into the staging memory)
    const enc = new Encoder(checkpointId, false, deviceLeavesOf(top))
    const tree = enc.value(top, '', 0)
    // the save owns copies of the tensor bytes from here on (as a single-rank save does): the caller's buffers may
    // change or be transferred away while the ranks coordinate and write
    const s = pool.stage(enc.buffers)
    staged = s instanceof Promise ? await s : s
    // one flattening: keys, planner paths and which leaves are tensors from the core, the leaves themselves by position
    const flat = flattenEncoded(top, tree, enc.buffers.length, layout)
    const items: WriteItem[] = []
    for (const f of flat) {
      if (!f.tensor) {
        items.push({ fqn: f.key, type: 'bytes' })
        continue
      }
      const t = f.value as ShardedTensor
      const shard = shardOf(t, f.key, checkpointId)
      items.push({
        fqn: f.key,
        type: shard ? 'shard' : 'tensor',
        dtype: t.dtype,
        size: shard ? shard.globalShape : [...t.shape],
        offsets: shard ? shard.globalOffsets : t.shape.map(() => 0),
        sizes: [...t.shape],
      })
    }
    const plan: LocalPlan = { items, planner: flat.map((f) => [f.key, f.plannerPath]) }
    const copies = staged.copies
    const lease = staged.lease
    return { checkpointId, lease, write: () => writeRanks(options, { plan, tree, copies }).finally(() => lease.release()) }
  } catch (error) {
    staged?.lease.release()
    return { checkpointId, lease: null, error, write: () => writeRanks(options, { error }) }
  }
}

/** Saves one checkpoint together with the other ranks of `processGroup`; see the module docs. */
export async function saveRanks(stateDict: SaveStateDict, options: RanksSaveOptions): Promise<RanksSaveResult> {
  return (await stageRanks(stateDict, options)).write()
}

/** One item of a rank's final plan: its flat key and, for a tensor, its chunk's offsets (`null`: a bytes item). */
type PlanItem = [string, number[] | null]

/** This rank's staged part (its local plan, the tagged tree and the staged bytes), or why staging failed. */
type RankLocal = { plan: LocalPlan; tree: TaggedValue; copies: Uint8Array[] } | { error: unknown }

/** This rank's save without collectives: its own data file and `__{rank}.metadata`, no other rank involved. */
async function writeRankLocal(options: RanksSaveOptions, local: RankLocal): Promise<RanksSaveResult> {
  const { checkpointId, processGroup: pg, layout = '2.4', background = false } = options
  if ('error' in local) throw local.error
  const { plan, tree, copies } = local
  // torch's `global_step([local_plan])`: one plan, nothing to dedup, its chunks need not cover a sharded tensor
  const md = globalMetadata([plan.items], [plan])
  const handle = callNative(() => native.RanksSaveHandle.beginRankLocal(checkpointId, pg.rank))
  let committed = false
  try {
    const [file] = callNative(() => handle.fileNames(1))
    const items = plan.items.map((w): PlanItem => [w.fqn, w.type === 'bytes' ? null : (w.offsets ?? null)])
    const storage = await awaitNative(() => native.writeRankDataFile(checkpointId, file, tree, copies, items, layout, background))
    const metadataBytes = await awaitNative(() => handle.commit({ items: md.items, planner: md.planner, storage, version: '1.0.0' }))
    committed = true
    const tensors = md.items.filter(([, m]) => m).length
    return {
      keys: md.items.map(([k]) => k),
      tensors,
      objects: md.items.length - tensors,
      dataFile: file.replace(/\.distcp\.[0-9a-z]+\.tmp$/, '.distcp'),
      dataBytes: storage.reduce((n, e) => Math.max(n, e.offset + e.length), 0),
      metadataBytes,
      replaced: callNative(() => handle.replacing()),
      rank: pg.rank,
      worldSize: pg.worldSize,
    }
  } finally {
    if (!committed) handle.abort()
    handle.release()
  }
}

/**
 * Before `.metadata` names them: every rank's data file is in rank 0's folder, as long as its entries need. A rank
 * given another checkpointId (or a folder not shared with rank 0) writes its file elsewhere and reports success.
 */
async function ranksFilesHere(checkpointId: string, all: { storage: StorageEntry[] }[]): Promise<void> {
  for (const [r, w] of all.entries()) {
    const need = new Map<string, number>()
    for (const e of w.storage) need.set(e.relativePath, Math.max(need.get(e.relativePath) ?? 0, e.offset + e.length))
    for (const [file, bytes] of need) {
      const size = await stat(join(checkpointId, file)).then((s) => s.size, () => -1)
      if (size < bytes) {
        throw new DistcpError(
          'ERR_DISTCP_INVALID_INPUT',
          `rank ${r} wrote \`${file}\` (${bytes} bytes), which ${size < 0 ? 'is not' : `has only ${size} bytes`} in ${checkpointId}: do all ranks save to the same checkpointId, on a folder they share?`,
        )
      }
    }
  }
}

/** The coordinated part of a multi-rank save, from this rank's staged part. */
async function writeRanks(options: RanksSaveOptions, local: RankLocal): Promise<RanksSaveResult> {
  if (options.useCollectives === false) return writeRankLocal(options, local)
  const { checkpointId, processGroup: pg, layout = '2.4', saveToLowestRank = false, background = false } = options
  const { plan, tree, copies } = 'error' in local ? { plan: null, tree: null, copies: [] } : local
  let handle: InstanceType<typeof native.RanksSaveHandle> | null = null
  let merged: ReturnType<typeof globalMetadata> | null = null
  let committed = false
  try {
    const mine = await pg.reduceScatter(
      'plan',
      async () => {
        if ('error' in local) throw local.error
        return plan as LocalPlan
      },
      (plans: LocalPlan[]) => {
      const finals = dedupSavePlans(plans.map((p) => p.items), saveToLowestRank)
      merged = globalMetadata(finals, plans)
      handle = native.RanksSaveHandle.begin(checkpointId, pg.worldSize)
      const files = handle.fileNames(pg.worldSize)
      return finals.map((items, r) => ({
        file: files[r],
        replacing: (handle as InstanceType<typeof native.RanksSaveHandle>).replacing(),
        items: items.map((w): PlanItem => [w.fqn, w.type === 'bytes' ? null : (w.offsets ?? null)]),
        tensors: items.filter((w) => w.type !== 'bytes').length,
      }))
    })
    // the storage entries travel to rank 0 through the store (the wire format between ranks, JSON)
    type Written = { storage: StorageEntry[] }
    const summary = await pg.allReduce(
      'write',
      async (): Promise<Written> => {
        // test hook: `write:<rank>` kills this rank (kill -9) after the plan, while the others write
        if (process.env.DISTCP_TEST_KILL_AT === `write:${pg.rank}`) process.kill(process.pid, 'SIGKILL')
        return { storage: await native.writeRankDataFile(checkpointId, mine.file, tree, copies, mine.items, layout, background) }
      },
      async (all: Written[]) => {
        const md = merged as ReturnType<typeof globalMetadata>
        const h = handle as InstanceType<typeof native.RanksSaveHandle>
        await ranksFilesHere(checkpointId, all)
        const storage = all.flatMap((w) => w.storage)
        const metadataBytes = await h.commit({ items: md.items, planner: md.planner, storage, version: '1.0.0' })
        committed = true
        const bytes = all.map((w) => w.storage.reduce((n, e) => Math.max(n, e.offset + e.length), 0))
        return { keys: md.items.map(([k]) => k), tensors: md.items.filter(([, m]) => m).length, metadataBytes, bytes }
      },
    )
    const fin = mine.file.replace(/\.distcp\.[0-9a-z]+\.tmp$/, '.distcp')
    return {
      keys: summary.keys,
      tensors: summary.tensors,
      objects: summary.keys.length - summary.tensors,
      dataFile: fin,
      dataBytes: summary.bytes[pg.rank],
      metadataBytes: summary.metadataBytes,
      replaced: mine.replacing,
      rank: pg.rank,
      worldSize: pg.worldSize,
    }
  } finally {
    const h = handle as InstanceType<typeof native.RanksSaveHandle> | null
    if (h) {
      if (!committed) h.abort()
      h.release()
    }
  }
}
