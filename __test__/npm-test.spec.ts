// `npm test`'s step runner (scripts/step.mjs): a step that hangs must end as a named failure with everything it
// started killed, not stall CI until its time limit with nothing printed (what happened to session 7's last commit).
import test from 'ava'
import { existsSync, mkdtempSync, readFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

// @ts-expect-error: a plain .mjs script without types
import { runStep } from '../scripts/step.mjs'

type StepResult = { status: number | null; signal: string | null; timedOut: boolean; seconds: number; stdout: string; stderr: string }
const step = runStep as (label: string, cmd: string, args: string[], o: { minutes: number; echo?: boolean }) => Promise<StepResult>

/** Whether `pid` still runs: a zombie (killed, not yet reaped by an init that may never reap it) does not. */
function alive(pid: number): boolean {
  try {
    return !/^\d+ \(.*\) Z/.test(readFileSync(`/proc/${pid}/stat`, 'utf8'))
  } catch {
    return false
  }
}

test('a step that ends: its exit status and its output, both streams, kept apart', async (t) => {
  const r = await step('ends', 'bash', ['-c', 'echo out; echo err >&2; exit 3'], { minutes: 1, echo: false })
  t.like(r, { status: 3, timedOut: false, stdout: 'out\n', stderr: 'err\n' })
})

test('a step that hangs is killed at its limit with the children it started, and its output so far is kept', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'distcp-step-'))
  const pidfile = join(dir, 'pid')
  // a background child that would outlive its parent, then a parent that never ends
  const r = await step('hangs', 'bash', ['-c', `sleep 300 & echo $! > ${pidfile}; echo started; sleep 300`], { minutes: 0.03, echo: false })
  t.true(r.timedOut)
  t.is(r.signal, 'SIGKILL')
  t.is(r.stdout, 'started\n')
  t.true(r.seconds < 30, `${r.seconds} s`)
  t.true(existsSync(pidfile))
  const child = Number(readFileSync(pidfile, 'utf8'))
  // SIGKILL is delivered at once, but the reaping of an orphan by init may lag a moment
  for (let i = 0; i < 50 && alive(child); i++) await new Promise((r) => setTimeout(r, 100))
  t.false(alive(child), `the background sleep (pid ${child}) outlived the step`)
})

test('a step that ends leaves no child of its own running', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'distcp-step-'))
  const pidfile = join(dir, 'pid')
  const r = await step('orphans', 'bash', ['-c', `sleep 300 > /dev/null 2>&1 & echo $! > ${pidfile}`], { minutes: 1, echo: false })
  t.like(r, { status: 0, timedOut: false })
  const child = Number(readFileSync(pidfile, 'utf8'))
  for (let i = 0; i < 50 && alive(child); i++) await new Promise((r) => setTimeout(r, 100))
  t.false(alive(child), `the orphaned sleep (pid ${child}) outlived the step`)
})
