import test from 'ava'
import { spawnSync, type SpawnSyncOptions } from 'node:child_process'
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, symlinkSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { delimiter, dirname, join } from 'node:path'

import { convertDcpToHf } from '../src/index.js'
import { root } from './helpers.js'

const pkg = JSON.parse(readFileSync(join(root, 'package.json'), 'utf8')) as {
  version: string
  scripts: Record<string, string>
  optionalDependencies?: Record<string, string>
  files: string[]
}
const example = join(root, 'examples', 'tiny-llama')

// A PATH on which node, npm and npx resolve but cargo and rustc do not: what a user without Rust has.
function pathWithoutRust(dir: string): string {
  const shims = join(dir, 'shims')
  mkdirSync(shims)
  for (const tool of ['node', 'npm', 'npx']) {
    const which = spawnSync('sh', ['-c', `command -v ${tool}`], { encoding: 'utf8' }).stdout.trim()
    symlinkSync(which, join(shims, tool))
  }
  const keep = (process.env.PATH ?? '').split(delimiter).filter((d) => d && !existsSync(join(d, 'cargo')) && !existsSync(join(d, 'rustc')))
  return [shims, ...keep].join(delimiter)
}

function consumer(prefix: string): { dir: string; env: NodeJS.ProcessEnv; run: (cmd: string, args: string[], opts?: SpawnSyncOptions) => { status: number | null; stdout: string; stderr: string } } {
  const dir = mkdtempSync(join(tmpdir(), prefix))
  const env: NodeJS.ProcessEnv = { ...process.env, PATH: pathWithoutRust(dir), npm_config_audit: 'false', npm_config_fund: 'false', npm_config_update_notifier: 'false' }
  delete env.NAPI_RS_NATIVE_LIBRARY_PATH
  delete env.CARGO_TARGET_DIR
  writeFileSync(join(dir, 'package.json'), JSON.stringify({ name: 'consumer', version: '1.0.0', type: 'module' }))
  const app = join(dir, 'app')
  mkdirSync(app)
  const run = (cmd: string, args: string[], opts: SpawnSyncOptions = {}) => {
    const r = spawnSync(cmd, args, { cwd: dir, env, encoding: 'utf8', timeout: 600_000, maxBuffer: 1 << 26, ...opts })
    return { status: r.status, stdout: String(r.stdout), stderr: String(r.stderr) }
  }
  return { dir, env, run }
}

let packed: { main: string; platforms: Record<string, string> } | undefined
function packOnce(): { main: string; platforms: Record<string, string> } {
  if (!packed) {
    const dest = mkdtempSync(join(tmpdir(), 'distcp-pack-'))
    const r = spawnSync('node', [join(root, 'scripts', 'pack-local.mjs'), dest], { cwd: root, encoding: 'utf8' })
    if (r.status !== 0) throw new Error(`pack-local failed:\n${r.stderr}`)
    packed = JSON.parse(r.stdout.trim().split('\n').pop()!) as { main: string; platforms: Record<string, string> }
  }
  return packed
}

test('no install script; every npm/<platform> package is an optionalDependency at the same version', (t) => {
  for (const hook of ['preinstall', 'install', 'postinstall']) t.false(hook in pkg.scripts, hook)
  t.is(pkg.scripts.prepare, 'npm run build') // the repo's own `npm install` builds; consumers never run it
  const dirs = readdirSync(join(root, 'npm'))
  t.deepEqual(dirs, ['linux-x64-gnu', 'wasm32-wasip1']) // only what is built and tested here is claimed
  const subs = dirs.map((d) => JSON.parse(readFileSync(join(root, 'npm', d, 'package.json'), 'utf8')) as { name: string; version: string; os: string[]; cpu: string[]; libc?: string[] })
  t.deepEqual(Object.keys(pkg.optionalDependencies ?? {}).sort(), subs.map((s) => s.name).sort())
  for (const s of subs) {
    t.is(s.version, pkg.version, s.name)
    t.is(pkg.optionalDependencies?.[s.name], pkg.version, s.name)
  }
  t.deepEqual([subs[0].os, subs[0].cpu, subs[0].libc], [['linux'], ['x64'], ['glibc']])
  // the WASM fallback installs everywhere: it is what runs where no native package's os/cpu/libc match
  t.deepEqual([subs[1].name, subs[1].os, subs[1].cpu, subs[1].libc], ['distcp-wasm32-wasip1', undefined, undefined, undefined])
})

// What a user gets from the registry: the main package plus the one platform package npm picks by os/cpu/libc.
// Installed with install scripts off and no cargo on PATH, from local tarballs, offline.
test('main + platform tarballs install without cargo or scripts; import, require, inspect and convert work', async (t) => {
  const tarballs = packOnce()
  const listing = spawnSync('tar', ['tzf', tarballs.main], { encoding: 'utf8' }).stdout.split('\n')
  t.false(listing.some((f) => f.endsWith('.node')), 'the main package carries no binary')
  for (const f of ['package/index.d.ts', 'package/binding.cjs', 'package/binding.d.cts', 'package/dist/index.js', 'package/bin/distcp.js', 'package/scripts/build-native.cjs']) {
    t.true(listing.includes(f), f)
  }
  const c = consumer('distcp-consumer-')
  t.not(c.run('cargo', ['--version']).status, 0, 'cargo must not be on the consumer PATH')
  const install = c.run('npm', ['install', '--offline', '--ignore-scripts', tarballs.main, tarballs.platforms['linux-x64-gnu']])
  t.is(install.status, 0, `${install.stdout}\n${install.stderr}`)
  t.false(existsSync(join(c.dir, 'node_modules', 'distcp', 'distcp.linux-x64-gnu.node')), 'no local build in the installed package')

  const dcp = join(example, 'dcp')
  // the binary came from the platform package (the loader's require cache says which file it loaded)
  const esm = c.run('node', ['--input-type=module', '-e', `
    import { createRequire } from 'node:module'
    import * as m from 'distcp'
    const ck = await m.openCheckpoint(${JSON.stringify(dcp)})
    const loaded = Object.keys(createRequire(import.meta.url).cache).filter((f) => f.endsWith('.node'))
    console.log(JSON.stringify({ keys: ck.keys().length, loaded }))`])
  t.is(esm.status, 0, esm.stderr)
  const out = JSON.parse(esm.stdout) as { keys: number; loaded: string[] }
  t.is(out.keys, 21)
  t.deepEqual(out.loaded, [join(c.dir, 'node_modules', 'distcp-linux-x64-gnu', 'distcp.linux-x64-gnu.node')])

  const cjs = c.run('node', ['-e', `const m = require('distcp'); m.openCheckpoint(${JSON.stringify(dcp)}).then((ck) => console.log(ck.keys().length, typeof m.save, typeof m.convertDcpToHf))`])
  t.is(cjs.status, 0, cjs.stderr)
  t.is(cjs.stdout.trim(), '21 function function')

  // TypeScript consumers, ESM and CommonJS (`import x = require`), resolve the real typings through `types`/`exports`
  writeFileSync(join(c.dir, 'app', 'use.mts'), [
    "import { openCheckpoint, type Tensor } from 'distcp'",
    "const ck = await openCheckpoint('x')",
    'const t: Tensor = await ck.read(ck.keys()[0])',
    'export const rank: number = t.shape.length',
    '// @ts-expect-error: the typings are real, not any',
    'export const wrong: string = t.shape',
  ].join('\n'))
  writeFileSync(join(c.dir, 'app', 'use.cts'), [
    "import distcp = require('distcp')",
    "const p: Promise<distcp.Checkpoint> = distcp.openCheckpoint('x')",
    'export = p',
  ].join('\n'))
  const tsc = c.run('node', [join(root, 'node_modules', 'typescript', 'bin', 'tsc'), '--noEmit', '--strict', '--module', 'nodenext', '--moduleResolution', 'nodenext', '--target', 'es2022', '--skipLibCheck', join('app', 'use.mts'), join('app', 'use.cts')])
  t.is(tsc.status, 0, tsc.stdout)

  const inspect = c.run('npx', ['--offline', 'distcp', 'inspect', dcp, '--json'])
  t.is(inspect.status, 0, inspect.stderr)
  t.is((JSON.parse(inspect.stdout) as { totals: { tensors: number } }).totals.tensors, 21)

  // the installed CLI's conversion is byte for byte the checkout's own
  const hf = join(c.dir, 'hf')
  const convert = c.run('npx', ['--offline', 'distcp', 'convert', dcp, hf, '--config', join(example, 'model'), '--tokenizer', join(example, 'tokenizer')])
  t.is(convert.status, 0, convert.stderr)
  const ref = join(c.dir, 'hf-ref')
  await convertDcpToHf(dcp, ref, join(example, 'model'), join(example, 'tokenizer'))
  const files = readdirSync(ref).sort()
  t.deepEqual(readdirSync(hf).sort(), files)
  t.true(files.some((f) => f.endsWith('.safetensors')))
  for (const f of files) t.true(readFileSync(join(hf, f)).equals(readFileSync(join(ref, f))), f)
})

// Where no package fits: one message naming the platform, what was tried and how to build; then the documented
// build from source (`npx distcp build-native`, the only thing that ever runs cargo for a consumer) makes it work.
test('without a platform package: one clear message, then `npx distcp build-native` builds the addon', (t) => {
  const tarballs = packOnce()
  const c = consumer('distcp-noplatform-')
  const install = c.run('npm', ['install', '--offline', '--ignore-scripts', '--omit=optional', tarballs.main])
  t.is(install.status, 0, `${install.stdout}\n${install.stderr}`)
  t.false(existsSync(join(c.dir, 'node_modules', 'distcp-linux-x64-gnu')))
  const dcp = join(example, 'dcp')

  const cli = c.run('npx', ['--offline', 'distcp', 'inspect', dcp])
  t.is(cli.status, 1)
  t.regex(cli.stderr, /^distcp: no native binary loads on linux-x64-gnu \(Node /)
  t.regex(cli.stderr, /Cannot find module '\.\/distcp\.linux-x64-gnu\.node'/)
  t.regex(cli.stderr, /Cannot find module 'distcp-linux-x64-gnu'/)
  t.regex(cli.stderr, /distcp-wasm32-wasip1/)
  t.regex(cli.stderr, /npx distcp build-native/)
  t.regex(cli.stderr, /NAPI_RS_NATIVE_LIBRARY_PATH/)
  t.notRegex(cli.stderr, /\n\s+at /, 'no stack trace')
  t.is(cli.stderr.match(/no native binary loads/g)?.length, 1, 'one message')

  const api = c.run('node', ['-e', `import('distcp').catch((e) => { console.log(e.name); process.exit(3) })`])
  t.is(api.status, 3)
  t.is(api.stdout.trim(), 'DistcpNoBinaryError')

  // NAPI_RS_NATIVE_LIBRARY_PATH (napi-rs's convention) points the loader at a binary anywhere
  const viaEnv = c.run('node', ['-e', `require('distcp').openCheckpoint(${JSON.stringify(dcp)}).then((ck) => console.log(ck.keys().length))`], {
    env: { ...c.env, NAPI_RS_NATIVE_LIBRARY_PATH: join(root, 'distcp.linux-x64-gnu.node') },
  })
  t.is(viaEnv.status, 0, viaEnv.stderr)
  t.is(viaEnv.stdout.trim(), '21')

  const noCargo = c.run('npx', ['--offline', 'distcp', 'build-native'])
  t.is(noCargo.status, 1)
  t.regex(noCargo.stderr, /`cargo` was not found\. Install Rust/)

  // with Rust on PATH; the checkout's cargo cache keeps it to a relink of the binding
  const cargoDir = dirname(spawnSync('sh', ['-c', 'command -v cargo'], { encoding: 'utf8' }).stdout.trim())
  const build = c.run('npx', ['--offline', 'distcp', 'build-native'], {
    env: { ...c.env, PATH: `${c.env.PATH}${delimiter}${cargoDir}`, CARGO_TARGET_DIR: join(root, 'target') },
  })
  t.is(build.status, 0, `${build.stdout}\n${build.stderr}`)
  t.true(existsSync(join(c.dir, 'node_modules', 'distcp', 'distcp.linux-x64-gnu.node')))
  const after = c.run('npx', ['--offline', 'distcp', 'inspect', dcp, '--json'])
  t.is(after.status, 0, after.stderr)
  t.is((JSON.parse(after.stdout) as { totals: { tensors: number } }).totals.tensors, 21)
})

// Where no native package fits (macOS, Windows, musl, arm64 until those are built), npm installs the WASM package
// (no os/cpu/libc of its own) and the loader falls back to it. Here: the main tarball and the WASM tarball only.
test('main + WASM tarballs (no native package): import, require, inspect and convert run on the WASM fallback', (t) => {
  const tarballs = packOnce()
  const c = consumer('distcp-wasm-consumer-')
  // the WASM package's runtime (@napi-rs/wasm-runtime, @emnapi/*) comes from npm's cache: scripts/build-wasm.sh put it there
  const install = c.run('npm', ['install', '--offline', '--ignore-scripts', tarballs.main, tarballs.platforms['wasm32-wasip1']])
  t.is(install.status, 0, `${install.stdout}\n${install.stderr}`)
  t.false(existsSync(join(c.dir, 'node_modules', 'distcp-linux-x64-gnu')))
  const dcp = join(example, 'dcp')
  const esm = c.run('node', ['--input-type=module', '-e', `
    import { createRequire } from 'node:module'
    import * as m from 'distcp'
    const ck = await m.openCheckpoint(${JSON.stringify(dcp)})
    const t = await ck.read(ck.keys()[0])
    const loaded = Object.keys(createRequire(import.meta.url).cache).filter((f) => /[.]node$|wasip1[.]cjs$/.test(f))
    console.log(JSON.stringify({ keys: ck.keys().length, bytes: t.data.byteLength, loaded }))`])
  t.is(esm.status, 0, esm.stderr)
  const out = JSON.parse(esm.stdout) as { keys: number; bytes: number; loaded: string[] }
  t.is(out.keys, 21)
  t.true(out.bytes > 0)
  t.deepEqual(out.loaded, [join(c.dir, 'node_modules', 'distcp-wasm32-wasip1', 'distcp.wasip1.cjs')])
  // no warning on any Node: the Node 20/22 crash is fixed in the package's loader (npm/wasm32-wasip1/wasi-fast-api.cjs)
  t.notRegex(esm.stderr, /DISTCP_WASM_OLD_NODE|use Node 24/)

  const cjs = c.run('node', ['-e', `require('distcp').openCheckpoint(${JSON.stringify(dcp)}).then((ck) => console.log(ck.keys().length))`])
  t.is(cjs.status, 0, cjs.stderr)
  t.is(cjs.stdout.trim(), '21')

  const inspect = c.run('npx', ['--offline', 'distcp', 'inspect', dcp, '--json'])
  t.is(inspect.status, 0, inspect.stderr)
  t.is((JSON.parse(inspect.stdout) as { totals: { tensors: number } }).totals.tensors, 21)

  // the same bytes as the checkout's native conversion
  const hf = join(c.dir, 'hf')
  const convert = c.run('npx', ['--offline', 'distcp', 'convert', dcp, hf, '--config', join(example, 'model'), '--tokenizer', join(example, 'tokenizer')])
  t.is(convert.status, 0, convert.stderr)
  const ref = join(c.dir, 'hf-ref')
  const native = c.run('node', ['--input-type=module', '-e', `
    const m = await import(${JSON.stringify(join(root, 'dist', 'index.js'))})
    await m.convertDcpToHf(${JSON.stringify(dcp)}, ${JSON.stringify(ref)}, ${JSON.stringify(join(example, 'model'))}, ${JSON.stringify(join(example, 'tokenizer'))})`])
  t.is(native.status, 0, native.stderr)
  const files = readdirSync(ref).sort()
  t.deepEqual(readdirSync(hf).sort(), files)
  t.true(files.some((f) => f.endsWith('.safetensors')))
  for (const f of files) t.true(readFileSync(join(hf, f)).equals(readFileSync(join(ref, f))), f)
})

// pnpm (dependency install scripts off by default since 10), yarn 1 with --ignore-scripts and yarn 4 (Plug'n'Play,
// scripts off): each installs the main tarball with the platform tarball put in place of the registry's through
// its own override mechanism, on a PATH without cargo; ESM import, require and the CLI work, and the binary comes
// from the platform package. The package managers themselves come from the npm registry (npx caches them).
let registryOnce: string | undefined
function npmRegistry(): string {
  registryOnce ??= spawnSync('npm', ['config', 'get', 'registry'], { encoding: 'utf8' }).stdout.trim() || 'https://registry.npmjs.org/'
  return registryOnce
}
const managers = [
  { name: 'pnpm 10', pkg: 'pnpm@10.34.9', bin: 'pnpm', install: ['install'], run: ['exec'], pin: 'pnpm-workspace' },
  { name: 'yarn 1', pkg: 'yarn@1.22.22', bin: 'yarn', install: ['install', '--ignore-scripts', '--non-interactive'], run: ['run', '-s'], pin: 'resolutions' },
  { name: "yarn 4 (Plug'n'Play)", pkg: '@yarnpkg/cli-dist@4.18.1', bin: 'yarn', install: ['install'], run: [], pin: 'resolutions' },
] as const
for (const m of managers) {
  test(`${m.name} installs the tarballs without cargo or scripts; import, require and the CLI work`, (t) => {
    const tarballs = packOnce()
    const c = consumer('distcp-pm-')
    const platform = tarballs.platforms['linux-x64-gnu']
    // the WASM package too: yarn resolves every optional dependency, and this one is not on the registry yet
    const wasm = tarballs.platforms['wasm32-wasip1']
    const manifest: Record<string, unknown> = { name: 'consumer', version: '1.0.0', type: 'module', dependencies: { distcp: `file:${tarballs.main}` } }
    if (m.pin === 'resolutions') manifest.resolutions = { 'distcp-linux-x64-gnu': `file:${platform}`, 'distcp-wasm32-wasip1': `file:${wasm}` }
    else writeFileSync(join(c.dir, 'pnpm-workspace.yaml'), `overrides:\n  distcp-linux-x64-gnu: file:${platform}\n  distcp-wasm32-wasip1: file:${wasm}\n`)
    writeFileSync(join(c.dir, 'package.json'), JSON.stringify(manifest))
    if (m.pkg.startsWith('@yarnpkg')) writeFileSync(join(c.dir, 'yarn.lock'), '') // a project root of its own, not /tmp's
    // yarn 4 installs --immutable when CI is set (there is no lockfile to keep here: a consumer's first install)
    // yarn's own default registry is registry.yarnpkg.com, a host a CI that lets only npm's registry through does not
    // reach: every manager fetches from the registry npm is configured with
    const registry = npmRegistry()
    const env = {
      ...c.env,
      YARN_ENABLE_TELEMETRY: '0',
      YARN_ENABLE_SCRIPTS: '0',
      YARN_ENABLE_GLOBAL_CACHE: '0',
      YARN_ENABLE_IMMUTABLE_INSTALLS: '0',
      COREPACK_ENABLE_STRICT: '0',
      YARN_REGISTRY: registry, // yarn 1
      YARN_NPM_REGISTRY_SERVER: registry.replace(/\/$/, ''), // yarn 4
      npm_config_registry: registry, // pnpm
    }
    const pm = (args: string[]) => c.run('npx', ['--yes', '-p', m.pkg, m.bin, ...args], { env })
    const install = pm([...m.install])
    t.is(install.status, 0, `${install.stdout}\n${install.stderr}`)
    const dcp = join(example, 'dcp')
    // yarn 4 resolves through its own loader (.pnp.cjs): node runs under `yarn node` there
    const node = (args: string[]) => (m.pkg.startsWith('@yarnpkg') ? pm(['node', ...args]) : c.run('node', args))
    const esm = node(['--input-type=module', '-e', `
      import { createRequire } from 'node:module'
      import * as d from 'distcp'
      const ck = await d.openCheckpoint(${JSON.stringify(dcp)})
      const loaded = Object.keys(createRequire(import.meta.url).cache).filter((f) => f.endsWith('.node'))
      console.log(JSON.stringify({ keys: ck.keys().length, loaded }))`])
    t.is(esm.status, 0, esm.stderr)
    const out = JSON.parse(esm.stdout.trim().split('\n').pop() ?? '{}') as { keys: number; loaded: string[] }
    t.is(out.keys, 21)
    t.is(out.loaded.length, 1)
    t.true(out.loaded[0].endsWith(join('distcp-linux-x64-gnu', 'distcp.linux-x64-gnu.node')), out.loaded[0])
    t.false(out.loaded[0].startsWith(root), 'not the checkout’s binary')
    const cjs = node(['-e', `require('distcp').openCheckpoint(${JSON.stringify(dcp)}).then((ck) => console.log(ck.keys().length))`])
    t.is(cjs.status, 0, cjs.stderr)
    t.is(cjs.stdout.trim().split('\n').pop(), '21')
    const inspect = m.run.length ? pm([...m.run, 'distcp', 'inspect', dcp, '--json']) : pm(['distcp', 'inspect', dcp, '--json'])
    t.is(inspect.status, 0, inspect.stderr)
    t.is((JSON.parse(inspect.stdout.slice(inspect.stdout.indexOf('{'))) as { totals: { tensors: number } }).totals.tensors, 21)
  })
}
