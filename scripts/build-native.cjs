#!/usr/bin/env node
// `npx distcp build-native`: build the native addon from the Rust sources shipped in the package, for a platform
// that has no prebuilt package (or to replace one). Never runs by itself: distcp has no install script. Needs Rust
// (cargo) and nothing else: no napi CLI, no Python. The result is `distcp.<platform>.node` in the package root,
// which is the "local build" the loader (binding.cjs) tries before the per-platform package.
'use strict'
const { spawnSync } = require('node:child_process')
const fs = require('node:fs')
const path = require('node:path')

const root = path.join(__dirname, '..')

// The file name the generated napi loader looks for: `<binaryName>.<platform>-<arch>[-<abi>].node`.
function localBinaryName() {
  let abi = ''
  if (process.platform === 'linux') {
    const report = process.report && process.report.getReport ? process.report.getReport() : null
    abi = report && report.header && report.header.glibcVersionRuntime ? '-gnu' : '-musl'
  } else if (process.platform === 'win32') {
    abi = '-msvc'
  }
  return `distcp.${process.platform}-${process.arch}${abi}.node`
}

function main() {
  const cargo = spawnSync('cargo', ['--version'], { encoding: 'utf8' })
  if (cargo.error || cargo.status !== 0) {
    console.error('distcp build-native: `cargo` was not found. Install Rust (https://rustup.rs), then run `npx distcp build-native` again.')
    return 1
  }
  // an explicit --target, as `napi build` passes, so a checkout's `npm run build` and this share one cargo cache
  const host = /^host: (\S+)$/m.exec(spawnSync('rustc', ['-vV'], { encoding: 'utf8' }).stdout ?? '')?.[1]
  const targetArgs = host ? ['--target', host] : []
  console.log(`distcp build-native: ${cargo.stdout.trim()}; cargo build --release --locked -p distcp-node ${targetArgs.join(' ')} (a few minutes)`)
  const r = spawnSync('cargo', ['build', '--release', '--locked', '-p', 'distcp-node', ...targetArgs], {
    cwd: root,
    stdio: 'inherit',
    shell: process.platform === 'win32',
  })
  if (r.error) throw r.error
  if (r.status !== 0) return r.status ?? 1
  const lib = { linux: 'libdistcp_node.so', darwin: 'libdistcp_node.dylib', win32: 'distcp_node.dll' }[process.platform] ?? 'libdistcp_node.so'
  // cargo honours CARGO_TARGET_DIR (often set globally), so look where it built
  const targetDir = process.env.CARGO_TARGET_DIR ? path.resolve(root, process.env.CARGO_TARGET_DIR) : path.join(root, 'target')
  const target = path.join(root, localBinaryName())
  // copy then rename: a process that already loaded the old file keeps its mapping, and a reader never sees half a file
  const tmp = `${target}.${process.pid}.tmp`
  fs.copyFileSync(path.join(targetDir, ...(host ? [host] : []), 'release', lib), tmp)
  fs.renameSync(tmp, target)
  require(path.join(root, 'binding.cjs'))
  console.log(`distcp build-native: built ${target}`)
  return 0
}

if (require.main === module) process.exitCode = main()
module.exports = { main, localBinaryName }
