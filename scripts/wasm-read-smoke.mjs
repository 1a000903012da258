#!/usr/bin/env node
// Large reads through the WASM fallback, the load that crashed Node 20 and 22 (issue #13; root cause in
// npm/wasm32-wasip1/wasi-fast-api.cjs): ROUNDS rounds of reading every tensor of a 256 MiB checkpoint (8 float32
// tensors of 32 MiB) with DISTCP_FORCE_WASM=1, each read checked byte for byte against the pattern it was saved
// with, and the first round's results held until the end and checked again (a result must stay intact while later
// reads grow the module's memory). Each run is its own process; a crash shows as its signal.
//   node scripts/wasm-read-smoke.mjs [--node PATH]... [--runs N] [--rounds N]
// Without --node it runs the Node it is started with. Needs `npm run build` (the checkpoint is written once, under
// target/tmp/wasm-read-smoke, by whichever build loads) and `bash scripts/build-wasm.sh`. Prints one line per run
// and exits non-zero when any run failed.
import { spawnSync } from 'node:child_process'
import { existsSync, mkdirSync } from 'node:fs'
import { join } from 'node:path'
import { parseArgs } from 'node:util'

const root = new URL('..', import.meta.url).pathname
const { values } = parseArgs({
  options: {
    node: { type: 'string', multiple: true },
    runs: { type: 'string', default: '3' },
    rounds: { type: 'string', default: '4' },
    child: { type: 'string' },
  },
})
const dist = join(root, 'dist', 'index.js')
const TENSORS = 8
const BYTES = 32 << 20
// the byte at j of tensor i: cheap to write and to check, and different in every tensor and every 4 KiB page
const byteAt = (i, j) => (i * 31 + j + (j >>> 12) * 7) & 255

if (values.child) {
  // the child: read, check, hold, check again
  const m = await import(dist)
  const { bindingTarget } = await import(join(root, 'dist', 'native.js'))
  if (bindingTarget !== 'wasm32-wasip1') throw new Error(`expected the WASM build, ${bindingTarget} loaded`)
  const ck = await m.openCheckpoint(values.child)
  const check = (i, data, when) => {
    if (data.byteLength !== BYTES) throw new Error(`${when}: tensor ${i} has ${data.byteLength} bytes, not ${BYTES}`)
    for (let j = 0; j < BYTES; j += 509) {
      if (data[j] !== byteAt(i, j)) throw new Error(`${when}: tensor ${i} byte ${j} is ${data[j]}, not ${byteAt(i, j)}`)
    }
  }
  const held = []
  const rounds = Number(values.rounds)
  for (let r = 0; r < rounds; r++) {
    for (let i = 0; i < TENSORS; i++) {
      const t = await ck.read(`w.${i}`)
      check(i, t.data, `round ${r}`)
      if (r === 0) held.push(t.data)
    }
  }
  held.forEach((data, i) => check(i, data, 'held'))
  ck.close()
  console.log(JSON.stringify({ node: process.versions.node, readMiB: (rounds * TENSORS * BYTES) >> 20 }))
  process.exit(0)
}

const ck = join(root, 'target', 'tmp', 'wasm-read-smoke')
if (!existsSync(join(ck, '.metadata'))) {
  mkdirSync(join(root, 'target', 'tmp'), { recursive: true })
  const make = `const m = await import(${JSON.stringify(dist)}); const sd = {}
    const byteAt = ${byteAt.toString()}
    for (let i = 0; i < ${TENSORS}; i++) { const data = new Uint8Array(${BYTES}); for (let j = 0; j < data.length; j++) data[j] = byteAt(i, j)
      sd['w.' + i] = { dtype: 'float32', shape: [${BYTES / 4}], data } }
    await m.save(sd, { checkpointId: ${JSON.stringify(ck)} })`
  const r = spawnSync(process.execPath, ['--input-type=module', '-e', make], { stdio: 'inherit' })
  if (r.status !== 0) {
    console.error('wasm-read-smoke: could not write the checkpoint')
    process.exit(1)
  }
}

let failed = 0
for (const node of values.node ?? [process.execPath]) {
  for (let run = 0; run < Number(values.runs); run++) {
    const started = Date.now()
    const r = spawnSync(node, ['--no-warnings', new URL(import.meta.url).pathname, '--child', ck, '--rounds', values.rounds], {
      encoding: 'utf8',
      env: { ...process.env, DISTCP_FORCE_WASM: '1' },
    })
    const ok = r.status === 0
    if (!ok) failed++
    const what = ok ? r.stdout.trim().split('\n').pop() : `FAILED (${r.signal ?? `exit ${r.status}`}): ${(r.stderr || r.stdout).trim().split('\n').slice(-3).join(' | ')}`
    console.log(`wasm-read-smoke: ${node} run ${run + 1}: ${what} in ${((Date.now() - started) / 1000).toFixed(1)} s`)
  }
}
process.exit(failed ? 1 : 0)
