// A writer for the kill campaign: writes again and again into one folder until it is killed.
// usage: node bench/kill/worker.mjs save|saveCheckpoint <dir> | convert <out> <dcp1> <dcp2> <model dir>
// Every write has its own variant v (all of its values are v), so a reader can tell a mix from a whole.
import { convertDcpToHf, save, saveCheckpoint } from '../../dist/index.js'

export const ELEMS = 64 * 1024

export function filled(v) {
  return { dtype: 'float32', shape: [ELEMS], data: new Uint8Array(new Float32Array(ELEMS).fill(v).buffer) }
}

export function model(v) {
  const w = filled(v)
  return { namedParameters: () => [['w', w]], stateDict: () => ({ w }), loadStateDict: () => undefined }
}

if (import.meta.url === `file://${process.argv[1]}`) {
  const [mode, dir, ...rest] = process.argv.slice(2)
  process.stdout.write('ready\n')
  for (let v = 2 + Math.floor(Math.random() * 1000); ; v++) {
    if (mode === 'save') await save({ model: { w: filled(v), b: filled(v) }, step: v }, { checkpointId: dir })
    else if (mode === 'saveCheckpoint') await saveCheckpoint(model(v), dir)
    else await convertDcpToHf(rest[v % 2], dir, rest[2], undefined, { overwrite: true, onWarning: () => undefined })
  }
}
