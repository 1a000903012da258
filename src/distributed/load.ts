/**
 * `dcp.load` across ranks: every rank reads `.metadata` itself and reads its own slices (box reads, so a checkpoint
 * written by N ranks loads on M); then the ranks exchange their status (torch's `all_gather("read")`), so that a
 * failure on any rank fails every rank with the same {@link CheckpointError}. A checkpoint saved without collectives
 * has no `.metadata`: each rank reads its own `__{rank}.metadata`, as torch's loader falls back to it.
 */
import type { InternalLoadOptions, LoadOptions, LoadReport, LoadStateDict } from '../load.js'

/** @internal called by `load` when `options.processGroup` is set; `loadOne` is the single-process `load`. */
export async function loadRanks(
  stateDict: LoadStateDict,
  options: LoadOptions,
  loadOne: (sd: LoadStateDict, o: LoadOptions) => Promise<LoadReport>,
): Promise<LoadReport> {
  const pg = options.processGroup
  if (!pg) return loadOne(stateDict, options)
  return pg.allReduce(
    'read',
    () => loadOne(stateDict, { ...options, processGroup: undefined, rank: pg.rank } as InternalLoadOptions),
    (all) => all,
  ).then((all) => all[pg.rank])
}
