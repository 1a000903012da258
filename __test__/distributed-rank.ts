// One Node rank of the multi-rank tests (__test__/distributed.spec.ts), launched by torchrun --no-python or directly
// with RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT set:
//   node --import @oxc-node/core/register __test__/distributed-rank.ts <save|save-local|save-async|load> <ckpt> <report prefix> [base]
// The state is the one interop/multirank_torch.py builds (same formulas): row- and column-sharded tensors (torch's
// Shard(0)/Shard(1) chunking), a replicated tensor, optimizer state and plain values. `base` shifts every value, so
// two saves differ. `save-local` saves without collectives (torch's use_collectives=False), `save-async` with
// saveAsync (the report also says whether `staged` resolved). Writes
// <report prefix>.<rank>.json: the save result, the loaded values, or the error.
import { writeFileSync } from 'node:fs'

import { closeAsyncSaves, initProcessGroup, load, save, saveAsync, type DType, type LoadStateDict } from '../src/index.js'

const [mode, ckpt, report, baseArg] = process.argv.slice(2)
const base = Number(baseArg ?? '0')

/** torch.chunk's split of `n` into `world` pieces: ceil-sized chunks, the last ones possibly smaller or empty. */
function chunk(n: number, world: number, rank: number): [number, number] {
  const size = Math.ceil(n / world)
  const start = Math.min(n, size * rank)
  return [start, Math.min(n, start + size) - start]
}

/** The slice [rows r0..r0+nr) × [cols c0..c0+nc) of a row-major f32 matrix whose element i is f(i). */
function slice(shape: [number, number], rows: [number, number], cols: [number, number], f: (i: number) => number, fill: boolean) {
  const [r0, nr] = rows
  const [c0, nc] = cols
  const data = new Float32Array(nr * nc)
  if (fill) for (let r = 0; r < nr; r++) for (let c = 0; c < nc; c++) data[r * nc + c] = f((r0 + r) * shape[1] + c0 + c)
  return { dtype: 'float32' as DType, shape: [nr, nc], data, globalShape: [...shape], globalOffsets: [r0, c0] }
}

function state(rank: number, world: number, fill: boolean) {
  const rows = chunk(6, world, rank)
  const cols = chunk(6, world, rank)
  const b = new Float32Array(4)
  if (fill) for (let i = 0; i < 4; i++) b[i] = base + 100 + i
  return {
    model: {
      w: slice([6, 4], rows, [0, 4], (i) => base + i * 0.5, fill),
      col: slice([3, 6], [0, 3], cols, (i) => base + 1000 + i, fill),
      b: { dtype: 'float32' as DType, shape: [4], data: b },
    },
    optim: {
      state: { 'model.w': { exp_avg: slice([6, 4], rows, [0, 4], (i) => base + i * 0.25, fill) } },
      param_groups: [{ lr: 0.125, params: ['model.w'] }],
    },
    step: fill ? 7 + base : 0,
  }
}

const timeoutMs = Number(process.env.DISTCP_TEST_TIMEOUT_MS ?? '20000')
const pg = await initProcessGroup({ timeoutMs })
let out: unknown
let staged: boolean | undefined
try {
  if (mode === 'save-async') {
    const s = saveAsync(state(pg.rank, pg.worldSize, true), { checkpointId: ckpt, processGroup: pg })
    staged = await s.staged.then(
      () => true,
      () => false,
    )
    try {
      out = { ok: await s.committed, staged }
    } finally {
      await closeAsyncSaves()
    }
  } else if (mode === 'save' || mode === 'save-local') {
    const r = await save(state(pg.rank, pg.worldSize, true), { checkpointId: ckpt, processGroup: pg, useCollectives: mode === 'save' })
    out = { ok: r }
  } else {
    const sd = state(pg.rank, pg.worldSize, false)
    await load(sd as unknown as LoadStateDict, { checkpointId: ckpt, processGroup: pg })
    out = {
      ok: {
        w: [...sd.model.w.data],
        col: [...sd.model.col.data],
        b: [...sd.model.b.data],
        expAvg: [...sd.optim.state['model.w'].exp_avg.data],
        step: sd.step,
        // a loaded float is a PyFloat (exact Python types)
        lr: Number((sd.optim.param_groups[0].lr as unknown as { value?: number }).value ?? sd.optim.param_groups[0].lr),
      },
      expected: (() => {
        const e = state(pg.rank, pg.worldSize, true)
        return { w: [...e.model.w.data], col: [...e.model.col.data], b: [...e.model.b.data], expAvg: [...e.optim.state['model.w'].exp_avg.data], step: e.step, lr: 0.125 }
      })(),
    }
  }
} catch (e) {
  const err = e as Error & { code?: string; failures?: Record<string, string> }
  out = { err: { code: err.code, message: err.message, failures: err.failures }, staged }
}
writeFileSync(`${report}.${pg.rank}.json`, JSON.stringify(out))
await pg.destroy()
