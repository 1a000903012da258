// A child process for the data-loss tests and the kill campaign (bench/kill/run.mjs): one write, then exit.
//   node --import @oxc-node/core/register __test__/data-loss-child.ts save <ckpt> <variant>
//   node --import @oxc-node/core/register __test__/data-loss-child.ts saveCheckpoint <dir> <variant>
//   node --import @oxc-node/core/register __test__/data-loss-child.ts convert <dcp> <out> <model dir>
// Prints `ok` on success; on a DistcpError prints `error <code> <message>` and exits 3. The test hooks
// DISTCP_TEST_CRASH_AT / DISTCP_TEST_PAUSE_AT come through the environment.
import { convertDcpToHf, save, saveCheckpoint, DistcpError } from '../src/index.js'
import { smallState, tinyModel } from './save-child.js'


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
