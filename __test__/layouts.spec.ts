import test, { type ExecutionContext } from 'ava'
import { cpSync, existsSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, rmSync, unlinkSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

import { convertDcpToHf, load, openCheckpoint, type Tensor } from '../src/index.js'
import { main as cli } from '../src/cli.js'
import { readSafetensors, root, runPython } from './helpers.js'

// The layouts torch ≥ 2.9 and NeMo-RL write besides torch.save-record DCP, from fixtures torch 2.15 wrote
// (interop/make_layout_fixtures.py; fixtures.spec.ts reads each of them bit for bit through read/readAll): what
// inspect says, load(), conversion (equal to torch's consolidate_safetensors_files), a NeMo-RL run folder, and
// lying safetensors headers.

const fx = join(root, 'fixtures', 'torch-2.15.0')
const work = mkdtempSync(join(tmpdir(), 'distcp-layouts-'))
test.after.always(() => {
  if (!process.env.DISTCP_KEEP_TMP) rmSync(work, { recursive: true, force: true })
})

const FIXTURES = {
  'layout-dcp-st-1rank': { layout: 'dcp-safetensors', writer: 'SAFETENSORS', ranks: 1 },
  'layout-dcp-st-2rank': { layout: 'dcp-safetensors', writer: 'SAFETENSORS', ranks: 2 },
  'layout-dcp-st-3rank': { layout: 'dcp-safetensors', writer: 'SAFETENSORS', ranks: 3 },
  'layout-hf-sharded-1rank': { layout: 'hf-storage-sharded', writer: 'save_distributed=True', ranks: 1 },
  'layout-hf-sharded-2rank': { layout: 'hf-storage-sharded', writer: 'save_distributed=True', ranks: 2 },
  'layout-hf-sharded-3rank': { layout: 'hf-storage-sharded', writer: 'save_distributed=True', ranks: 3 },
  'layout-hf-consolidated-2rank': { layout: 'hf-safetensors', writer: 'consolidated', ranks: 0 },
  'layout-hf-folder-single': { layout: 'hf-safetensors', writer: 'Hugging Face', ranks: 0 },
  'layout-hf-folder-sharded': { layout: 'hf-safetensors', writer: 'Hugging Face', ranks: 0 },
} as const

const expectedOf = (name: string) => ({
  meta: JSON.parse(readFileSync(join(fx, name, 'expected.json'), 'utf8')) as { tensors: Record<string, { dtype: string; shape: number[] }> },
  bytes: readSafetensors(join(fx, name, 'expected.safetensors')),
})

/** A folder with a config.json only: what convert needs besides the weights. */
function modelDir(): string {
  const dir = join(work, 'model')
  if (!existsSync(dir)) {
    mkdirSync(dir)
    writeFileSync(join(dir, 'config.json'), JSON.stringify({ model_type: 'llama', hidden_size: 8, tie_word_embeddings: false }))
  }
  return dir
}

let n = 0
const fresh = (tag: string) => join(work, `${tag}-${n++}`)

/** Every tensor of a converted folder equals what torch's reader returned from the input. */
async function assertOutputEqualsExpected(t: ExecutionContext, out: string, name: string): Promise<void> {
  const { meta, bytes } = expectedOf(name)
  const ck = await openCheckpoint(out)
  try {
    t.deepEqual([...ck.keys()].sort(), Object.keys(meta.tensors).sort())
    for (const [key, m] of Object.entries(meta.tensors)) {
      const got = await ck.read(key)
      t.is(got.dtype as string, m.dtype, key)
      t.deepEqual(got.shape, m.shape, key)
      t.true(Buffer.from(got.data).equals(Buffer.from(bytes.get(key) ?? [])), `${name} → ${key}: bytes`)
    }
  } finally {
    ck.close()
  }
}

for (const [name, want] of Object.entries(FIXTURES)) {
  test(`inspect: ${name} is ${want.layout}, written by ${want.writer}`, async (t) => {
    const ck = await openCheckpoint(join(fx, name, 'ckpt'))
    const s = ck.summary()
    ck.close()
    t.is(s.layout, want.layout)
    t.true(s.writer.includes(want.writer), s.writer)
    if (want.ranks) t.is(s.ranks, want.ranks)
    t.is(s.nemoRlWeights ?? null, null)
  })
}

test('load(): a state dict is filled from HF-storage shards of 3 ranks, as torch reads them', async (t) => {
  const name = 'layout-hf-sharded-3rank'
  const { meta, bytes } = expectedOf(name)
  const sd: Record<string, Tensor> = {}
  for (const [k, m] of Object.entries(meta.tensors)) {
    const nbytes = bytes.get(k)?.byteLength ?? 0
    sd[k] = { dtype: m.dtype as Tensor['dtype'], shape: m.shape, data: new Uint8Array(nbytes) }
  }
  await load(sd, { checkpointId: join(fx, name, 'ckpt') })
  for (const k of Object.keys(meta.tensors)) t.true(Buffer.from(sd[k].data).equals(Buffer.from(bytes.get(k) ?? [])), k)
})

for (const name of ['layout-dcp-st-3rank', 'layout-hf-sharded-2rank', 'layout-hf-sharded-3rank', 'layout-hf-consolidated-2rank', 'layout-hf-folder-sharded']) {
  test(`convert: ${name} → one HF folder with torch's values`, async (t) => {
    const out = fresh('conv')
    await convertDcpToHf(join(fx, name, 'ckpt'), out, modelDir(), undefined, { onWarning: () => {} })
    await assertOutputEqualsExpected(t, out, name)
    t.true(existsSync(join(out, 'config.json')))
    if (name.startsWith('layout-hf-sharded')) {
      // the job of torch's consolidate_safetensors_files, compared by torch itself
      const r = JSON.parse(runPython(['interop/check_consolidated.py', join(fx, name, 'ckpt'), out])) as { keys: string[]; mismatches: string[] }
      t.is(r.keys.length, 5)
      t.deepEqual(r.mismatches, [])
    }
  })
}

test('convert: hfOverrides and --hf-override set config fields as AutoConfig.from_pretrained(**overrides) does', async (t) => {
  const src = join(fx, 'layout-hf-sharded-2rank', 'ckpt')
  const out = fresh('overrides')
  await convertDcpToHf(src, out, modelDir(), undefined, { hfOverrides: { rope_theta: 500000, torch_dtype: 'bfloat16', tie_word_embeddings: true }, onWarning: () => {} })
  const config = JSON.parse(readFileSync(join(out, 'config.json'), 'utf8')) as Record<string, unknown>
  t.is(config.rope_theta, 500000)
  t.is(config.tie_word_embeddings, true)
  t.is(config.model_type, 'llama')
  const out2 = fresh('overrides-cli')
  const log = console.log
  console.log = () => {}
  let code: number
  try {
    code = await cli(['convert', src, out2, '--config', modelDir(), '--hf-override', 'rope_theta=10000.5', '--hf-override', 'name_or_path=my model'])
  } finally {
    console.log = log
  }
  t.is(code, 0)
  const c2 = JSON.parse(readFileSync(join(out2, 'config.json'), 'utf8')) as Record<string, unknown>
  t.is(c2.rope_theta, 10000.5)
  t.is(c2.name_or_path, 'my model')
})

/** A NeMo-RL v2 run folder: weights as HF-storage shards (or DCP), optimizer DCP, tokenizer beside. */
function nemoRun(weightsFrom: string, tokenizer = true): string {
  const step = join(fresh('nemo'), 'step_3')
  cpSync(join(fx, weightsFrom, 'ckpt'), join(step, 'policy', 'weights', 'model'), { recursive: true })
  cpSync(join(fx, 'layout-dcp-st-2rank', 'ckpt'), join(step, 'policy', 'optimizer', 'optim'), { recursive: true })
  if (tokenizer) {
    mkdirSync(join(step, 'policy', 'tokenizer'), { recursive: true })
    writeFileSync(join(step, 'policy', 'tokenizer', 'tokenizer_config.json'), '{"tokenizer_class": "PreTrainedTokenizerFast", "marker": "nemo-rl"}')
    writeFileSync(join(step, 'policy', 'tokenizer', 'tokenizer.json'), '{"version": "1.0"}')
  }
  writeFileSync(join(step, 'training_info.json'), '{"step": 3}')
  return step
}

test('NeMo-RL v2 run folder: found from step_N, policy/weights or weights/model; converts with input, output and config only, using the tokenizer beside', async (t) => {
  const step = nemoRun('layout-hf-sharded-2rank')
  for (const input of [step, join(step, 'policy'), join(step, 'policy', 'weights'), join(step, 'policy', 'weights', 'model')]) {
    const ck = await openCheckpoint(input)
    const s = ck.summary()
    ck.close()
    t.is(s.layout, 'hf-storage-sharded', input)
    t.is(s.path, join(step, 'policy', 'weights', 'model'))
    t.is(s.nemoRlWeights, join(step, 'policy', 'weights'))
    t.is(s.tokenizerBeside, join(step, 'policy', 'tokenizer'))
  }
  const out = fresh('nemo-out')
  let plan: { tokenizer: { dir: string; source: string } | null; layout: string } | undefined
  await convertDcpToHf(join(step, 'policy', 'weights'), out, modelDir(), undefined, { onPlan: (p) => (plan = p), onWarning: () => {} })
  t.deepEqual(plan?.tokenizer, { dir: join(step, 'policy', 'tokenizer'), source: 'nemo-rl' })
  t.is(plan?.layout, 'hf-storage-sharded')
  t.true(readFileSync(join(out, 'tokenizer_config.json'), 'utf8').includes('"marker": "nemo-rl"'))
  await assertOutputEqualsExpected(t, out, 'layout-hf-sharded-2rank')
  // a tokenizer given explicitly wins
  const out2 = fresh('nemo-out-given')
  const given = join(work, 'given-tok')
  mkdirSync(given, { recursive: true })
  writeFileSync(join(given, 'tokenizer_config.json'), '{"marker": "given"}')
  await convertDcpToHf(step, out2, modelDir(), given, { onPlan: (p) => (plan = p), onWarning: () => {} })
  t.is(plan?.tokenizer?.source, 'given')
  t.true(readFileSync(join(out2, 'tokenizer_config.json'), 'utf8').includes('given'))
})

test('NeMo-RL v2 run of a tiny Llama (HF-storage shards of 2 FSDP2 ranks): converted with input, output and config only, transformers loads it with the original logits and the tokenizer beside', async (t) => {
  t.timeout(900_000)
  const caseDir = fresh('llama-case')
  runPython(['interop/make_hf_case.py', caseDir, '--ranks', '2', '--writer', 'hf-storage', '--untied'], 840_000)
  const step = join(fresh('nemo-llama'), 'step_5')
  cpSync(join(caseDir, 'dcp'), join(step, 'policy', 'weights', 'model'), { recursive: true })
  cpSync(join(caseDir, 'tokenizer'), join(step, 'policy', 'tokenizer'), { recursive: true })
  const out = fresh('nemo-llama-out')
  const log = console.log
  console.log = () => {}
  let code: number
  try {
    code = await cli(['convert', step, out, '--config', join(caseDir, 'model')])
  } finally {
    console.log = log
  }
  t.is(code, 0)
  const report = JSON.parse(runPython(['interop/check_hf_output.py', out, caseDir], 600_000)) as Record<string, unknown>
  t.like(report, { ok: true }, JSON.stringify(report, null, 1).slice(0, 4000))
})

test('NeMo-RL with model_save_format torch_save (v2): DCP in weights/model is found and read', async (t) => {
  const step = nemoRun('dtensor-2rank', false)
  const ck = await openCheckpoint(step)
  const s = ck.summary()
  ck.close()
  t.is(s.layout, 'dcp')
  t.is(s.nemoRlWeights, join(step, 'policy', 'weights'))
  t.is(s.tokenizerBeside ?? null, null)
})

// ---------------------------------------------------------------------------------------------------------------
// bad input: coded errors, nothing written

/** Rewrites the safetensors file at `path` with `edit` applied to its header (and optionally its length field). */
function editHeader(path: string, edit: (h: Record<string, any>) => void, lengthOverride?: bigint): void {
  const buf = readFileSync(path)
  const n = Number(buf.readBigUInt64LE(0))
  const header = JSON.parse(buf.subarray(8, 8 + n).toString('utf8')) as Record<string, any>
  edit(header)
  let json = Buffer.from(JSON.stringify(header))
  json = Buffer.concat([json, Buffer.alloc((8 - (json.length % 8)) % 8, 0x20)])
  const len = Buffer.alloc(8)
  len.writeBigUInt64LE(lengthOverride ?? BigInt(json.length))
  writeFileSync(path, Buffer.concat([len, json, buf.subarray(8 + n)]))
}

function copyFixture(name: string): string {
  const dir = fresh('bad')
  cpSync(join(fx, name, 'ckpt'), dir, { recursive: true })
  return dir
}

const firstTensor = (h: Record<string, any>) => Object.keys(h).filter((k) => k !== '__metadata__').sort((a, b) => h[a].data_offsets[0] - h[b].data_offsets[0])

const BAD: [string, string, (dir: string) => void, string][] = [
  ['offsets past the end', 'layout-hf-folder-single', (d) => editHeader(join(d, 'model.safetensors'), (h) => {
    const ks = firstTensor(h)
    // a consistent entry (dtype × shape = its byte range) whose range runs 16 elements past the file's end
    const last = h[ks[ks.length - 1]]
    const numel = last.shape.reduce((a: number, b: number) => a * b, 1)
    const es = (last.data_offsets[1] - last.data_offsets[0]) / numel
    last.data_offsets[1] += 16 * es
    last.shape = [numel + 16]
  }), 'ERR_DISTCP_SAFETENSORS_HEADER'],
  ['overlapping tensors', 'layout-hf-folder-single', (d) => editHeader(join(d, 'model.safetensors'), (h) => {
    const [a, b] = firstTensor(h)
    h[b].data_offsets = [h[a].data_offsets[0], h[a].data_offsets[0] + (h[b].data_offsets[1] - h[b].data_offsets[0])]
  }), 'ERR_DISTCP_SAFETENSORS_HEADER'],
  ['dtype/shape not matching the byte range', 'layout-hf-folder-single', (d) => editHeader(join(d, 'model.safetensors'), (h) => {
    const [a] = firstTensor(h)
    h[a].dtype = h[a].dtype === 'F32' ? 'F64' : 'F32'
  }), 'ERR_DISTCP_SAFETENSORS_HEADER'],
  ['a huge header length', 'layout-hf-folder-single', (d) => editHeader(join(d, 'model.safetensors'), () => {}, 1n << 40n), 'ERR_DISTCP_LIMIT_EXCEEDED'],
  ['DCP_SHARDING_INFO that does not tile the tensor', 'layout-hf-sharded-3rank', (d) => editHeader(join(d, 'shard-00002-model-00001-of-00001.safetensors'), (h) => {
    const info = JSON.parse(h.__metadata__.DCP_SHARDING_INFO)
    info['layers.0.weight'].saved_offsets = [0, 0]
    h.__metadata__.DCP_SHARDING_INFO = JSON.stringify(info)
  }), 'ERR_DISTCP_CHUNK_LAYOUT'],
  // (a missing last rank shrinks every sharded tensor to what the others hold, for torch's reader as for distcp:
  // no file says how many ranks there were)
  ['a missing rank shard', 'layout-hf-sharded-3rank', (d) => unlinkSync(join(d, 'shard-00002-model-00001-of-00001.safetensors')), 'ERR_DISTCP_CHUNK_LAYOUT'],
  ['an index that puts a tensor in a file that does not hold it', 'layout-hf-folder-sharded', (d) => {
    const p = join(d, 'model.safetensors.index.json')
    const index = JSON.parse(readFileSync(p, 'utf8')) as { weight_map: Record<string, string> }
    const [key, file] = Object.entries(index.weight_map)[0]
    index.weight_map[key] = Object.values(index.weight_map).find((f) => f !== file) ?? file
    writeFileSync(p, JSON.stringify(index))
  }, 'ERR_DISTCP_METADATA'],
  ['a shard the index names is missing', 'layout-hf-folder-sharded', (d) => unlinkSync(join(d, 'model-00002-of-00003.safetensors')), 'ERR_DISTCP_MISSING_DATA_FILE'],
  ['a DCP safetensors blob whose sharding info disagrees with .metadata', 'layout-dcp-st-2rank', (d) => {
    const f = join(d, '__1_0.distcp')
    const buf = readFileSync(f)
    // the blob follows the non-tensor records; find its header by the `{"` after an 8-byte length
    const at = buf.indexOf('{"')
    const base = at - 8
    const n = Number(buf.readBigUInt64LE(base))
    const header = JSON.parse(buf.subarray(at, at + n).toString('utf8'))
    const info = JSON.parse(header.__metadata__.DCP_SHARDING_INFO)
    info['layers.0.weight'].saved_offsets = [0, 1]
    header.__metadata__.DCP_SHARDING_INFO = JSON.stringify(info)
    let json = Buffer.from(JSON.stringify(header))
    json = Buffer.concat([json, Buffer.alloc(Math.max(0, n - json.length), 0x20)])
    if (json.length !== n) throw new Error('edited header grew')
    writeFileSync(f, Buffer.concat([buf.subarray(0, at), json, buf.subarray(at + n)]))
  }, 'ERR_DISTCP_SAFETENSORS_HEADER'],
]

for (const [what, name, spoil, code] of BAD) {
  test(`bad input: ${what} → ${code}, nothing written`, async (t) => {
    const dir = copyFixture(name)
    spoil(dir)
    const e = await t.throwsAsync(openCheckpoint(dir))
    t.is((e as { code?: string }).code, code, e?.message)
    t.true(e?.message.includes(dir), e?.message)
    const out = fresh('bad-out')
    const e2 = await t.throwsAsync(convertDcpToHf(dir, out, modelDir(), undefined, { onWarning: () => {} }))
    t.is((e2 as { code?: string }).code, code, e2?.message)
    t.false(existsSync(out), 'no output folder')
    t.deepEqual(readdirSync(dir).filter((f) => f.includes('tmp') || f.startsWith('.distcp')), [], 'nothing written into the input')
  })
}
