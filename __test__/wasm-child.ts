// Run by wasm.spec.ts, once with DISTCP_FORCE_WASM=1 and once without: which build loaded, a digest of every
// tensor of a checkpoint (whole, into caller memory, and a box), what a save of those tensors wrote, and the bytes
// of a conversion of it, as one JSON line. The spec compares the two runs (the native one is held to torch's bytes
// by the other suites).
import { createHash } from 'node:crypto'
import { mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

import { convertDcpToHf, openCheckpoint, save, load, type LoadStateDict, type Tensor } from '../src/index.js'
import { bindingTarget } from '../src/native.js'

const [input, model] = process.argv.slice(2)
const digest = (b: Uint8Array) => createHash('sha256').update(b).digest('hex')

const ck = await openCheckpoint(input)
const tensors: Record<string, string> = {}
const state: Record<string, Tensor> = {}
for (const key of ck.keys()) {
  const info = ck.info(key)
  if (info.kind !== 'tensor') continue
  const whole = await ck.read(key)
  const into = new Uint8Array(whole.data.byteLength)
  await ck.read(key, { into })
  const box =
    info.shape.length > 0 && info.shape.every((n) => n > 1)
      ? digest((await ck.read(key, { offsets: info.shape.map(() => 1), sizes: info.shape.map((n) => n - 1) })).data)
      : null
  tensors[key] = `${digest(whole.data)} ${digest(into)} ${box}`
  state[key.replaceAll('.', '_')] = whole
}
ck.close()

const work = mkdtempSync(join(tmpdir(), 'distcp-wasm-child-'))
try {
  const saved = join(work, 'saved')
  await save({ ...state, step: 7 }, { checkpointId: saved })
  const back: LoadStateDict = { step: 0 }
  for (const [k, t] of Object.entries(state)) back[k] = { dtype: t.dtype, shape: t.shape, data: new Uint8Array(t.data.byteLength) }
  await load(back, { checkpointId: saved })
  const loaded = Object.entries(state).every(([k, t]) => digest((back[k] as Tensor).data) === digest(t.data)) && back.step === 7
  const savedFiles = Object.fromEntries(readdirSync(saved).map((f) => [f, digest(readFileSync(join(saved, f)))]))

  const hf = join(work, 'hf')
  await convertDcpToHf(input, hf, model, undefined, { onWarning: () => undefined })
  const converted = Object.fromEntries(readdirSync(hf).map((f) => [f, digest(readFileSync(join(hf, f)))]))
  console.log(JSON.stringify({ bindingTarget, tensors, savedFiles, loaded, converted }))
} finally {
  rmSync(work, { recursive: true, force: true })
}
