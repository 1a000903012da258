// bench/read/boxes: per-read overhead on small and repeated reads, where resolving a chunk's record (zip central
// directory, data.pkl, zstd) once per open checkpoint matters more than bandwidth.
// usage: node bench/read/boxes.mjs [dir]   (checkpoints generated with real torch on first run)
import { spawnSync } from 'node:child_process'
import { existsSync } from 'node:fs'
import { join } from 'node:path'
import { openCheckpoint } from '../../dist/index.js'

const root = new URL('../..', import.meta.url).pathname
const python = process.env.DISTCP_PYTHON ?? join(root, '.venv/bin/python')
const dir = process.argv[2] ?? join(root, 'bench/data/boxes')
if (!existsSync(join(dir, 'zstd', '.metadata'))) {
  const r = spawnSync(python, ['bench/read/make_box_checkpoint.py', dir], { cwd: root, encoding: 'utf8' })
  if (r.status !== 0) throw new Error(r.stderr)
}

async function time(name, reps, f) {
  await f() // warm page cache and code
  let best = Infinity
  for (let i = 0; i < reps; i++) {
    const t0 = performance.now()
    await f()
    best = Math.min(best, performance.now() - t0)
  }
  console.log(`${name.padEnd(44)} ${best.toFixed(2).padStart(9)} ms (best of ${reps})`)
}

for (const kind of ['plain', 'zstd']) {
  const ck = await openCheckpoint(join(dir, kind))
  await time(`${kind}: whole 64 MiB tensor`, 5, () => ck.read('w'))
  await time(`${kind}: 4 one-row boxes`, 5, async () => {
    for (let r = 0; r < 4; r++) await ck.read('w', { offsets: [r, 0], sizes: [1, 4096] })
  })
  const n = kind === 'zstd' ? 100 : 1000
  await time(`${kind}: ${n} one-row boxes`, 3, async () => {
    for (let r = 0; r < n; r++) await ck.read('w', { offsets: [r, 0], sizes: [1, 4096] })
  })
  ck.close()
}
