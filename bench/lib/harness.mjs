// The harness every bench/*/run.mjs shares: how a contestant's process is run and timed, how rounds interleave, and
// what "median" and "per round" mean, so that the benches' tables agree on them.
//
// Why rounds interleave: this VM's disk drifts by 2× over minutes, and a cold run is moved by what ran before it
// (its write-back, the memory it freed) more than by anything distcp does: `cat` of the same evicted 1.08 GB took
// 0.56–0.61 s run back to back and 1.5–1.9 s interleaved with the others. So a round runs every contestant once,
// each round starts one contestant later (each follows each), and the steadiest ratio is "per round": the median
// over rounds of (that round's reference) / (this contestant), both measured minutes apart at most.
import { spawnSync } from 'node:child_process'
import { readFileSync } from 'node:fs'
import { join } from 'node:path'

/** The repository root: every command runs there. */
export const root = new URL('../..', import.meta.url).pathname
/** The Python with the pinned torch (`npm test` makes `.venv`); `DISTCP_PYTHON` overrides it. */
export const python = process.env.DISTCP_PYTHON ?? join(root, '.venv/bin/python')

/** Runs `cmd` in the repository root and returns spawnSync's result; throws with its stderr when it fails. */
export function run(cmd, argv, opts = {}) {
  const r = spawnSync(cmd, argv, { cwd: root, encoding: 'utf8', maxBuffer: 1 << 26, ...opts })
  if (r.status !== 0) throw new Error(`${cmd} ${argv.join(' ')} (exit ${r.status}${r.error ? `, ${r.error.message}` : ''}): ${r.stderr}`)
  return r
}

/**
 * Runs `cmd` under `/usr/bin/time -f '%e %M'` in a process of its own: `{ seconds, wallSeconds, maxRssKb, stdout }`.
 * A contestant that times itself (start-up and imports excluded) prints a JSON object with `seconds` as its last
 * line; that is then `seconds`, and the object's other fields (`bytes`, …) come along. Otherwise `seconds` is the
 * wall time of the whole process.
 */
export function timed(cmd, argv, opts = {}) {
  const r = run('/usr/bin/time', ['-f', '%e %M', cmd, ...argv], opts)
  const [wallSeconds, maxRssKb] = r.stderr.trim().split('\n').pop().split(' ').map(Number)
  let inner = {}
  try {
    const j = JSON.parse(r.stdout.trim().split('\n').pop() ?? '')
    if (j !== null && typeof j === 'object' && typeof j.seconds === 'number') inner = j
  } catch {}
  return { ...inner, seconds: inner.seconds ?? wallSeconds, wallSeconds, maxRssKb, stdout: r.stdout }
}

/** The median of `xs`; of an even count, the lower of the middle two (a median of 2 rounds is the faster one). */
export function median(xs) {
  return [...xs].sort((a, b) => a - b)[Math.floor((xs.length - 1) / 2)]
}

/** The 1-, 5- and 15-minute load averages, as the kernel writes them: a busy machine shows here. */
export function loadAverage() {
  return readFileSync('/proc/loadavg', 'utf8').split(' ').slice(0, 3).join(' ')
}

/**
 * `reps` rounds of `names`, interleaved and rotated (round k starts with contestant k): `once(name, round)` runs one
 * contestant once and returns its result (with `seconds`). Returns `{ [name]: [result of each round] }`.
 */
export function interleaved(names, reps, once) {
  const runs = Object.fromEntries(names.map((n) => [n, []]))
  for (let round = 0; round < reps; round++) {
    const k = round % names.length
    for (const name of [...names.slice(k), ...names.slice(0, k)]) runs[name].push(once(name, round))
  }
  return runs
}

/** The median over rounds of `ref[i].seconds / runs[i].seconds`: how much faster than `ref` (> 1) round by round. */
export function perRound(runs, ref) {
  return median(runs.map((r, i) => ref[i].seconds / r.seconds))
}

/** The run with the fewest seconds. */
export function best(runs) {
  return runs.reduce((a, b) => (b.seconds < a.seconds ? b : a))
}

/** Command-line flags: `flag('--reps', 3)` is the word after `--reps` (or the default), `has('--keep')` a switch,
 * `positional` the words that are neither (nor a flag's value). */
export function cli(argv = process.argv.slice(2), switches = []) {
  const isSwitch = (a) => switches.includes(a)
  const positional = argv.filter((a, i) => !a.startsWith('--') && !(i > 0 && argv[i - 1].startsWith('--') && !isSwitch(argv[i - 1])))
  return {
    flag: (name, dflt) => (argv.includes(name) ? argv[argv.indexOf(name) + 1] : dflt),
    has: (name) => argv.includes(name),
    positional,
  }
}
