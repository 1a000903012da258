#!/usr/bin/env node
// `npm install` hook. In a checkout (dev dependencies present): build the native addon with napi (which also
// regenerates index.cjs / index.d.cts) and the TypeScript. In an installed package: use the prebuilt binary if
// one loads, otherwise build the addon from source with cargo. Never runs Python or pip.
'use strict'
const { spawnSync } = require('node:child_process')
const fs = require('node:fs')
const path = require('node:path')

const root = path.join(__dirname, '..')
const run = (cmd, args) => {
  console.log(`distcp: ${cmd} ${args.join(' ')}`)
  const r = spawnSync(cmd, args, { cwd: root, stdio: 'inherit', shell: process.platform === 'win32' })
  if (r.error) throw r.error
  if (r.status !== 0) process.exit(r.status ?? 1)
}

if (process.env.DISTCP_SKIP_BUILD) process.exit(0)

const napiCli = path.join(root, 'node_modules', '@napi-rs', 'cli', 'package.json')
const isCheckout = fs.existsSync(napiCli) && fs.existsSync(path.join(root, 'tsconfig.json'))

if (isCheckout) {
  run('npx', ['napi', 'build', '--platform', '--release', '--manifest-path', 'crates/distcp-node/Cargo.toml',
    '-o', '.', '--js', 'index.cjs', '--dts', 'index.d.cts', '--', '--locked'])
  run('npx', ['tsc', '-p', 'tsconfig.json'])
  process.exit(0)
}

try {
  require(path.join(root, 'index.cjs'))
  process.exit(0) // a prebuilt binary fits this platform
} catch (e) {
  console.log(`distcp: no prebuilt binary for ${process.platform}-${process.arch} (${e.message.split('\n')[0]}); building from source`)
}

const cargo = spawnSync('cargo', ['--version'], { encoding: 'utf8' })
if (cargo.status !== 0) {
  console.error('distcp: no prebuilt binary fits this platform and `cargo` was not found. Install Rust (https://rustup.rs) and reinstall.')
  process.exit(1)
}
run('cargo', ['build', '--release', '--locked', '-p', 'distcp-node'])
const lib = { linux: 'libdistcp_node.so', darwin: 'libdistcp_node.dylib', win32: 'distcp_node.dll' }[process.platform]
const abi = process.platform === 'linux' ? (process.report?.getReport?.().header?.glibcVersionRuntime ? '-gnu' : '-musl')
  : process.platform === 'win32' ? '-msvc' : ''
const target = path.join(root, `distcp.${process.platform}-${process.arch}${abi}.node`)
// cargo honours CARGO_TARGET_DIR (users often set it globally), so look where it built
const targetDir = process.env.CARGO_TARGET_DIR ? path.resolve(root, process.env.CARGO_TARGET_DIR) : path.join(root, 'target')
fs.copyFileSync(path.join(targetDir, 'release', lib), target)
require(path.join(root, 'index.cjs'))
console.log(`distcp: built ${path.basename(target)}`)
