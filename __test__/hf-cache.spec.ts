import test from 'ava'
import { mkdirSync, mkdtempSync, readFileSync, symlinkSync, writeFileSync, readdirSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

import { resolveModel, saveTokenizer } from '../src/index.js'
import { root } from './helpers.js'

// A hub cache laid out as huggingface_hub writes it: refs/main → snapshots/<commit>/ whose files link to blobs/.
const cache = mkdtempSync(join(tmpdir(), 'distcp-hub-cache-'))
const commit = 'a'.repeat(40)
const repo = join(cache, 'models--acme--tiny')
const source = join(root, 'examples', 'tiny-llama')
mkdirSync(join(repo, 'refs'), { recursive: true })
mkdirSync(join(repo, 'blobs'))
mkdirSync(join(repo, 'snapshots', commit), { recursive: true })
writeFileSync(join(repo, 'refs', 'main'), commit + '\n')
for (const [dir, file] of [
  ['model', 'config.json'],
  ['tokenizer', 'tokenizer.json'],
  ['tokenizer', 'tokenizer_config.json'],
]) {
  const blob = join(repo, 'blobs', file.replace('.', '-') + '-etag')
  writeFileSync(blob, readFileSync(join(source, dir, file)))
  symlinkSync(join('..', '..', 'blobs', file.replace('.', '-') + '-etag'), join(repo, 'snapshots', commit, file))
}
process.env.HF_HUB_CACHE = cache

test('a hub name resolves offline to its snapshot, by ref or by commit; an unknown one says where it looked', (t) => {
  const byRef = resolveModel('acme/tiny')
  t.deepEqual(byRef, { dir: join(repo, 'snapshots', commit), source: 'cache', snapshot: commit })
  t.deepEqual(resolveModel(`acme/tiny@${commit}`), byRef)
  const missing = resolveModel('acme/other')
  t.true('looked' in missing && missing.looked.some((p) => p.includes('models--acme--other')))
  t.deepEqual(resolveModel(join(source, 'model')), { dir: join(source, 'model'), source: 'local' })
})

test('saveTokenizer copies a cached hub tokenizer verbatim', async (t) => {
  const out = join(mkdtempSync(join(tmpdir(), 'distcp-tok-')), 'tokenizer')
  await saveTokenizer('acme/tiny', out)
  t.deepEqual(readdirSync(out).sort(), ['tokenizer.json', 'tokenizer_config.json'])
  t.deepEqual(readFileSync(join(out, 'tokenizer.json')), readFileSync(join(source, 'tokenizer', 'tokenizer.json')))
})
