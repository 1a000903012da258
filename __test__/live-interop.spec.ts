import test from 'ava'
import { mkdtempSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

import { checkFixture, runPython } from './helpers.js'

// torch (the pinned version in .venv) writes fresh random checkpoints during the test run — 1 rank with every dtype,
// and 2 ranks (gloo) with sharded DTensors — and distcp must read exactly what torch exported beside them.
const seed = String(Math.floor(Math.random() * 1_000_000))
const out = mkdtempSync(join(tmpdir(), 'distcp-live-'))

for (const name of ['dtypes', 'dtensor-2rank']) {
  test.serial(`torch writes ${name} now (seed ${seed}); distcp reads it bit for bit`, async (t) => {
    runPython(['interop/make_fixtures.py', '--out', out, '--only', name, '--seed', seed])
    await checkFixture(t, join(out, name))
  })
}
