// One Node rank of the multi-rank conversion tests (__test__/distributed-convert.spec.ts), launched by torchrun
// --no-python (or directly with RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT set):
//   node --import @oxc-node/core/register __test__/distributed-convert.ts <dcp> <out> <model> <report prefix> <max shard> [dtype]
// DISTCP_TEST_CONVERT_FAIL=<rank>: that rank aborts at its first progress report (a failure in the middle of the
// write, with staged bytes on disk; with these small tensors, after its share is written and before rank 0 commits).
// DISTCP_TEST_CONVERT_KILL=<rank>: that rank kills itself (SIGKILL, as kill -9) at the same point, leaving what it
// wrote (and, on rank 0, the staged folder and the lock) for the others and the next run to deal with.
// Writes <report prefix>.<rank>.json: `{ ok: progress }` or the error.
import { writeFileSync } from 'node:fs'

import { convertDcpToHf, initProcessGroup, type ConvertOptions } from '../src/index.js'

const [dcp, out, model, report, maxShard, dtype] = process.argv.slice(2)
const pg = await initProcessGroup({ timeoutMs: Number(process.env.DISTCP_TEST_TIMEOUT_MS ?? '60000') })
const failing = process.env.DISTCP_TEST_CONVERT_FAIL === String(pg.rank)
const dying = process.env.DISTCP_TEST_CONVERT_KILL === String(pg.rank)
const ac = new AbortController()
const progress: { tensorsDone: number; tensorsTotal: number; bytesDone: number; bytesTotal: number }[] = []
let result: unknown
try {
  await convertDcpToHf(dcp, out, model, undefined, {
    processGroup: pg,
    maxShardSize: Number(maxShard),
    dtype: (dtype || undefined) as ConvertOptions['dtype'],
    overwrite: true,
    signal: ac.signal,
    onWarning: () => undefined,
    onProgress: (p) => {
      progress.push(p)
      if (failing) ac.abort(new Error(`injected failure on rank ${pg.rank}`))
      if (dying) process.kill(process.pid, 'SIGKILL')
    },
  })
  result = { ok: progress }
} catch (e) {
  const err = e as Error & { code?: string; failures?: Record<string, string> }
  result = { err: { code: err.code, message: err.message, failures: err.failures } }
}
writeFileSync(`${report}.${pg.rank}.json`, JSON.stringify(result))
await pg.destroy()
