import test from 'ava'
import { existsSync, readdirSync } from 'node:fs'
import { join } from 'node:path'

import { checkFixture, root } from './helpers.js'

// Every checkpoint real torch wrote under fixtures/ (several torch versions, 1–4 ranks; see fixtures/README.md),
// read through the Node API and compared bit for bit with what torch exported beside it.
const base = join(root, 'fixtures')
const dirs = existsSync(base)
  ? readdirSync(base)
      .filter((v) => v.startsWith('torch-'))
      .flatMap((v) => readdirSync(join(base, v)).map((f) => join(base, v, f)))
      .filter((d) => existsSync(join(d, 'expected.json')))
  : []

test('fixtures from at least three torch versions are present', (t) => {
  const versions = new Set(dirs.map((d) => d.split('/').at(-2)))
  t.true(versions.size >= 3, `found ${[...versions].join(', ')}`)
})

for (const dir of dirs) {
  test(`reads ${dir.split('/').slice(-2).join('/')} exactly as torch wrote it`, async (t) => {
    await checkFixture(t, dir)
  })
}
