import test from 'ava'
import { existsSync } from 'node:fs'
import { join } from 'node:path'

import { openCheckpoint, type StateValue } from '../src/index.js'
import { root, runPython } from './helpers.js'

// `paths()` and `readAll()` receive the core's planner paths and nesting as napi values (no JSON between the
// binding and TS); both must give exactly what torch makes of the same `.metadata` (interop/planner_tree.py runs
// torch's own `unflatten_state_dict`). The optimizer fixtures have list indices in their paths (`param_groups`, 0,
// …), the dtypes fixtures lists of four items, so the rebuilt lists' order counts too.

type TorchNode = null | { leaf: string } | { dict: [string, TorchNode][] } | { list: TorchNode[] }

const fixtures = ['torch-2.15.0', 'torch-2.7.1', 'torch-2.3.1']
  .flatMap((v) => ['seed-optim', 'dtypes', 'fsdp2-2rank'].map((f) => `${v}/${f}`))
  .filter((name) => name.startsWith('torch-2.15.0') || !name.endsWith('fsdp2-2rank'))

for (const name of fixtures) {
  const dir = join(root, 'fixtures', name, 'ckpt')
  test(`${name}: paths() and readAll() are torch's planner_data and unflatten_state_dict`, async (t) => {
    t.true(existsSync(dir), `${dir} is present`)
    const torch = JSON.parse(runPython(['interop/planner_tree.py', dir])) as {
      paths: [string, (string | number)[]][]
      tree: TorchNode
    }
    const ck = await openCheckpoint(dir)
    try {
      t.deepEqual([...ck.paths()], torch.paths, 'paths(), in key order')
      // torch 2.3 saved optimizer param_groups as one value, not item by item
      if (name !== 'torch-2.3.1/seed-optim') {
        t.true(
          torch.paths.some(([, p]) => p.some((e) => typeof e === 'number')),
          'the fixture has list indices in its planner paths',
        )
      }
      const leaf = async (key: string): Promise<StateValue> =>
        ck.info(key).kind === 'tensor' ? await ck.read(key) : await ck.readObject(key)
      const expected = async (n: TorchNode): Promise<StateValue> => {
        if (n === null) return null
        if ('leaf' in n) return leaf(n.leaf)
        if ('list' in n) return Promise.all(n.list.map(expected))
        const entries: [string, StateValue][] = []
        for (const [k, c] of n.dict) entries.push([k, await expected(c)])
        return Object.fromEntries(entries)
      }
      const all = await ck.readAll()
      t.deepEqual(all, await expected(torch.tree), 'readAll()')
    } finally {
      ck.close()
    }
  })
}
