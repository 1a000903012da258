// A child process for the data-loss tests and the kill campaign (bench/kill/run.mjs): one write, then exit.
//   node --import @oxc-node/core/register __test__/data-loss-child.ts save <ckpt> <variant>
//   node --import @oxc-node/core/register __test__/data-loss-child.ts saveCheckpoint <dir> <variant>
//   node --import @oxc-node/core/register __test__/data-loss-child.ts convert <dcp> <out> <model dir>
// Prints `ok` on success; on a DistcpError prints `error <code> <message>` and exits 3. The test hooks
// DISTCP_TEST_CRASH_AT / DISTCP_TEST_PAUSE_AT come through the environment.
import { convertDcpToHf, save, saveCheckpoint, DistcpError, type Model } from '../src/index.js'
import { smallState } from './save-child.js'

/** A one-parameter model whose values depend on `variant` (a reader can tell which save it sees). */
export function tinyModel(variant: number): Model {
  const w = { dtype: 'float32' as const, shape: [2, 2], data: new Uint8Array(new Float32Array([variant, variant + 1, variant + 2, variant + 3]).buffer) }
  return {
    namedParameters: () => [['w', w]],
    stateDict: () => ({ w }),
    loadStateDict: () => undefined,
  }
}

const [mode, a, b, c] = process.argv.slice(2)
try {
  if (mode === 'save') await save(smallState(Number(b)), { checkpointId: a })
  else if (mode === 'saveCheckpoint') await saveCheckpoint(tinyModel(Number(b)), a)
  else if (mode === 'convert') await convertDcpToHf(a, b, c, undefined, { overwrite: true, onWarning: () => undefined })
  else throw new Error(`unknown mode ${mode}`)
  console.log('ok')
} catch (e) {
  if (!(e instanceof DistcpError)) throw e
  console.log(`error ${e.code} ${e.message}`)
  process.exitCode = 3
}
