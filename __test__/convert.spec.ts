import test, { type ExecutionContext } from 'ava'
import { spawn, spawnSync } from 'node:child_process'
import { createHash } from 'node:crypto'
import {
  chmodSync,
  cpSync,
  existsSync,
  mkdirSync,
  mkdtempSync,
  readFileSync,
  readdirSync,
  rmSync,
  statSync,
  symlinkSync,
  unlinkSync,
  writeFileSync,
} from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

import { convertDcpToHf, openCheckpoint, DistcpError } from '../src/index.js'
import { pythonPath, root } from './helpers.js'

// DCP → Hugging Face conversion against the real components: tiny Llama models built by transformers from a config,
// saved the seed's way by torch (1 process, or 2 gloo ranks with FSDP2 DTensors), converted by distcp, then loaded back
// by transformers (logits exact), safetensors (every tensor bit for bit) and AutoTokenizer — interop/check_hf_output.py.

const work = mkdtempSync(join(tmpdir(), 'distcp-convert-'))
const cleanups: (() => void)[] = []
test.after.always(() => {
  for (const c of cleanups.reverse()) {
    try {
      c()
    } catch {
      // best effort: a mount that will not go away must not hide the test results
    }
  }
  if (process.env.DISTCP_KEEP_TMP) return
  try {
    rmSync(work, { recursive: true, force: true })
  } catch (e) {
    console.warn(`could not remove ${work}: ${String(e)}`)
  }
})

// ---------------------------------------------------------------------------------------------------------------
// Python, asynchronously and at most two at a time (the case builders spawn ranks of their own)

interface PyResult {
  status: number | null
  stdout: string
  stderr: string
}

let pyRunning = 0
const pyQueue: (() => void)[] = []
async function py(args: string[], timeoutMs = 300_000): Promise<PyResult> {
  if (pyRunning >= 2) await new Promise<void>((r) => pyQueue.push(r))
  pyRunning++
  try {
    return await new Promise<PyResult>((resolve, reject) => {
      const p = spawn(pythonPath(), args, { cwd: root, env: { ...process.env, HF_HUB_OFFLINE: '1', TOKENIZERS_PARALLELISM: 'false' } })
      let stdout = ''
      let stderr = ''
      p.stdout.on('data', (d) => (stdout += d))
      p.stderr.on('data', (d) => (stderr += d))
      const timer = setTimeout(() => p.kill('SIGKILL'), timeoutMs)
      p.on('error', reject)
      p.on('close', (status) => {
        clearTimeout(timer)
        resolve({ status, stdout, stderr })
      })
    })
  } finally {
    pyRunning--
    pyQueue.shift()?.()
  }
}

interface Case {
  dir: string
  dcp: string
  model: string
  tokenizer: string
  tied: boolean
  ranks: number
  parameters: string[]
}

const caseCache = new Map<string, Promise<Case>>()
/** Builds a case once per test file (interop/make_hf_case.py): model/, tokenizer/, dcp/, reference_*.safetensors. */
function getCase(tied: boolean, ranks: 1 | 2): Promise<Case> {
  const name = `${tied ? 'tied' : 'untied'}-${ranks}rank`
  let c = caseCache.get(name)
  if (!c) {
    c = (async () => {
      const dir = join(work, 'cases', name)
      const r = await py(['interop/make_hf_case.py', dir, tied ? '--tied' : '--untied', '--ranks', String(ranks), '--seed', String(ranks * 10 + (tied ? 1 : 2))])
      if (r.status !== 0) throw new Error(`make_hf_case.py ${name} failed (${r.status}):\n${r.stderr}`)
      const info = JSON.parse(r.stdout.trim().split('\n').pop()!) as { parameters: string[]; ranks: number; tied: boolean; state_dict_types: string[] }
      if (ranks === 2 && !info.state_dict_types.includes('DTensor')) throw new Error(`2-rank case holds no DTensors: ${r.stdout}`)
      return { dir, dcp: join(dir, 'dcp'), model: join(dir, 'model'), tokenizer: join(dir, 'tokenizer'), tied, ranks, parameters: info.parameters }
    })()
    caseCache.set(name, c)
  }
  return c
}
// start building every case now, so the tests below do not wait for each other
for (const tied of [true, false]) for (const ranks of [1, 2] as const) void getCase(tied, ranks).catch(() => undefined)

let outCounter = 0
/** A fresh output path (not created) in its own parent folder, so "nothing left behind" can be checked exactly. */
function freshOut(label: string): { parent: string; out: string } {
  const parent = join(work, 'out', `${String(++outCounter).padStart(3, '0')}-${label}`)
  mkdirSync(parent, { recursive: true })
  return { parent, out: join(parent, 'hf') }
}

interface Report {
  ok: boolean
  errors: string[]
  checks: Record<string, unknown>
  files: string[]
}

/** interop/check_hf_output.py must pass. */
async function checkWithTransformers(t: ExecutionContext, hf: string, c: Case, dtype = 'float32'): Promise<Report> {
  const r = await py(['interop/check_hf_output.py', hf, c.dir, '--dtype', dtype])
  let report: Report
  try {
    report = JSON.parse(r.stdout) as Report
  } catch {
    t.fail(`check_hf_output.py printed no report (exit ${r.status}):\n${r.stdout}\n${r.stderr}`)
    throw new Error('no report')
  }
  t.deepEqual(report.errors, [], `check_hf_output.py ${hf} ${c.dir} --dtype ${dtype}`)
  t.is(r.status, 0, r.stderr.slice(-2000))
  return report
}

// ---------------------------------------------------------------------------------------------------------------
// safetensors headers, parsed with the rules of spec/seed-and-hf.md §5.10 (the safetensors crate's validation)

const DTYPE_BITS: Record<string, number> = {
  BOOL: 8, U8: 8, I8: 8, F8_E5M2: 8, F8_E4M3: 8, F8_E8M0: 8, F4: 4, F6_E2M3: 6, F6_E3M2: 6,
  I16: 16, U16: 16, F16: 16, BF16: 16, I32: 32, U32: 32, F32: 32, C64: 64, F64: 64, I64: 64, U64: 64,
}

interface StTensor {
  name: string
  dtype: string
  shape: number[]
  begin: number
  end: number
}

function parseSafetensorsHeader(path: string): { metadata: Record<string, string> | undefined; tensors: StTensor[]; dataStart: number; bytes: Buffer } {
  const bytes = readFileSync(path)
  const where = (msg: string) => `${path}: ${msg}`
  if (bytes.length < 8) throw new Error(where('HeaderTooSmall'))
  const n = Number(bytes.readBigUInt64LE(0))
  if (n > 100_000_000) throw new Error(where(`HeaderTooLarge (${n})`))
  if (8 + n > bytes.length) throw new Error(where(`InvalidHeaderLength (${n})`))
  if ((8 + n) % 8 !== 0) throw new Error(where(`header of ${n} bytes: data does not start on an 8-byte boundary`))
  const text = bytes.subarray(8, 8 + n).toString('utf8')
  const json = text.replace(/ +$/, '')
  if (!json.startsWith('{')) throw new Error(where('header is not a JSON object'))
  const header = JSON.parse(json) as Record<string, unknown>
  const metadata = header.__metadata__ as Record<string, string> | undefined
  if (metadata !== undefined) {
    for (const [k, v] of Object.entries(metadata)) if (typeof v !== 'string') throw new Error(where(`__metadata__.${k} is not a string`))
  }
  const tensors: StTensor[] = []
  for (const [name, v] of Object.entries(header)) {
    if (name === '__metadata__') continue
    const { dtype, shape, data_offsets } = v as { dtype: string; shape: number[]; data_offsets: [number, number] }
    if (!(dtype in DTYPE_BITS)) throw new Error(where(`${name}: unknown dtype ${dtype}`))
    if (!Array.isArray(shape) || !shape.every((d) => Number.isInteger(d) && d >= 0)) throw new Error(where(`${name}: bad shape`))
    if (!Array.isArray(data_offsets) || data_offsets.length !== 2) throw new Error(where(`${name}: bad data_offsets`))
    tensors.push({ name, dtype, shape, begin: data_offsets[0], end: data_offsets[1] })
  }
  const sorted = [...tensors].sort((a, b) => a.begin - b.begin || a.end - b.end)
  let at = 0
  for (const s of sorted) {
    if (s.begin !== at) throw new Error(where(`InvalidOffset(${s.name}): begins at ${s.begin}, previous tensor ends at ${at}`))
    const bits = s.shape.reduce((a, b) => a * b, 1) * DTYPE_BITS[s.dtype]
    if (bits % 8 !== 0) throw new Error(where(`MisalignedSlice (${s.name})`))
    if (s.end - s.begin !== bits / 8) throw new Error(where(`TensorInvalidInfo (${s.name}): ${s.end - s.begin} bytes for ${s.dtype} ${JSON.stringify(s.shape)}`))
    at = s.end
  }
  if (at + 8 + n !== bytes.length) throw new Error(where(`MetadataIncompleteBuffer: data ends at ${at + 8 + n}, file has ${bytes.length} bytes`))
  return { metadata, tensors, dataStart: 8 + n, bytes }
}

/** Every shard of an output folder, headers checked; plus the index checked against them. */
function readOutput(t: ExecutionContext, hf: string): Map<string, { file: string; tensor: StTensor; data: Buffer }> {
  const files = readdirSync(hf).filter((f) => f.endsWith('.safetensors')).sort()
  const all = new Map<string, { file: string; tensor: StTensor; data: Buffer }>()
  let total = 0
  for (const f of files) {
    const h = parseSafetensorsHeader(join(hf, f))
    t.deepEqual(h.metadata, { format: 'pt' }, `${f}: __metadata__`)
    for (const tensor of h.tensors) {
      t.false(all.has(tensor.name), `${tensor.name} appears in two shards`)
      all.set(tensor.name, { file: f, tensor, data: h.bytes.subarray(h.dataStart + tensor.begin, h.dataStart + tensor.end) })
      total += tensor.end - tensor.begin
    }
  }
  const indexPath = join(hf, 'model.safetensors.index.json')
  if (files.length === 1 && files[0] === 'model.safetensors') {
    t.false(existsSync(indexPath), 'one shard: no index')
  } else {
    const index = JSON.parse(readFileSync(indexPath, 'utf8')) as { metadata: { total_size: number }; weight_map: Record<string, string> }
    const nShards = files.length
    t.deepEqual(files, Array.from({ length: nShards }, (_, i) => `model-${String(i + 1).padStart(5, '0')}-of-${String(nShards).padStart(5, '0')}.safetensors`))
    t.deepEqual(Object.keys(index.weight_map).sort(), [...all.keys()].sort(), 'weight_map covers exactly the shards')
    for (const [name, v] of all) t.is(index.weight_map[name], v.file, `weight_map[${name}]`)
    t.is(index.metadata.total_size, total, 'total_size = sum of tensor bytes')
  }
  return all
}

function listing(dir: string): string[] {
  return existsSync(dir) ? readdirSync(dir).sort() : []
}

async function rejectsClearly(t: ExecutionContext, p: Promise<unknown>, code: string | RegExp, ...mentions: (string | RegExp)[]): Promise<DistcpError | undefined> {
  let err: unknown
  try {
    await p
    t.fail('expected the conversion to fail')
    return undefined
  } catch (e) {
    err = e
  }
  const e = err as Error & { code?: string }
  t.true(e instanceof DistcpError, `expected a DistcpError, got ${e?.constructor?.name} ${e?.code ?? ''}: ${e?.message}`)
  if (typeof code === 'string') t.is(e.code, code, e.message)
  else t.regex(String(e.code), code, e.message)
  for (const m of mentions) {
    if (typeof m === 'string') t.true(e.message.includes(m), `message should mention ${m}: ${e.message}`)
    else t.regex(e.message, m)
  }
  return e as DistcpError
}

const quiet = { onWarning: () => undefined }

// ---------------------------------------------------------------------------------------------------------------
// The real round trip: tied / untied × 1 / 2 ranks

for (const tied of [true, false]) {
  for (const ranks of [1, 2] as const) {
    test(`${tied ? 'tied' : 'untied'} embeddings, ${ranks} rank(s): transformers loads the output, logits and tensors exact`, async (t) => {
      const c = await getCase(tied, ranks)
      const { out } = freshOut(`basic-${tied}-${ranks}`)
      const progress: { bytesDone: number; bytesTotal: number; tensorsDone: number; tensorsTotal: number; file: string }[] = []
      const ret = await convertDcpToHf(c.dcp, out, c.model, c.tokenizer, { onProgress: (p) => progress.push({ ...p }) })
      t.is(ret, out, 'returns the HF path, like the seed')
      const report = await checkWithTransformers(t, out, c)
      t.true(report.files.includes('model.safetensors'), 'default shard size: one model.safetensors')
      // tied: lm_head (bit-identical to the embedding) dropped; untied: kept
      const tensors = readOutput(t, out)
      t.is(tensors.has('lm_head.weight'), !tied)
      t.is(tensors.size, c.parameters.length - (tied ? 1 : 0))
      // progress: monotonic, ends at the totals
      t.true(progress.length >= 1)
      const last = progress.at(-1)!
      t.is(last.tensorsDone, last.tensorsTotal)
      t.is(last.bytesDone, last.bytesTotal)
      t.is(last.tensorsTotal, tensors.size)
      t.is(last.bytesTotal, report.checks.tensor_bytes as number)
      for (let i = 1; i < progress.length; i++) t.true(progress[i].bytesDone >= progress[i - 1].bytesDone && progress[i].tensorsDone > progress[i - 1].tensorsDone)
    })
  }
}

for (const [tied, ranks] of [[false, 2], [true, 1]] as const) {
  test(`dtype bfloat16 (${tied ? 'tied' : 'untied'}, ${ranks} rank(s)): every tensor equals torch's .to(torch.bfloat16) bit for bit`, async (t) => {
    const c = await getCase(tied, ranks)
    const { out } = freshOut(`bf16-${tied}-${ranks}`)
    await convertDcpToHf(c.dcp, out, c.model, c.tokenizer, { dtype: 'bfloat16' })
    const report = await checkWithTransformers(t, out, c, 'bfloat16')
    t.true(report.checks.logits_exact_vs_torch_model_in_dtype as boolean)
    for (const [name, v] of readOutput(t, out)) t.is(v.tensor.dtype, 'BF16', name)
    const cfg = JSON.parse(readFileSync(join(out, 'config.json'), 'utf8')) as Record<string, unknown>
    t.is(cfg.dtype, 'bfloat16', 'config.json dtype is the dtype written')
  })
}

test('sharded output (maxShardSize 20KB): several shards, headers valid per §5.10, index exact, transformers loads it', async (t) => {
  const c = await getCase(false, 2)
  const { out } = freshOut('sharded')
  await convertDcpToHf(c.dcp, out, c.model, c.tokenizer, { maxShardSize: '20KB' })
  const report = await checkWithTransformers(t, out, c)
  const tensors = readOutput(t, out)
  const shards = new Map<string, StTensor[]>()
  for (const v of tensors.values()) shards.set(v.file, [...(shards.get(v.file) ?? []), v.tensor])
  t.true(shards.size >= 5, `expected several shards, got ${shards.size}`)
  t.is(report.checks.shard_count as number, shards.size)
  for (const [f, ts] of shards) {
    const bytes = ts.reduce((a, x) => a + x.end - x.begin, 0)
    t.true(ts.length === 1 || bytes <= 20_000, `${f}: ${ts.length} tensors, ${bytes} bytes > 20KB (only a lone oversized tensor may exceed it)`)
  }
  // the bytes in the shards are the checkpoint's bytes, as distcp's reader returns them
  const ck = await openCheckpoint(c.dcp)
  try {
    for (const [name, v] of tensors) {
      const want = (await ck.read(`model.${name}`)).data
      t.true(Buffer.from(want.buffer, want.byteOffset, want.byteLength).equals(v.data), `${name}: shard bytes = checkpoint bytes`)
    }
  } finally {
    ck.close()
  }
  // the same limit given as a number plans the same shards
  const again = freshOut('sharded-number')
  await convertDcpToHf(c.dcp, again.out, c.model, c.tokenizer, { maxShardSize: 20_000 })
  t.deepEqual(readFileSync(join(again.out, 'model.safetensors.index.json'), 'utf8'), readFileSync(join(out, 'model.safetensors.index.json'), 'utf8'))
  t.log(`${shards.size} shards; @huggingface/hub (npm 2.17.5) parseSafetensorsMetadata would be the independent cross-check once it is a devDependency`)
})

test('a hub name resolves offline through a synthetic HF cache (HF_HOME/hub, then HF_HUB_CACHE), config and tokenizer', async (t) => {
  const c = await getCase(true, 1)
  const commit = createHash('sha1').update('acme/tiny main').digest('hex')
  const stale = createHash('sha1').update('acme/tiny old').digest('hex')
  /** models--acme--tiny as huggingface_hub lays it out: blobs by hash, snapshots of relative symlinks, refs/main. */
  const makeCache = (hubDir: string) => {
    const repo = join(hubDir, 'models--acme--tiny')
    mkdirSync(join(repo, 'blobs'), { recursive: true })
    mkdirSync(join(repo, 'refs'), { recursive: true })
    writeFileSync(join(repo, 'refs', 'main'), commit) // no newline, as the hub writes it
    const put = (snapshot: string, name: string, content: Buffer) => {
      const blob = createHash('sha256').update(content).digest('hex')
      writeFileSync(join(repo, 'blobs', blob), content)
      mkdirSync(join(repo, 'snapshots', snapshot), { recursive: true })
      symlinkSync(join('..', '..', 'blobs', blob), join(repo, 'snapshots', snapshot, name))
    }
    for (const f of readdirSync(c.model)) put(commit, f, readFileSync(join(c.model, f)))
    for (const f of readdirSync(c.tokenizer)) put(commit, f, readFileSync(join(c.tokenizer, f)))
    // an older snapshot refs/main does not point at: must not be used
    const oldCfg = JSON.parse(readFileSync(join(c.model, 'config.json'), 'utf8')) as Record<string, unknown>
    put(stale, 'config.json', Buffer.from(JSON.stringify({ ...oldCfg, vocab_size: 7 })))
    mkdirSync(join(repo, '.no_exist', commit), { recursive: true })
    writeFileSync(join(repo, '.no_exist', commit, 'special_tokens_map.json'), '')
  }
  const envKeys = ['HF_HOME', 'HF_HUB_CACHE', 'HUGGINGFACE_HUB_CACHE', 'TRANSFORMERS_CACHE', 'XDG_CACHE_HOME'] as const
  const saved = Object.fromEntries(envKeys.map((k) => [k, process.env[k]]))
  const restore = () => {
    for (const k of envKeys) {
      if (saved[k] === undefined) delete process.env[k]
      else process.env[k] = saved[k]
    }
  }
  try {
    for (const k of envKeys) delete process.env[k]
    // 1. $HF_HOME/hub
    const home = join(work, 'hf-home')
    makeCache(join(home, 'hub'))
    process.env.HF_HOME = home
    const a = freshOut('hub-home')
    t.is(await convertDcpToHf(c.dcp, a.out, 'acme/tiny', undefined, quiet), a.out)
    restore()
    await checkWithTransformers(t, a.out, c) // config, generation config and tokenizer all came from the snapshot
    for (const k of envKeys) delete process.env[k]
    // 2. HF_HUB_CACHE wins over HF_HOME
    const cache = join(work, 'hub-cache')
    makeCache(cache)
    process.env.HF_HOME = join(work, 'empty-hf-home')
    process.env.HF_HUB_CACHE = cache
    const b = freshOut('hub-cache')
    await convertDcpToHf(c.dcp, b.out, 'acme/tiny', 'acme/tiny', quiet)
    for (const f of ['config.json', 'generation_config.json', ...readdirSync(c.tokenizer)]) t.true(existsSync(join(b.out, f)), f)
    t.deepEqual(readFileSync(join(b.out, 'tokenizer.json')), readFileSync(join(c.tokenizer, 'tokenizer.json')))
    const vocab = (dir: string) => (JSON.parse(readFileSync(join(dir, 'config.json'), 'utf8')) as { vocab_size: number }).vocab_size
    t.is(vocab(b.out), vocab(c.model), 'the snapshot refs/main names, not the stale one')
    // 3. a name in no cache: a clear error, nothing written
    const d = freshOut('hub-missing')
    await rejectsClearly(t, convertDcpToHf(c.dcp, d.out, 'acme/absent', undefined, quiet), /^ERR_DISTCP_/, 'acme/absent')
    t.deepEqual(listing(d.parent), [])
  } finally {
    restore()
  }
})

test('the DTensor v2 layout (<dcp>/model/.metadata) is found', async (t) => {
  const c = await getCase(false, 2)
  const v2 = join(work, 'v2-layout')
  cpSync(c.dcp, join(v2, 'model'), { recursive: true })
  const { out } = freshOut('v2')
  t.is(await convertDcpToHf(v2, out, c.model, c.tokenizer), out)
  await checkWithTransformers(t, out, c)
})

// ---------------------------------------------------------------------------------------------------------------
// Casts: every target dtype against torch's own `.to()` on awkward bit patterns (interop/make_cast_case.py)

const NAN_TEST: Record<string, (b: Buffer, i: number) => boolean> = {
  BF16: (b, i) => (b.readUInt16LE(i) & 0x7f80) === 0x7f80 && (b.readUInt16LE(i) & 0x7f) !== 0,
  F16: (b, i) => (b.readUInt16LE(i) & 0x7c00) === 0x7c00 && (b.readUInt16LE(i) & 0x3ff) !== 0,
  F32: (b, i) => Number.isNaN(b.readFloatLE(i)),
  F64: (b, i) => Number.isNaN(b.readDoubleLE(i)),
  I64: () => false,
}
const ELEM: Record<string, number> = { BF16: 2, F16: 2, F32: 4, F64: 8, I64: 8 }
const TARGET_ST: Record<string, string> = { bfloat16: 'BF16', float16: 'F16', float32: 'F32', float64: 'F64' }

// the default tensors (≤ 256 KiB) take the small-tensor path; 3,000,001 random patterns make every tensor several
// slabs, cast on the slab workers and written with O_DIRECT at unaligned offsets
for (const n of [undefined, 3_000_001]) test(`dtype casts equal torch's .to() bit for bit: specials, ties, subnormals, overflow, random bit patterns, NaN${n ? ` (${n} elements a tensor: the slab path)` : ''}`, async (t) => {
  const dir = join(work, `cast-case${n ? `-${n}` : ''}`)
  const r = await py(['interop/make_cast_case.py', dir, ...(n ? ['--n', String(n)] : [])])
  t.is(r.status, 0, r.stderr)
  const h = parseSafetensorsHeader(join(dir, 'expected.safetensors'))
  const expected = new Map(h.tensors.map((x) => [x.name, { dtype: x.dtype, data: h.bytes.subarray(h.dataStart + x.begin, h.dataStart + x.end) }]))
  const problems: string[] = []
  const nanNotes: string[] = []
  for (const target of ['bfloat16', 'float16', 'float32', 'float64']) {
    const { out } = freshOut(`cast-${target}${n ? `-${n}` : ''}`)
    await convertDcpToHf(join(dir, 'dcp'), out, join(dir, 'model'), undefined, { ...quiet, dtype: target as 'float32' })
    const got = readOutput(t, out)
    t.is(got.size, 5)
    for (const [name, g] of got) {
      const e = expected.get(`${name}.${target}`)
      if (!e) {
        problems.push(`${target}: unexpected tensor ${name}`)
        continue
      }
      const isInt = name.includes('i64')
      if (g.tensor.dtype !== (isInt ? 'I64' : TARGET_ST[target]) || g.data.length !== e.data.length) {
        problems.push(`${target}: ${name} is ${g.tensor.dtype} of ${g.data.length} bytes, torch's is ${e.dtype} of ${e.data.length}`)
        continue
      }
      const es = ELEM[e.dtype]
      const isNan = NAN_TEST[e.dtype]
      let bad = 0
      let nanPayload = 0
      let nanLost = 0
      const examples: string[] = []
      for (let i = 0; i < e.data.length; i += es) {
        const a = e.data.subarray(i, i + es)
        const b = g.data.subarray(i, i + es)
        if (a.equals(b)) continue
        if (isNan(e.data, i)) {
          if (!isNan(g.data, i)) nanLost++
          else nanPayload++
          if (nanPayload <= 2 && isNan(g.data, i)) nanNotes.push(`${target}: ${name}[${i / es}] NaN: torch 0x${Buffer.from(a).reverse().toString('hex')}, distcp 0x${Buffer.from(b).reverse().toString('hex')}`)
          continue
        }
        bad++
        if (examples.length < 4) examples.push(`[${i / es}] torch 0x${Buffer.from(a).reverse().toString('hex')} distcp 0x${Buffer.from(b).reverse().toString('hex')}`)
      }
      if (bad) problems.push(`${target}: ${name}: ${bad} non-NaN elements differ from torch, e.g. ${examples.join(', ')}`)
      if (nanLost) problems.push(`${target}: ${name}: ${nanLost} NaNs became non-NaN`)
      // float16: torch keeps the NaN's sign and top payload bits (quieted) on every CPU capability (scalar, AVX2,
      // AVX512 alike), so distcp must too. bfloat16: torch's own answer depends on the CPU kernel (0x7fc0 scalar,
      // 0xffff AVX2/AVX512), so any NaN is accepted there and the difference is only logged.
      if (nanPayload && target === 'float16') problems.push(`${target}: ${name}: ${nanPayload} NaNs encoded differently from torch`)
    }
  }
  for (const n of nanNotes) t.log(n)
  t.deepEqual(problems, [])
})

test("fp8 casts equal torch's .to() bit for bit, NaN included: every fp8 byte out, every bfloat16 and many float32/16/64 in", async (t) => {
  const dir = join(work, 'cast-case-fp8')
  const r = await py(['interop/make_cast_case.py', dir, '--fp8'])
  t.is(r.status, 0, r.stderr)
  const h = parseSafetensorsHeader(join(dir, 'expected.safetensors'))
  const expected = new Map(h.tensors.map((x) => [x.name, { dtype: x.dtype, data: h.bytes.subarray(h.dataStart + x.begin, h.dataStart + x.end) }]))
  const problems: string[] = []
  let compared = 0
  for (const target of ['float8_e4m3fn', 'float8_e5m2', 'bfloat16', 'float16', 'float32', 'float64']) {
    const { out } = freshOut(`cast-fp8-${target}`)
    await convertDcpToHf(join(dir, 'dcp'), out, join(dir, 'model'), undefined, { ...quiet, dtype: target as 'float32' })
    const got = readOutput(t, out)
    t.is(got.size, 6)
    for (const [name, g] of got) {
      const e = expected.get(`${name}.${target}`)
      if (!e) continue // neither side fp8: the plain cast case covers it
      compared++
      if (g.tensor.dtype !== e.dtype || g.data.length !== e.data.length) {
        problems.push(`${target}: ${name} is ${g.tensor.dtype} of ${g.data.length} bytes, torch's is ${e.dtype} of ${e.data.length}`)
        continue
      }
      const es = g.data.length / g.tensor.shape.reduce((a, b) => a * b, 1)
      let bad = 0
      const examples: string[] = []
      for (let i = 0; i < e.data.length; i += es) {
        if (e.data.subarray(i, i + es).equals(g.data.subarray(i, i + es))) continue
        bad++
        if (examples.length < 4) examples.push(`[${i / es}] torch 0x${Buffer.from(e.data.subarray(i, i + es)).reverse().toString('hex')} distcp 0x${Buffer.from(g.data.subarray(i, i + es)).reverse().toString('hex')}`)
      }
      if (bad) problems.push(`${target}: ${name}: ${bad} elements differ from torch, e.g. ${examples.join(', ')}`)
    }
  }
  t.deepEqual(problems, [])
  t.is(compared, expected.size) // every pair torch computed was compared
})

// ---------------------------------------------------------------------------------------------------------------
// Seed parity

test('an existing output folder without overwrite: the seed message, and the folder is left alone', async (t) => {
  const c = await getCase(true, 1)
  const { out } = freshOut('exists')
  mkdirSync(out)
  writeFileSync(join(out, 'model-00001-of-00009.safetensors'), 'stale shard of an earlier run')
  const e = await rejectsClearly(t, convertDcpToHf(c.dcp, out, c.model, c.tokenizer), 'ERR_DISTCP_EXISTS')
  t.is(e?.message, `HF checkpoint already exists at ${out}. Delete it to run or set overwrite=True.`)
  t.deepEqual(listing(out), ['model-00001-of-00009.safetensors'])
  // overwrite: a clean result (stale shards of the earlier run do not survive: the checker rejects stray shards)
  t.is(await convertDcpToHf(c.dcp, out, c.model, c.tokenizer, { overwrite: true }), out)
  t.false(existsSync(join(out, 'model-00001-of-00009.safetensors')), 'stale shard removed on overwrite')
  await checkWithTransformers(t, out, c)
})

test('no .metadata in either layout: the seed error names both places, and no output folder is made', async (t) => {
  const empty = join(work, 'no-checkpoint')
  mkdirSync(join(empty, 'model'), { recursive: true })
  const c = await getCase(true, 1)
  const { parent, out } = freshOut('no-metadata')
  const e = await rejectsClearly(t, convertDcpToHf(empty, out, c.model, c.tokenizer), 'ERR_DISTCP_NO_CHECKPOINT', empty, join(empty, 'model'))
  t.is(e?.message, `No metadata file found in ${empty}(Dtensor V1 ckpt path) or ${join(empty, 'model')}(Dtensor V2 ckpt path).`)
  t.deepEqual(listing(parent), [], 'unlike the seed, nothing is created before the input is validated')
})

test('tokenizer defaults to the model folder; generation_config.json and config dtype follow the contract', async (t) => {
  const c = await getCase(false, 1)
  const both = join(work, 'model-with-tokenizer')
  cpSync(c.model, both, { recursive: true })
  cpSync(c.tokenizer, both, { recursive: true })
  const { out } = freshOut('tok-default')
  await convertDcpToHf(c.dcp, out, both, undefined, { dtype: 'float16' })
  await checkWithTransformers(t, out, c, 'float16')
})

test('config ties embeddings but lm_head differs from the embedding: lm_head kept, with a warning', async (t) => {
  const c = await getCase(false, 1)
  const lying = join(work, 'lying-config')
  cpSync(c.model, lying, { recursive: true })
  const cfg = JSON.parse(readFileSync(join(lying, 'config.json'), 'utf8')) as Record<string, unknown>
  writeFileSync(join(lying, 'config.json'), JSON.stringify({ ...cfg, tie_word_embeddings: true }, null, 2))
  const warnings: string[] = []
  const { out } = freshOut('lying')
  await convertDcpToHf(c.dcp, out, lying, c.tokenizer, { onWarning: (m) => warnings.push(m) })
  const tensors = readOutput(t, out)
  t.true(tensors.has('lm_head.weight'), 'lm_head kept')
  t.true(warnings.some((w) => w.includes('lm_head')), `a warning about lm_head: ${JSON.stringify(warnings)}`)
})

test('keyMap, include, exclude and dryRun', async (t) => {
  const c = await getCase(false, 1)
  const dry = freshOut('dry')
  const printed: string[] = []
  const log = console.log
  console.log = (...a: unknown[]) => void printed.push(a.join(' ')) // the dry run prints its plan
  try {
    t.is(await convertDcpToHf(c.dcp, dry.out, c.model, c.tokenizer, { dryRun: true }), dry.out)
  } finally {
    console.log = log
  }
  t.deepEqual(listing(dry.parent), [], 'dry run writes nothing')
  t.true(printed.join('\n').includes('model.layers.1.mlp.down_proj.weight'), 'the plan names the tensors')

  const ex = freshOut('exclude')
  await convertDcpToHf(c.dcp, ex.out, c.model, c.tokenizer, { exclude: ['lm_head.weight'] })
  t.false(readOutput(t, ex.out).has('lm_head.weight'))

  const inc = freshOut('include')
  await convertDcpToHf(c.dcp, inc.out, c.model, c.tokenizer, { include: ['model.layers.0.*', 'model.norm.weight'] })
  const names = [...readOutput(t, inc.out).keys()].sort()
  t.deepEqual(names, c.parameters.filter((p) => p.startsWith('model.layers.0.') || p === 'model.norm.weight').sort())

  const km = freshOut('keymap')
  await convertDcpToHf(c.dcp, km.out, c.model, c.tokenizer, { keyMap: { 'model.': 'backbone.' } })
  t.deepEqual([...readOutput(t, km.out).keys()].sort(), c.parameters.map((p) => (p.startsWith('model.') ? `backbone.${p.slice(6)}` : p)).sort())
})

// ---------------------------------------------------------------------------------------------------------------
// Bad input: a clear DistcpError, and no output folder and no temporary folder left behind

test('a missing data file', async (t) => {
  const c = await getCase(false, 2)
  const broken = join(work, 'missing-data-file')
  cpSync(c.dcp, broken, { recursive: true })
  unlinkSync(join(broken, '__1_0.distcp'))
  const { parent, out } = freshOut('missing-file')
  await rejectsClearly(t, convertDcpToHf(broken, out, c.model, c.tokenizer), 'ERR_DISTCP_MISSING_DATA_FILE', '__1_0.distcp')
  t.deepEqual(listing(parent), [])
})

/** Can this process mount a tmpfs (root in a container with CAP_SYS_ADMIN)? Probed once, at load time. */
function probeMount(): string | null {
  const dir = join(work, 'mount-probe')
  mkdirSync(dir, { recursive: true })
  const m = spawnSync('mount', ['-t', 'tmpfs', '-o', 'size=64k', 'tmpfs', dir], { encoding: 'utf8' })
  if (m.status !== 0) return `mount -t tmpfs failed: ${(m.stderr || String(m.error)).trim()}`
  spawnSync('umount', [dir])
  return null
}
const mountProblem = probeMount()

function canWrite(dir: string): boolean {
  try {
    writeFileSync(join(dir, '.probe'), '')
    unlinkSync(join(dir, '.probe'))
    return true
  } catch {
    return false
  }
}

const chmodWorks = (() => {
  const d = join(work, 'chmod-probe')
  mkdirSync(d, { recursive: true })
  chmodSync(d, 0o555)
  const ok = !canWrite(d)
  chmodSync(d, 0o755)
  return ok
})()
const roReason = chmodWorks
  ? 'chmod 555'
  : mountProblem === null
    ? `chmod 555 is ineffective for uid ${process.getuid?.()} (CAP_DAC_OVERRIDE): a read-only tmpfs mount instead`
    : null
;(roReason ? test : test.skip)(
  `an output whose parent folder is read-only (${roReason ?? `NOT TESTED: chmod is ineffective for uid ${process.getuid?.()} and ${mountProblem}`})`,
  async (t) => {
    const c = await getCase(true, 1)
    const { parent } = freshOut('read-only')
    let roParent = parent
    if (chmodWorks) {
      chmodSync(parent, 0o555)
      cleanups.push(() => chmodSync(parent, 0o755))
    } else {
      roParent = join(parent, 'ro-mount')
      mkdirSync(roParent)
      const m = spawnSync('mount', ['-t', 'tmpfs', '-o', 'ro,size=64k', 'tmpfs', roParent], { encoding: 'utf8' })
      t.is(m.status, 0, m.stderr)
      cleanups.push(() => spawnSync('umount', [roParent]))
    }
    t.false(canWrite(roParent), 'the parent really is read-only')
    t.log(roReason)
    const out = join(roParent, 'hf')
    await rejectsClearly(t, convertDcpToHf(c.dcp, out, c.model, c.tokenizer), /^ERR_DISTCP_/, roParent)
    t.deepEqual(listing(roParent), [])
  },
)

test('an output inside the input checkpoint is refused before anything is written', async (t) => {
  const c = await getCase(true, 1)
  const copy = join(work, 'out-inside-input')
  cpSync(c.dcp, copy, { recursive: true })
  const before = listing(copy)
  await rejectsClearly(t, convertDcpToHf(copy, join(copy, 'hf'), c.model, c.tokenizer), /^ERR_DISTCP_/, join(copy, 'hf'))
  await rejectsClearly(t, convertDcpToHf(copy, join(copy, 'a', 'b'), c.model, c.tokenizer), /^ERR_DISTCP_/)
  t.deepEqual(listing(copy), before)
  // v2 layout: inside <dcp>/model too
  const v2 = join(work, 'out-inside-input-v2')
  cpSync(c.dcp, join(v2, 'model'), { recursive: true })
  await rejectsClearly(t, convertDcpToHf(v2, join(v2, 'model', 'hf'), c.model, c.tokenizer), /^ERR_DISTCP_/)
  t.deepEqual(listing(v2), ['model'])
})

test('an unknown dtype', async (t) => {
  const c = await getCase(true, 1)
  const { parent, out } = freshOut('bad-dtype')
  await rejectsClearly(t, convertDcpToHf(c.dcp, out, c.model, c.tokenizer, { dtype: 'float12' as 'float32' }), /^ERR_DISTCP_/, 'float12')
  t.deepEqual(listing(parent), [])
})

test('abort mid-way through an AbortSignal (aborted from onProgress after the first tensor)', async (t) => {
  const c = await getCase(false, 2)
  const { parent, out } = freshOut('abort')
  const ac = new AbortController()
  let calls = 0
  const p = convertDcpToHf(c.dcp, out, c.model, c.tokenizer, {
    signal: ac.signal,
    onProgress: (q) => {
      calls++
      if (q.tensorsDone >= 1) ac.abort()
    },
  })
  const e = await rejectsClearly(t, p, /ABORT/)
  t.log(`aborted: ${e?.code}: ${e?.message}`)
  t.true(calls >= 1)
  t.deepEqual(listing(parent), [], 'no output and no temporary folder')
  // an already aborted signal: nothing starts, and the error is the same kind as an abort mid-way
  const pre = freshOut('pre-aborted')
  await rejectsClearly(t, convertDcpToHf(c.dcp, pre.out, c.model, c.tokenizer, { signal: AbortSignal.abort() }), /ABORT/)
  t.deepEqual(listing(pre.parent), [])
})

/** A tiny filesystem: tmpfs if it mounts, else ext4 on a loop device; null and the reason otherwise. */
const smallFsProblem = (() => {
  if (mountProblem === null) return null
  const img = join(work, 'loop-probe.img')
  const dir = join(work, 'loop-probe')
  mkdirSync(dir, { recursive: true })
  const ok =
    spawnSync('truncate', ['-s', '1M', img]).status === 0 &&
    spawnSync('mkfs.ext4', ['-q', '-F', img]).status === 0 &&
    spawnSync('mount', ['-o', 'loop', img, dir]).status === 0
  if (ok) spawnSync('umount', [dir])
  return ok ? null : `${mountProblem}; a loop-device ext4 failed too`
})()
;(smallFsProblem === null ? test : test.skip)(
  `a full disk (64 KiB filesystem)${smallFsProblem === null ? '' : ` — NOT TESTED: ${smallFsProblem}`}`,
  async (t) => {
    const c = await getCase(true, 1)
    const full = join(work, 'full-disk')
    mkdirSync(full)
    if (mountProblem === null) {
      const m = spawnSync('mount', ['-t', 'tmpfs', '-o', 'size=64k', 'tmpfs', full], { encoding: 'utf8' })
      t.is(m.status, 0, m.stderr)
    } else {
      const img = join(work, 'full-disk.img')
      t.is(spawnSync('truncate', ['-s', '1M', img]).status, 0)
      t.is(spawnSync('mkfs.ext4', ['-q', '-F', img]).status, 0)
      t.is(spawnSync('mount', ['-o', 'loop', img, full]).status, 0)
      spawnSync('sh', ['-c', `dd if=/dev/zero of=${join(full, 'filler')} bs=4k 2>/dev/null; rm -rf ${join(full, 'lost+found')}`])
    }
    cleanups.push(() => spawnSync('umount', [full]))
    const before = listing(full)
    const out = join(full, 'hf')
    await rejectsClearly(t, convertDcpToHf(c.dcp, out, c.model, c.tokenizer), /^ERR_DISTCP_/, /space|ENOSPC/i)
    t.deepEqual(listing(full), before, 'no output and no temporary folder on the full disk')
  },
)

// ---------------------------------------------------------------------------------------------------------------
// CLI

function cli(args: string[]): Promise<PyResult> {
  return new Promise((resolve, reject) => {
    const p = spawn(process.execPath, [join(root, 'bin', 'distcp.js'), ...args], { cwd: root })
    let stdout = ''
    let stderr = ''
    p.stdout.on('data', (d) => (stdout += d))
    p.stderr.on('data', (d) => (stderr += d))
    p.on('error', reject)
    p.on('close', (status) => resolve({ status, stdout, stderr }))
  })
}

test('CLI: distcp convert … --json (exit 0, JSON summary), bad usage (exit 2), errors (exit 1)', async (t) => {
  if (!existsSync(join(root, 'dist', 'cli.js')) || statSync(join(root, 'dist', 'cli.js')).mtimeMs < statSync(join(root, 'src', 'cli.ts')).mtimeMs) {
    t.log('dist/ is older than src/: run `npm run build` (bin/distcp.js runs the built JS)')
  }
  const c = await getCase(false, 2)
  const { out } = freshOut('cli')
  const r = await cli(['convert', c.dcp, out, '--config', c.model, '--tokenizer', c.tokenizer, '--dtype', 'bf16', '--max-shard-size', '50KB', '--json'])
  t.is(r.status, 0, r.stderr)
  const summary = JSON.parse(r.stdout) as { output: string; files: string[]; tensors: number; bytes: number }
  t.is(summary.output, out)
  t.is(summary.tensors, c.parameters.length)
  t.deepEqual([...summary.files].sort(), listing(out))
  await checkWithTransformers(t, out, c, 'bfloat16')

  // bad usage → 2
  t.is((await cli(['convert'])).status, 2)
  t.is((await cli(['convert', c.dcp, join(work, 'cli-x')])).status, 2, 'no --config')
  t.is((await cli(['convert', c.dcp, join(work, 'cli-x'), '--config', c.model, '--bogus'])).status, 2)
  t.false(existsSync(join(work, 'cli-x')))
  // errors → 1, message on stderr
  const exists = await cli(['convert', c.dcp, out, '--config', c.model])
  t.is(exists.status, 1)
  t.true(exists.stderr.includes(`HF checkpoint already exists at ${out}. Delete it to run or set overwrite=True.`), exists.stderr)
  const missing = await cli(['convert', join(work, 'nope'), join(work, 'cli-y'), '--config', c.model])
  t.is(missing.status, 1)
  t.true(missing.stderr.includes('No metadata file found'), missing.stderr)
  t.false(existsSync(join(work, 'cli-y')))
  // --dry-run writes nothing
  const dry = await cli(['convert', c.dcp, join(work, 'cli-dry'), '--config', c.model, '--dry-run'])
  t.is(dry.status, 0, dry.stderr)
  t.false(existsSync(join(work, 'cli-dry')))
})
