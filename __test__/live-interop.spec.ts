import test from 'ava'
import { mkdtempSync, symlinkSync } from 'node:fs'
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

// Large tensors sharded on dim 0 are read on several threads at once (each chunk owns whole rows of the result);
// the fixtures above are too small to take that path, so torch writes a Llama-shaped checkpoint with 8 MiB tensors.
test.serial('torch writes 8 MiB tensors on 2 ranks; distcp reads them on parallel threads, bit for bit', async (t) => {
  const dir = join(out, 'large-2rank')
  const shape = ['--ranks', '2', '--layers', '1', '--hidden', '1024', '--intermediate', '2048', '--vocab', '4096']
  runPython(['bench/lib/make_llama_checkpoint.py', join(dir, 'ckpt'), ...shape])
  runPython(['interop/load_with_torch.py', join(dir, 'ckpt'), join(dir, 'torch')])
  symlinkSync(join(dir, 'ckpt'), join(dir, 'torch', 'dcp_load', 'ckpt'))
  await checkFixture(t, join(dir, 'torch', 'dcp_load'))
})
