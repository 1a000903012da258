import test from 'ava'
import { spawnSync } from 'node:child_process'
import { join } from 'node:path'

import { root } from './helpers.js'

// The API reference (`npm run docs:api` → docs/api/) is generated from the TSDoc of the public surface; typedoc.json
// treats every warning as an error (a public function that names a type the package does not export, a broken
// {@link}), so this check is what keeps the reference whole.
test('typedoc builds the API reference from src/index.ts without a warning', (t) => {
  const r = spawnSync('node', [join(root, 'node_modules', 'typedoc', 'bin', 'typedoc'), '--emit', 'none'], { cwd: root, encoding: 'utf8', timeout: 170_000 })
  t.is(r.status, 0, `${r.stdout}\n${r.stderr}`)
  t.notRegex(r.stdout, /\[warning\]|\[error\]/)
})
