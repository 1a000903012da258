#!/usr/bin/env node
// The WASM fallback against the native addon on one machine: import('distcp') time, reading every tensor of a
// 256 MiB checkpoint (8 float32 tensors of 32 MiB, warm page cache) and converting it to safetensors. Best of N,
// each build in its own process (DISTCP_FORCE_WASM=1 picks the WASM build). Needs `npm run build` and
// `bash scripts/build-wasm.sh`.
//   node bench/wasm/run.mjs [RUNS]
import { spawnSync } from 'node:child_process'
import { existsSync, mkdirSync, rmSync } from 'node:fs'
import { join } from 'node:path'

const root = new URL('../..', import.meta.url).pathname
const out = join(root, 'bench', 'out', 'wasm')
const runs = Number(process.argv[2] ?? 3)
const ck = join(out, 'ck')
const dist = JSON.stringify(join(root, 'dist', 'index.js'))

if (!existsSync(join(ck, '.metadata'))) {
  mkdirSync(out, { recursive: true })
  const make = `const m = await import(${dist}); const sd = {}
    for (let i = 0; i < 8; i++) { const data = new Uint8Array(32 << 20); for (let j = 0; j < data.length; j += 4096) data[j] = (i * 31 + j) & 255
      sd['model.layers.' + i + '.mlp.weight'] = { dtype: 'float32', shape: [2048, 4096], data } }
    await m.save(sd, { checkpointId: ${JSON.stringify(ck)} })`
  const r = spawnSync(process.execPath, ['--input-type=module', '-e', make], { stdio: 'inherit' })
  if (r.status !== 0) process.exit(1)
}

const one = (hf) => `const t0 = performance.now(); const m = await import(${dist}); const t1 = performance.now()
  const ck = await m.openCheckpoint(${JSON.stringify(ck)}); for (const k of ck.keys()) await ck.read(k); const t2 = performance.now(); ck.close()
  await m.convertDcpToHf(${JSON.stringify(ck)}, ${JSON.stringify(hf)}, ${JSON.stringify(join(root, 'examples', 'tiny-llama', 'model'))}, undefined, { onWarning: () => {} })
  console.log(JSON.stringify({ importMs: t1 - t0, readS: (t2 - t1) / 1000, convertS: (performance.now() - t2) / 1000 }))`

const best = {}
for (const build of ['native', 'wasm']) {
  for (let i = 0; i < runs; i++) {
    const hf = join(out, `hf-${build}`)
    rmSync(hf, { recursive: true, force: true })
    const r = spawnSync(process.execPath, ['--no-warnings', '--input-type=module', '-e', one(hf)], {
      encoding: 'utf8',
      env: { ...process.env, DISTCP_FORCE_WASM: build === 'wasm' ? '1' : '' },
    })
    if (r.status !== 0) throw new Error(`${build} run failed (${r.status ?? r.signal}):\n${r.stderr}`)
    const m = JSON.parse(r.stdout.trim().split('\n').pop())
    const b = (best[build] ??= { importMs: Infinity, readS: Infinity, convertS: Infinity })
    for (const k of Object.keys(b)) b[k] = Math.min(b[k], m[k])
  }
}
const f = (x, d) => x.toFixed(d)
console.log(`node ${process.versions.node}, best of ${runs}: import native ${f(best.native.importMs, 0)} ms, wasm ${f(best.wasm.importMs, 0)} ms; ` +
  `read 256 MiB native ${f(best.native.readS, 3)} s, wasm ${f(best.wasm.readS, 3)} s (${f(best.wasm.readS / best.native.readS, 2)}x); ` +
  `convert native ${f(best.native.convertS, 3)} s, wasm ${f(best.wasm.convertS, 3)} s (${f(best.wasm.convertS / best.native.convertS, 2)}x)`)
