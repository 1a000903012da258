import test from 'ava'
import { spawnSync } from 'node:child_process'
import { readFileSync, rmSync, existsSync, mkdtempSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

import { root } from './helpers.js'

// The README's examples are run as written (the package name mapped to this checkout).
const readme = readFileSync(join(root, 'README.md'), 'utf8')

test('the README TypeScript example runs', (t) => {
  const block = /```ts\n([\s\S]*?)```/.exec(readme)?.[1]
  t.truthy(block)
  const dir = mkdtempSync(join(tmpdir(), 'distcp-readme-'))
  const file = join(dir, 'example.mjs')
  writeFileSync(file, block!.replace("from 'distcp'", `from '${join(root, 'dist/index.js')}'`))
  rmSync('/tmp/distcp-readme-hf', { recursive: true, force: true })
  const r = spawnSync('node', [file], { cwd: root, encoding: 'utf8' })
  t.is(r.status, 0, r.stderr)
  t.regex(r.stdout, /model\.model\.embed_tokens\.weight/)
  t.regex(r.stdout, /\[ 10, 64 \]/)
  t.true(existsSync('/tmp/distcp-readme-hf/model.safetensors'))
  t.true(existsSync('/tmp/distcp-readme-hf/tokenizer.json'))
})

test('the README shell commands run', (t) => {
  const block = /```sh\n([\s\S]*?)```/.exec(readme)?.[1] ?? ''
  const commands = block
    .split('\n')
    .map((l) => l.replace(/#.*$/, '').trim())
    .filter((l) => l.startsWith('npx distcp'))
  t.is(commands.length, 2)
  rmSync('/tmp/tiny-llama-hf', { recursive: true, force: true })
  for (const c of commands) {
    const args = c.split(/\s+/).slice(2)
    const r = spawnSync('node', ['bin/distcp.js', ...args], { cwd: root, encoding: 'utf8' })
    t.is(r.status, 0, `${c}\n${r.stderr}`)
  }
  t.true(existsSync('/tmp/tiny-llama-hf/model.safetensors'))
  t.regex(readFileSync('/tmp/tiny-llama-hf/config.json', 'utf8'), /"float32"/)
})
