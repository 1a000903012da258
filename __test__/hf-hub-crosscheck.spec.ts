import test from 'ava'
import { parseSafetensorsMetadata } from '@huggingface/hub'
import { existsSync, mkdtempSync, readFileSync, statSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

import { convertDcpToHf } from '../src/index.js'
import { root } from './helpers.js'

/** A `fetch` that answers hub URLs (`…/resolve|raw/<rev>/<path>`) from a local folder, with Range support. */
function localHubFetch(dir: string): typeof fetch {
  return (async (input: string | URL | Request, init?: RequestInit) => {
    const url = new URL(typeof input === 'string' ? input : input instanceof URL ? input.href : input.url)
    const m = /\/(?:resolve|raw)\/[^/]+\/(.+)$/.exec(url.pathname)
    const file = m ? join(dir, decodeURIComponent(m[1])) : ''
    if (!m || !existsSync(file)) return new Response('not found', { status: 404 })
    const size = statSync(file).size
    const etag = `"${size}-${statSync(file).mtimeMs}"`
    const method = init?.method ?? (input instanceof Request ? input.method : 'GET')
    const headers = new Headers(init?.headers ?? (input instanceof Request ? input.headers : undefined))
    const range = /bytes=(\d+)-(\d*)/.exec(headers.get('range') ?? '')
    if (method === 'HEAD') return new Response(null, { status: 200, headers: { 'content-length': String(size), etag } })
    const body = readFileSync(file)
    if (!range) return new Response(body, { status: 200, headers: { 'content-length': String(size), etag } })
    const start = Number(range[1])
    const end = range[2] ? Math.min(Number(range[2]), size - 1) : size - 1
    return new Response(body.subarray(start, end + 1), {
      status: 206,
      headers: { 'content-range': `bytes ${start}-${end}/${size}`, 'content-length': String(end - start + 1), etag },
    })
  }) as typeof fetch
}

const example = join(root, 'examples', 'tiny-llama')

for (const [label, maxShardSize] of [
  ['single file', '5GB'],
  ['sharded', '30KB'],
] as const) {
  test(`@huggingface/hub parses our ${label} output as we planned it`, async (t) => {
    const out = join(mkdtempSync(join(tmpdir(), 'distcp-hub-')), 'hf')
    let plan: import('../src/index.js').ConvertPlan | undefined
    await convertDcpToHf(join(example, 'dcp'), out, join(example, 'model'), join(example, 'tokenizer'), {
      maxShardSize,
      onPlan: (p) => (plan = p),
    })
    t.truthy(plan)
    const parsed = await parseSafetensorsMetadata({ repo: 'acme/tiny', fetch: localHubFetch(out), computeParametersCount: true })
    t.is(parsed.sharded, plan!.shards.length > 1)
    const headers = parsed.sharded ? parsed.headers : { [plan!.shards[0].file]: parsed.header }
    const seen = new Map<string, { dtype: string; shape: number[]; data_offsets: [number, number] }>()
    for (const [file, header] of Object.entries(headers)) {
      t.deepEqual(header.__metadata__, { format: 'pt' }, file)
      for (const [name, info] of Object.entries(header)) {
        if (name !== '__metadata__') seen.set(name, info as { dtype: string; shape: number[]; data_offsets: [number, number] })
      }
    }
    t.is(seen.size, plan!.tensors.length)
    for (const tp of plan!.tensors) {
      const info = seen.get(tp.name)
      t.truthy(info, tp.name)
      t.deepEqual(info!.shape, tp.shape, tp.name)
      const shard = plan!.shards[tp.shard]
      t.is(info!.data_offsets[0], tp.offset - 8 - shard.headerLen, tp.name)
      t.is(info!.data_offsets[1] - info!.data_offsets[0], tp.nbytes, tp.name)
    }
    const params = plan!.tensors.reduce((a, tp) => a + tp.shape.reduce((x, y) => x * y, 1), 0)
    t.is(Object.values(parsed.parameterCount).reduce((a, b) => a + b, 0), params)
  })
}
