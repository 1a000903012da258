// Hugging Face conventions: offline resolution of a hub name through the local cache, and the files of a model
// folder that a conversion copies (config, generation config, tokenizer).
import { existsSync, readFileSync, statSync } from 'node:fs'
import { homedir } from 'node:os'
import { join } from 'node:path'
import { DistcpError } from './errors.js'

/** The hub cache folder, as huggingface_hub finds it. */
export function hubCacheDir(env: NodeJS.ProcessEnv = process.env): string {
  if (env.HF_HUB_CACHE) return env.HF_HUB_CACHE
  if (env.HUGGINGFACE_HUB_CACHE) return env.HUGGINGFACE_HUB_CACHE
  const home = env.HF_HOME ?? join(env.XDG_CACHE_HOME ?? join(homedir(), '.cache'), 'huggingface')
  return join(home, 'hub')
}

export interface Resolved {
  dir: string
  /** Where it came from: a local folder, or the hub cache (then `snapshot` is the commit). */
  source: 'local' | 'cache'
  snapshot?: string
}

const isDir = (p: string) => existsSync(p) && statSync(p).isDirectory()

/**
 * A local folder, or `org/name` (optionally `org/name@revision`) resolved offline in the hub cache:
 * `models--org--name/refs/<revision>` → `snapshots/<commit>/`. Returns null and the places it looked otherwise.
 */
export function resolveModel(nameOrPath: string): Resolved | { looked: string[] } {
  if (typeof nameOrPath !== 'string') {
    throw new DistcpError('ERR_DISTCP_BAD_REQUEST', `a model must be named by a folder path or a hub name, not ${typeof nameOrPath}`)
  }
  if (isDir(nameOrPath)) return { dir: nameOrPath, source: 'local' }
  const looked = [nameOrPath]
  const [name, revision = 'main'] = nameOrPath.split('@')
  if (!/^[\w.-]+(\/[\w.-]+)?$/.test(name)) return { looked }
  const repo = join(hubCacheDir(), `models--${name.replace('/', '--')}`)
  let commit = revision
  if (!/^[0-9a-f]{40}$/.test(revision)) {
    const ref = join(repo, 'refs', revision)
    looked.push(ref)
    if (!existsSync(ref)) return { looked }
    commit = readFileSync(ref, 'utf8').trim()
  }
  const dir = join(repo, 'snapshots', commit)
  looked.push(dir)
  return isDir(dir) ? { dir, source: 'cache', snapshot: commit } : { looked }
}

/** Tokenizer files `save_pretrained` may write (the set varies by class and version); copied verbatim. */
export const TOKENIZER_FILES = [
  'tokenizer.json',
  'tokenizer_config.json',
  'special_tokens_map.json',
  'added_tokens.json',
  'vocab.json',
  'merges.txt',
  'vocab.txt',
  'tokenizer.model',
  'spiece.model',
  'sentencepiece.bpe.model',
  'chat_template.jinja',
  'chat_template.json',
  'processor_config.json',
  'preprocessor_config.json',
]

/** Sub-folders of tokenizer files (named chat templates). */
export const TOKENIZER_DIRS = ['additional_chat_templates']
