// Which torch versions load what distcp's writer saves: saves a few state dicts with `save`, loads each with every
// given Python's torch (interop/load_with_torch.py: dcp.load and dcp_to_torch_save), compares what torch sees with
// what was saved, bit for bit, and prints a Markdown table (docs/compatibility.md).
//
//   node --import @oxc-node/core/register interop/compat_matrix.ts <python> [<python> ...]
import { spawnSync } from 'node:child_process'
import { mkdtempSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

import { save, type DType, type SaveStateDict } from '../src/index.js'
import { diffTyped, loadExpected } from '../__test__/helpers.js'
import { DTYPES, fullState, smallState, tensor, toExact } from '../__test__/save-child.js'

/** dtypes torch 2.3 cannot load (float8_e8m0fnu arrived in ≈2.7, uint16/32/64 serialization in ≈2.4). */
const NEWER: DType[] = ['float8_e8m0fnu', 'uint16', 'uint32', 'uint64']
const OLD_DTYPES = DTYPES.filter((d) => !NEWER.includes(d))

interface Variant {
  name: string
  layout: '2.4' | '2.3'
  state: () => SaveStateDict
}

const variants: Variant[] = [
  { name: 'everything (all 21 dtypes, every value kind), layout 2.4', layout: '2.4', state: () => fullState() },
  { name: 'everything, layout 2.3', layout: '2.3', state: () => fullState() },
  { name: 'everything but the 4 newer dtypes, layout 2.4', layout: '2.4', state: () => fullState(OLD_DTYPES) },
  { name: 'everything but the 4 newer dtypes, layout 2.3', layout: '2.3', state: () => fullState(OLD_DTYPES) },
  { name: 'training state (model, Adam state, param_groups), layout 2.4', layout: '2.4', state: () => smallState(1) },
  { name: 'training state, layout 2.3', layout: '2.3', state: () => smallState(1) },
  {
    name: 'uint16, uint32, uint64 tensors only',
    layout: '2.4',
    state: () => ({ u16: tensor('uint16', [2, 3]), u32: tensor('uint32', [3]), u64: tensor('uint64', [2]) }),
  },
  {
    name: 'tensors and scalars only (keys identical in both layouts)',
    layout: '2.4',
    state: () => ({ model: { w: tensor('bfloat16', [4, 4]), b: tensor('float32', [4]) }, step: 7, lr: 0.5 }),
  },
]

const pythons = process.argv.slice(2)
if (pythons.length === 0) {
  console.error('usage: node --import @oxc-node/core/register interop/compat_matrix.ts <python> [<python> ...]')
  process.exit(2)
}
const root = new URL('..', import.meta.url).pathname
const out = mkdtempSync(join(tmpdir(), 'distcp-compat-'))

const versions: string[] = []
const rows: string[][] = variants.map((v) => [v.name])
for (const [vi, v] of variants.entries()) {
  const ckpt = join(out, `v${vi}`)
  const sd = v.state()
  const saved = await save(sd, { checkpointId: ckpt, layout: v.layout })
  for (const [pi, py] of pythons.entries()) {
    const dir = join(out, `v${vi}-p${pi}`)
    const r = spawnSync(py, ['interop/load_with_torch.py', ckpt, dir], { cwd: root, encoding: 'utf8', maxBuffer: 1 << 26 })
    if (r.status !== 0) throw new Error(`${py} failed: ${r.stderr}`)
    const summary = JSON.parse(r.stdout.trim().split('\n').at(-1)!) as { torch_version: string; methods: Record<string, string> }
    versions[pi] = summary.torch_version.split('+')[0]
    const cells: string[] = []
    for (const [method, status] of Object.entries(summary.methods)) {
      if (status !== 'ok') {
        cells.push(`${method}: **fails** (${status.replace(/\|/g, '\\|').slice(0, 120)})`)
        continue
      }
      const { expected, bytes } = loadExpected(join(dir, method))
      const errors: string[] = []
      const keys = [...Object.keys(expected.tensors), ...Object.keys(expected.objects)].sort()
      if (JSON.stringify(keys) !== JSON.stringify([...saved.keys].sort())) errors.push('key sets differ')
      diffTyped(toExact(sd, v.layout), expected.tree, bytes, 'saved', errors)
      cells.push(errors.length === 0 ? `${method}: ok, bit-exact` : `${method}: loads, **differs** (${errors[0]})`)
    }
    rows[vi][pi + 1] = cells.join('<br>')
  }
}

const head = ['saved with distcp', ...versions.map((v) => `torch ${v}`)]
console.log(`| ${head.join(' | ')} |`)
console.log(`|${head.map(() => '---').join('|')}|`)
for (const r of rows) console.log(`| ${r.join(' | ')} |`)
