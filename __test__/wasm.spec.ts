import test from 'ava'
import { spawn } from 'node:child_process'
import { existsSync } from 'node:fs'
import { join } from 'node:path'

import { bindingTarget, wasmForced } from '../src/native.js'
import { root } from './helpers.js'

// The WASM fallback (npm/wasm32-wasip1, built by scripts/build-wasm.sh; `npm test` builds it when missing).
// `npm test` also runs a subset of the suites through it with DISTCP_FORCE_WASM=1 (scripts/test.mjs names the
// subset): there the first test below holds that run to the WASM build.
const wasm = join(root, 'npm', 'wasm32-wasip1', 'distcp.wasm32-wasip1.wasm')

if (wasmForced()) {
  test('DISTCP_FORCE_WASM=1: this process runs the WASM build, not the native addon', (t) => {
    t.is(bindingTarget, 'wasm32-wasip1')
  })
} else {
  const example = join(root, 'examples', 'tiny-llama')

  function child(env: NodeJS.ProcessEnv): Promise<Record<string, unknown>> {
    return new Promise((resolve, reject) => {
      const p = spawn(process.execPath, ['--import', '@oxc-node/core/register', join(root, '__test__', 'wasm-child.ts'), join(example, 'dcp'), join(example, 'model')], {
        cwd: root,
        env: { ...process.env, OXC_TSCONFIG_PATH: './__test__/tsconfig.json', ...env },
      })
      let out = ''
      let err = ''
      p.stdout.on('data', (d: Buffer) => (out += d.toString()))
      p.stderr.on('data', (d: Buffer) => (err += d.toString()))
      p.on('error', reject)
      p.on('close', (code) => {
        if (code !== 0) return reject(new Error(`wasm-child exited with ${code}:\n${err}`))
        resolve(JSON.parse(out.trim().split('\n').pop() ?? '') as Record<string, unknown>)
      })
    })
  }

  test('the WASM build is there (scripts/build-wasm.sh)', (t) => {
    t.true(existsSync(wasm), `${wasm} is missing: run bash scripts/build-wasm.sh`)
  })

  test('through the WASM build, read (whole, into caller memory, a box), save, load and convert give the native bytes', async (t) => {
    const [w, n] = await Promise.all([child({ DISTCP_FORCE_WASM: '1' }), child({ DISTCP_FORCE_WASM: '' })])
    t.is(w.bindingTarget, 'wasm32-wasip1')
    t.is(n.bindingTarget, 'native')
    t.true(Object.keys(n.tensors as object).length > 10)
    t.deepEqual(w.tensors, n.tensors)
    t.deepEqual(Object.keys(w.savedFiles as object).sort(), ['.metadata', '__0_0.distcp'])
    t.deepEqual(w.savedFiles, n.savedFiles)
    t.true(w.loaded)
    t.true(n.loaded)
    t.deepEqual(Object.keys(w.converted as object).sort(), ['config.json', 'generation_config.json', 'model.safetensors'])
    t.deepEqual(w.converted, n.converted)
  })
}
