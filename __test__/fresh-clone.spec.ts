import test from 'ava'
import { spawnSync } from 'node:child_process'
import { chmodSync, mkdtempSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

import { root } from './helpers.js'

// A fresh clone has no .venv: `npm test` must go on to create it, not crash probing a python that is not there
// (it once died with `spawnSync .venv/bin/python ENOENT`). The python here is a stub that records its call and
// fails, so the test stops right after the probe without downloading torch.
test('npm test on a clone without .venv tries to create it instead of crashing', (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'distcp-fresh-'))
  const stub = join(dir, 'python3')
  writeFileSync(stub, `#!/bin/sh\necho "stub python called with: $*" >&2\nexit 3\n`)
  chmodSync(stub, 0o755)
  const r = spawnSync('node', [join(root, 'scripts', 'test.mjs'), '--setup-only'], {
    cwd: root,
    encoding: 'utf8',
    env: { ...process.env, DISTCP_VENV: join(dir, 'venv'), PYTHON: stub },
  })
  t.is(r.status, 1)
  t.regex(r.stderr, new RegExp(`stub python called with: -m venv ${join(dir, 'venv')}`))
  t.regex(r.stderr, /could not create .*venv/)
  t.notRegex(r.stderr, /ENOENT|\n\s+at /)
})

test('.ci/run is exactly the README commands', (t) => {
  const lines = spawnSync('grep', ['-vE', '^(#|set |cd |\\s*$)', join(root, '.ci', 'run')], { encoding: 'utf8' })
    .stdout.trim()
    .split('\n')
    .map((l) => l.replace(/#.*$/, '').trim())
  t.deepEqual(lines, ['npm install', 'npm test'])
})
