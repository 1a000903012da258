// One step of `npm test` (scripts/test.mjs), run so that a hang cannot stall CI. Tested by __test__/npm-test.spec.ts.
import { spawn } from 'node:child_process'

/**
 * Runs `cmd args` in its own process group, its output passed through as it comes (a CI log shows how far a step
 * got, even one that never ends) and kept for counting. A step that runs past `minutes` is killed with its whole
 * group (ava's workers, the Python and Node children of tests), so a hang is a named failure with minutes to spare
 * rather than CI's time limit with nothing printed. The group is killed when the step's process exits too: an
 * orphaned child of a test must not outlive it (nor hold its output pipes open).
 *
 * @returns {Promise<{ status: number | null, signal: string | null, error?: Error, timedOut: boolean, seconds: number, stdout: string, stderr: string }>}
 */
export function runStep(label, cmd, args, { minutes, env = process.env, cwd = process.cwd(), echo = true }) {
  const started = Date.now()
  return new Promise((resolve) => {
    const child = spawn(cmd, args, { cwd, env, detached: true, stdio: ['ignore', 'pipe', 'pipe'] })
    const out = []
    const err = []
    child.stdout.on('data', (b) => {
      out.push(b)
      if (echo) process.stdout.write(b)
    })
    child.stderr.on('data', (b) => {
      err.push(b)
      if (echo) process.stderr.write(b)
    })
    let timedOut = false
    const killGroup = () => {
      try {
        process.kill(-child.pid, 'SIGKILL')
      } catch {
        // already gone
      }
    }
    let grace
    const timer = setTimeout(() => {
      timedOut = true
      process.stderr.write(`\nnpm test: ${label} ran past ${minutes} min; killing it and everything it started\n`)
      killGroup()
      // a process that left the group (setsid) may still hold the pipes open: the step ends anyway
      grace = setTimeout(() => {
        child.stdout.destroy()
        child.stderr.destroy()
        finish(null, 'SIGKILL')
      }, 10_000)
    }, minutes * 60_000)
    let done = false
    const finish = (status, signal, error) => {
      if (done) return
      done = true
      clearTimeout(timer)
      clearTimeout(grace)
      const stdout = Buffer.concat(out).toString('utf8')
      const stderr = Buffer.concat(err).toString('utf8')
      resolve({ status, signal, error, timedOut, seconds: (Date.now() - started) / 1000, stdout, stderr })
    }
    child.on('error', (e) => finish(null, null, e))
    // the step's own process is done: what it left running in its group goes too (and with it the pipes it held)
    child.on('exit', () => killGroup())
    child.on('close', (status, signal) => finish(status, signal))
  })
}
