// Loaded into every ava worker (package.json `ava.require`). AVA 6+ waits for a test file's process to exit on its
// own once its tests are done; a handle a failed test never closed (a server left listening, a child's pipe) then
// stalls the whole run instead of failing one test. When AVA is done with the file, this names what was still open
// and exits, so the run goes on and the leak is visible in the log.
import test, { registerCompletionHandler } from 'ava'

registerCompletionHandler(() => {
  // timers and the stdio pipes are always there; anything else is a test's leftover
  const left = process.getActiveResourcesInfo().filter((r) => r !== 'TTYWrap' && r !== 'PipeWrap' && r !== 'Timeout' && r !== 'Immediate')
  if (left.length > 0) process.stderr.write(`exit-when-done: ${test.meta.file} left ${left.join(', ')} open\n`)
  process.exit()
})
