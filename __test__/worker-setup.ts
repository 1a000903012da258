// Loaded into every ava worker before its test file (package.json `ava.require`).
//
// A private temporary folder: TMPDIR points at a folder of this worker's own, which every `tmpdir()` of the tests,
// and every Python or Node child they start, then uses; it is removed when the worker exits. Tests stay free to
// keep what they made for a failing assertion's message, and a run no longer leaves gigabytes in /tmp (a full disk
// failed a whole CI run once).
//
// Exit when done: AVA 6+ waits for a test file's process to exit on its own once its tests are done; a handle a
// failed test never closed (a server left listening, a child's pipe) then stalls the whole run instead of failing
// one test. When AVA is done with the file, this names what was still open and exits, so the run goes on and the
// leak is visible in the log.
import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

import test, { registerCompletionHandler } from 'ava'

const own = mkdtempSync(join(tmpdir(), 'distcp-test-'))
process.env.TMPDIR = own
process.on('exit', () => {
  try {
    rmSync(own, { recursive: true, force: true, maxRetries: 2 })
  } catch (e) {
    // a tmpfs a failed test left mounted, say: the rest is gone, and the log says what stayed
    process.stderr.write(`worker-setup: could not remove ${own} entirely: ${(e as Error).message}\n`)
  }
})

registerCompletionHandler(() => {
  // timers and the stdio pipes are always there; anything else is a test's leftover
  const left = process.getActiveResourcesInfo().filter((r) => r !== 'TTYWrap' && r !== 'PipeWrap' && r !== 'Timeout' && r !== 'Immediate')
  if (left.length > 0) process.stderr.write(`worker-setup: ${test.meta.file} left ${left.join(', ')} open\n`)
  process.exit()
})
