import test from 'ava'
import { spawnSync } from 'node:child_process'
import { join } from 'node:path'

import { ERROR_CODES } from '../src/index.js'
import { root } from './helpers.js'

// The typed union of codes is generated from the code that throws them: a new code without its name in
// `DistcpErrorCode` fails here (regenerate with `node scripts/error-codes.mjs --write`).
test('src/codes.ts lists every ERR_DISTCP_* code the Rust and TypeScript sources define', (t) => {
  const r = spawnSync('node', [join(root, 'scripts', 'error-codes.mjs')], { encoding: 'utf8' })
  t.is(r.status, 0, r.stderr)
  t.true(ERROR_CODES.includes('ERR_DISTCP_LOCKED'))
  t.true(ERROR_CODES.every((c) => /^ERR_DISTCP_[A-Z0-9_]+$/.test(c)))
})
