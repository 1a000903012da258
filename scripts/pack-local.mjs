#!/usr/bin/env node
// `npm run pack:local [-- DEST]`: the tarballs a release would publish, from this checkout's build, without
// publishing: the main package and one per built platform (npm/<platform>/, created by `napi create-npm-dirs`).
// What `napi artifacts` does for a native target is the copy below (the WASM build is written in place) (the built `distcp.<platform>.node` into its
// npm/<platform>/ folder); `napi pre-publish` would then publish each and pin them in optionalDependencies, which
// package.json already lists. Prints one JSON line: { main, platforms: { <platform>: tarball } }.
// Packs with --ignore-scripts: `prepare` (the developer build) must not run again for a pack of what is built.
import { spawnSync } from 'node:child_process'
import { copyFileSync, existsSync, mkdirSync, readdirSync, readFileSync, renameSync } from 'node:fs'
import { join, resolve } from 'node:path'

const root = new URL('..', import.meta.url).pathname
const dest = resolve(process.argv[2] ?? join(root, 'target', 'pack'))
mkdirSync(dest, { recursive: true })

function pack(dir) {
  const r = spawnSync('npm', ['pack', '--ignore-scripts', '--json', '--pack-destination', dest], { cwd: dir, encoding: 'utf8' })
  if (r.status !== 0) throw new Error(`npm pack in ${dir} failed:\n${r.stderr}`)
  return join(dest, JSON.parse(r.stdout)[0].filename)
}

const pkg = JSON.parse(readFileSync(join(root, 'package.json'), 'utf8'))
const platforms = {}
for (const platform of readdirSync(join(root, 'npm'))) {
  const dir = join(root, 'npm', platform)
  const sub = JSON.parse(readFileSync(join(dir, 'package.json'), 'utf8'))
  if (sub.version !== pkg.version) throw new Error(`${sub.name} is ${sub.version}, distcp is ${pkg.version}: run \`npx napi version\``)
  if (!(sub.name in (pkg.optionalDependencies ?? {}))) throw new Error(`${sub.name} is not in package.json optionalDependencies`)
  for (const file of sub.files) {
    // a native binary is built in the root; the WASM build lands in its package folder (scripts/build-wasm.sh)
    const built = join(root, file)
    if (existsSync(built)) {
      const tmp = join(dir, `${file}.tmp`)
      copyFileSync(built, tmp)
      renameSync(tmp, join(dir, file))
    } else if (!existsSync(join(dir, file))) {
      throw new Error(`${file} is not built: run \`npm run build\` (or, for wasm32-wasip1, \`bash scripts/build-wasm.sh\`)`)
    }
  }
  platforms[platform] = pack(dir)
}
if (!existsSync(join(root, 'dist', 'index.js'))) throw new Error('dist/ is not built: run `npm run build`')
console.log(JSON.stringify({ main: pack(root), platforms }))
