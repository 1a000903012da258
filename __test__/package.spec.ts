import test from 'ava'
import { spawnSync } from 'node:child_process'
import { mkdtempSync, writeFileSync, existsSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

import { root } from './helpers.js'

// What a user gets from npm when no prebuilt binary fits: the packed package builds its addon with cargo in its
// install script (no napi CLI, no Python), then the API and the CLI work.
test('the packed package installs from source and works', (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'distcp-consumer-'))
  const pack = spawnSync('npm', ['pack', '--pack-destination', dir], { cwd: root, encoding: 'utf8' })
  t.is(pack.status, 0, pack.stderr)
  const tgz = pack.stdout.trim().split('\n').pop()!
  writeFileSync(join(dir, 'package.json'), JSON.stringify({ name: 'consumer', version: '1.0.0', type: 'module' }))
  // share the checkout's cargo target folder so the build reuses compiled dependencies
  const env = { ...process.env, CARGO_TARGET_DIR: join(root, 'target'), npm_config_audit: 'false', npm_config_fund: 'false' }
  const install = spawnSync('npm', ['install', '--offline', join(dir, tgz)], { cwd: dir, encoding: 'utf8', env, timeout: 600_000 })
  t.is(install.status, 0, `${install.stdout}\n${install.stderr}`)
  t.true(existsSync(join(dir, 'node_modules', 'distcp', 'distcp.linux-x64-gnu.node')))
  const example = join(root, 'examples', 'tiny-llama', 'dcp')
  const use = spawnSync('node', ['-e', `import('distcp').then(async (m) => { const ck = await m.openCheckpoint(${JSON.stringify(example)}); console.log(ck.keys().length) })`], { cwd: dir, encoding: 'utf8' })
  t.is(use.status, 0, use.stderr)
  t.is(use.stdout.trim(), '21')
  // CommonJS consumers (Node ≥ 20.19 can require an ES module): `exports` must offer a `require` condition
  const cjs = spawnSync('node', ['-e', `const m = require('distcp'); m.openCheckpoint(${JSON.stringify(example)}).then((ck) => console.log(ck.keys().length, typeof m.save))`], { cwd: dir, encoding: 'utf8' })
  t.is(cjs.status, 0, cjs.stderr)
  t.is(cjs.stdout.trim(), '21 function')
  const cli = spawnSync('npx', ['distcp', 'inspect', example, '--json'], { cwd: dir, encoding: 'utf8' })
  t.is(cli.status, 0, cli.stderr)
  t.is(JSON.parse(cli.stdout).totals.tensors, 21)
})
