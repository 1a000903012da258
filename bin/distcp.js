#!/usr/bin/env node
// `build-native` must work where the addon does not load yet, so it is handled before the CLI (which loads it).
if (process.argv[2] === 'build-native') {
  const { createRequire } = await import('node:module')
  const { main } = createRequire(import.meta.url)('../scripts/build-native.cjs')
  process.exitCode = main()
} else {
  try {
    const { main } = await import('../dist/cli.js')
    process.exitCode = await main(process.argv.slice(2))
  } catch (e) {
    // no binary fits this platform: the message says what was tried and what to do; a stack would only hide it
    if (e instanceof Error && e.name === 'DistcpNoBinaryError') {
      console.error(e.message)
      process.exitCode = 1
    } else {
      throw e
    }
  }
}
