/**
 * torch's default save planning across ranks (`default_planner.py`, `_dedup_save_plans.py`): local plans, the
 * removal of replicated duplicates, and the merged `.metadata` contents, in torch's orders.
 */
import { DistcpError } from '../errors.js'
import { elementSize, type DType } from '../tensor.js'

/** One `WriteItem`: a tensor chunk (`tensor`: a whole tensor every rank may hold; `shard`: a rank's slice) or bytes. */
export interface WriteItem {
  fqn: string
  type: 'tensor' | 'shard' | 'bytes'
  dtype?: DType
  /** The whole tensor's shape. */
  size?: number[]
  /** Where the chunk starts in the whole tensor (`MetadataIndex.offset`). */
  offsets?: number[]
  /** The chunk's shape. */
  sizes?: number[]
}

/** A `planner_data` path: dict keys and list indices, as torch records a flat key's place in the state dict. */
export type PlannerPath = (string | number)[]

/** A rank's `SavePlan`: its items and its flattening (`planner_data`: flat key → path). */
export interface LocalPlan {
  items: WriteItem[]
  planner: [string, PlannerPath][]
}

/** `MetadataIndex` equality: fqn + offset (the index hint is not compared). */
function indexKey(i: WriteItem): string {
  return `${i.fqn}\u0000${i.offsets ? i.offsets.join(',') : '-'}`
}

/** `WriteItem.tensor_storage_size()`; bytes items count as `None` (→ 1 in dedup). */
function storageSize(i: WriteItem): number {
  if (i.type === 'bytes' || !i.sizes || !i.dtype) return 0
  return i.sizes.reduce((a, b) => a * b, 1) * (elementSize(i.dtype) as number)
}

/** What ranks holding the same item must agree on. */
function describe(i: WriteItem): string {
  return i.type === 'bytes' ? 'a non-tensor value' : `${i.type === 'shard' ? 'a slice' : 'a tensor'} ${i.dtype} [${i.sizes}] of [${i.size}]`
}

/**
 * `dedup_save_plans`: each item held by several plans stays on one — the plan with the fewest bytes assigned so far
 * (ties: the lowest rank), or always the lowest rank with `saveToLowestRank` — visiting items in first-seen order.
 */
export function dedupSavePlans(plans: WriteItem[][], saveToLowestRank = false): WriteItem[][] {
  const holders = new Map<string, number[]>()
  const item = new Map<string, WriteItem>()
  for (let p = 0; p < plans.length; p++) {
    for (const w of plans[p]) {
      const k = indexKey(w)
      const h = holders.get(k)
      const seen = item.get(k)
      // torch keeps one rank's copy without comparing: a replica that differs across ranks would be saved as
      // whichever rank the balancing picked
      if (h && seen && describe(seen) !== describe(w)) {
        throw new DistcpError(
          'ERR_DISTCP_INVALID_INPUT',
          `\`${w.fqn}\`: rank ${h[0]} saves it as ${describe(seen)}, rank ${p} as ${describe(w)}; ranks that save the same tensor must agree on it`,
        )
      }
      if (!h) holders.set(k, [p])
      else if (!h.includes(p)) h.push(p)
      item.set(k, w)
    }
  }
  const keep = plans.map((items) => new Set(items.map(indexKey)))
  const assigned = plans.map(() => 0)
  for (const [k, h] of holders) {
    // a set of small ints iterates ascending in CPython, and min keeps the first of equals
    const sorted = [...h].sort((a, b) => a - b)
    let pick = sorted[0]
    if (!saveToLowestRank) for (const p of sorted) if (assigned[p] < assigned[pick]) pick = p
    assigned[pick] += storageSize(item.get(k) as WriteItem) || 1
    for (const p of sorted) if (p !== pick) keep[p].delete(k)
  }
  return plans.map((items, p) => items.filter((w) => keep[p].has(indexKey(w))))
}

/** `.metadata`'s `state_dict_metadata` entry: `null` for bytes. */
export type ItemMeta = null | { dtype: DType; size: number[]; chunks: [number[], number[]][] }

/**
 * `create_default_global_save_plan` + the planner-data merge of `DefaultSavePlanner._create_global_plan`:
 * items in first-seen order over (rank, item), chunks in rank order; `planner_data = dict(ChainMap(*mappings))`,
 * whose key order is the last rank's mapping first, then keys only earlier ranks have, each value from the first
 * rank that has it.
 */
export function globalMetadata(finalPlans: WriteItem[][], localPlans: LocalPlan[]): { items: [string, ItemMeta][]; planner: [string, PlannerPath][] } {
  const md = new Map<string, ItemMeta>()
  for (const plan of finalPlans) {
    for (const w of plan) {
      if (w.type !== 'shard' && md.has(w.fqn)) {
        throw new DistcpError('ERR_DISTCP_INVALID_INPUT', `\`${w.fqn}\` is saved by two ranks but not as slices of one tensor (give both a globalShape and globalOffsets)`)
      }
      if (w.type === 'bytes') {
        md.set(w.fqn, null)
        continue
      }
      let t = md.get(w.fqn)
      if (!t) md.set(w.fqn, (t = { dtype: w.dtype as DType, size: w.size as number[], chunks: [] }))
      else if (t.dtype !== w.dtype || t.size.join(',') !== (w.size as number[]).join(',')) {
        throw new DistcpError('ERR_DISTCP_INVALID_INPUT', `\`${w.fqn}\`: ranks disagree on the tensor (${t.dtype} [${t.size}] vs ${w.dtype} [${w.size}])`)
      }
      t.chunks.push([w.offsets as number[], w.sizes as number[]])
    }
  }
  // torch checks that the chunks fill each tensor only for a plan of several ranks (`len(global_plan) > 1`)
  validateCoverage(md, localPlans.length > 1)
  const order = new Map<string, true>()
  for (let p = localPlans.length - 1; p >= 0; p--) for (const [k] of localPlans[p].planner) order.set(k, true)
  const planner: [string, PlannerPath][] = []
  for (const k of order.keys()) {
    const from = localPlans.find((lp) => lp.planner.some(([x]) => x === k)) as LocalPlan
    planner.push([k, (from.planner.find(([x]) => x === k) as [string, PlannerPath])[1]])
  }
  return { items: [...md.entries()], planner }
}

/** `_validate_global_plan`: chunks inside the tensor, not overlapping, and (`fill`) covering it exactly. */
function validateCoverage(md: Map<string, ItemMeta>, fill: boolean): void {
  for (const [fqn, t] of md) {
    if (!t) continue
    const total = t.size.reduce((a, b) => a * b, 1)
    let covered = 0
    for (const [i, [off, sz]] of t.chunks.entries()) {
      if (off.length !== t.size.length || off.some((o, d) => o + sz[d] > t.size[d])) {
        throw new DistcpError('ERR_DISTCP_INVALID_INPUT', `\`${fqn}\`: chunk at [${off}] of shape [${sz}] lies outside [${t.size}]`)
      }
      covered += sz.reduce((a, b) => a * b, 1)
      for (const [o2, s2] of t.chunks.slice(0, i)) {
        if (off.every((o, d) => o < o2[d] + s2[d] && o2[d] < o + sz[d]) && sz.every((s) => s > 0) && s2.every((s) => s > 0)) {
          throw new DistcpError('ERR_DISTCP_INVALID_INPUT', `\`${fqn}\`: chunks at [${o2}] and [${off}] overlap`)
        }
      }
    }
    if (fill && covered !== total) {
      throw new DistcpError('ERR_DISTCP_INVALID_INPUT', `\`${fqn}\`: the ranks' slices cover ${covered} of ${total} elements of [${t.size}]`)
    }
  }
}
