// Multi-rank conversion (`convertDcpToHf` with a process group), with Node ranks launched by
// `torchrun --no-python` (N = 2, 3): the output is byte-identical to a single-process conversion of the same
// checkpoint (every shard, the index, the config, the copied files); a rank that fails in the middle of its write
// fails every rank, and the earlier output in the folder is left as it was, with nothing staged left behind; a rank
// killed with SIGKILL fails the others, naming it (within the collective timeout; at once when it hosted the
// store), the earlier output stays, and the next conversion into the folder completes.
import test from 'ava'
import { spawn, spawnSync } from 'node:child_process'
import { mkdirSync, mkdtempSync, readFileSync, readdirSync, rmSync, statSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join, relative } from 'node:path'

import { convertDcpToHf, save, type DType } from '../src/index.js'
import { freePort, pythonPath, root, startRanks } from './helpers.js'

const work = mkdtempSync(join(tmpdir(), 'distcp-multirank-convert-'))
test.after.always(() => rmSync(work, { recursive: true, force: true }))
const torchrun = join(pythonPath(), '..', 'torchrun')
const worker = ['--import', '@oxc-node/core/register', join(root, '__test__', 'distributed-convert.ts')]
const MAX_SHARD = 10_000


/** torchrun with N Node ranks; the exit status does not matter (the reports say what each rank saw). */
async function run(n: number, args: string[], env: Record<string, string> = {}): Promise<void> {
  const port = await freePort()
  const r = spawnSync(torchrun, ['--nproc-per-node', String(n), '--master-port', String(port), '--no-python', 'node', ...worker, ...args], {
    cwd: root,
    encoding: 'utf8',
    timeout: 170_000,
    env: { ...process.env, OMP_NUM_THREADS: '1', ...env },
  })
  if (r.error) throw r.error
}

const reports = (prefix: string, n: number): { ok?: unknown[]; err?: { code: string; message: string; failures: Record<string, string> } }[] =>
  Array.from({ length: n }, (_, r) => JSON.parse(readFileSync(`${prefix}.${r}.json`, 'utf8')))

/** Every file under `dir` (relative path → bytes). */
function tree(dir: string): Map<string, Buffer> {
  const out = new Map<string, Buffer>()
  const walk = (d: string) => {
    for (const name of readdirSync(d).sort()) {
      const p = join(d, name)
      if (statSync(p).isDirectory()) walk(p)
      else out.set(relative(dir, p), readFileSync(p))
    }
  }
  walk(dir)
  return out
}

// the input: a checkpoint of mixed dtypes and sizes (so shards differ in size), a model folder with a config,
// a generation config and tokenizer files
const dcp = join(work, 'dcp')
const model = join(work, 'model')
test.before(async () => {
  const tensor = (dtype: DType, shape: number[], seed: number) => {
    const n = shape.reduce((a, b) => a * b, 1)
    const data = dtype === 'float32' ? new Float32Array(n) : new Uint16Array(n)
    for (let i = 0; i < n; i++) data[i] = dtype === 'float32' ? Math.sin(seed * 1000 + i) : (seed * 7919 + i * 31) & 0x3fff
    return { dtype, shape, data }
  }
  const layers: Record<string, unknown> = {}
  for (let l = 0; l < 6; l++) {
    layers[`model.layers.${l}.mlp.weight`] = tensor('float32', [48, 40], l)
    layers[`model.layers.${l}.norm.weight`] = tensor('bfloat16', [40], 10 + l)
  }
  await save(
    { model: { 'model.embed_tokens.weight': tensor('bfloat16', [96, 40], 99), ...layers, 'lm_head.weight': tensor('float16', [96, 40], 98) } },
    { checkpointId: dcp },
  )
  mkdirSync(model)
  writeFileSync(join(model, 'config.json'), JSON.stringify({ architectures: ['LlamaForCausalLM'], torch_dtype: 'float32', tie_word_embeddings: false }))
  writeFileSync(join(model, 'generation_config.json'), JSON.stringify({ do_sample: false }))
  writeFileSync(join(model, 'tokenizer.json'), JSON.stringify({ version: '1.0', model: { type: 'BPE' } }))
  writeFileSync(join(model, 'tokenizer_config.json'), JSON.stringify({ model_max_length: 128 }))
})

for (const [n, dtype] of [
  [2, ''],
  [3, 'bf16'],
] as const) {
  test.serial(`${n} Node ranks under torchrun convert to the same bytes as one process${dtype ? ` (casting to ${dtype})` : ''}`, async (t) => {
    const single = join(work, `single${n}`)
    await convertDcpToHf(dcp, single, model, undefined, { maxShardSize: MAX_SHARD, dtype: dtype || undefined, onWarning: () => undefined })
    const want = tree(single)
    // several shards per rank, an index, the config and the copied files
    t.true([...want.keys()].filter((f) => f.endsWith('.safetensors')).length > n)
    t.true(want.has('model.safetensors.index.json'))

    const out = join(work, `multi${n}`)
    await run(n, [dcp, out, model, join(work, `conv${n}`), String(MAX_SHARD), dtype])
    const reps = reports(join(work, `conv${n}`), n)
    for (const r of reps) t.truthy(r.ok, JSON.stringify(r))
    // every rank wrote a share, together all the tensors
    const done = reps.map((r) => (r.ok as { tensorsDone: number }[]).at(-1)?.tensorsDone ?? 0)
    t.true(done.every((d) => d > 0), JSON.stringify(done))
    t.is(done.reduce((a, b) => a + b, 0), 14)
    const got = tree(out)
    t.deepEqual([...got.keys()], [...want.keys()])
    for (const [f, bytes] of want) t.true(bytes.equals(got.get(f) as Buffer), f)
  })
}

test.serial('a rank failing in the middle of its write fails every rank; the earlier output stays and nothing is left staged', async (t) => {
  const out = join(work, 'multi3')
  const before = tree(out)
  t.true(before.size > 0, 'the 3-rank test above wrote it')
  await run(3, [dcp, out, model, join(work, 'fail'), String(MAX_SHARD), 'fp16'], { DISTCP_TEST_CONVERT_FAIL: '1' })
  for (const r of reports(join(work, 'fail'), 3)) {
    t.is(r.err?.code, 'ERR_DISTCP_RANK_FAILED', JSON.stringify(r))
    t.deepEqual(Object.keys(r.err?.failures ?? {}), ['1'])
    t.regex(r.err?.message ?? '', /step `convert-write`.*rank 1:.*injected failure on rank 1/)
  }
  // the same files with the same bytes, no temporary folder, no lock
  const after = tree(out)
  t.deepEqual([...after.keys()], [...before.keys()])
  for (const [f, bytes] of before) t.true(bytes.equals(after.get(f) as Buffer), f)
  t.deepEqual(readdirSync(out).filter((f) => f.startsWith('.')), [])
})

/** N ranks of the child started directly (torchrun would tear the others down when one dies); their exit codes. */
const ranks = (n: number, args: string[], env: Record<string, string> = {}) => startRanks(worker, n, args, env)

for (const victim of [1, 0]) {
  test.serial(`rank ${victim} killed (SIGKILL) after writing its share: the others fail naming it, the earlier output stays, the next conversion completes`, async (t) => {
    const out = join(work, `killed${victim}`)
    // an earlier output in the folder (cast to bf16, so it differs from what the killed run writes)
    await run(3, [dcp, out, model, join(work, `kill${victim}a`), String(MAX_SHARD), 'bf16'])
    for (const r of reports(join(work, `kill${victim}a`), 3)) t.truthy(r.ok, JSON.stringify(r))
    const before = tree(out)
    t.true(before.has('model.safetensors.index.json'))

    const t0 = Date.now()
    const codes = await ranks(3, [dcp, out, model, join(work, `kill${victim}b`), String(MAX_SHARD), ''], { DISTCP_TEST_CONVERT_KILL: String(victim) })
    t.deepEqual(codes, [0, 1, 2].map((r) => (r === victim ? null : 0)))
    t.true(Date.now() - t0 < 60_000, 'within the collective timeout, not a hang')
    for (const r of [0, 1, 2].filter((r) => r !== victim)) {
      const rep = JSON.parse(readFileSync(join(work, `kill${victim}b.${r}.json`), 'utf8')) as { err?: { code: string; message: string; failures: Record<string, string> } }
      t.is(rep.err?.code, 'ERR_DISTCP_RANK_FAILED', JSON.stringify(rep))
      t.deepEqual(Object.keys(rep.err?.failures ?? {}), [String(victim)])
      // rank 0 hosted the store: the others lose it at once (no timeout to wait for), and say so; a rank still
      // reading the plan's result when rank 0 died reports the plan step
      const why = victim === 0 ? `rank 0: it hosted the store 127\\.0\\.0\\.1:\\d+, which closed` : `rank ${victim}: did not report within 4000 ms`
      t.regex(rep.err?.message ?? '', new RegExp(`step \`convert-(plan|write)\`.*${why}`))
    }
    // the earlier output, byte for byte; only a dead rank 0 leaves anything more (its staged folder and lock, hidden)
    const visible = (m: Map<string, Buffer>) => new Map([...m].filter(([f]) => !f.startsWith('.')))
    const after = visible(tree(out))
    t.deepEqual([...after.keys()], [...before.keys()])
    for (const [f, bytes] of before) t.true(bytes.equals(after.get(f) as Buffer), f)
    if (victim !== 0) t.deepEqual(readdirSync(out).filter((f) => f.startsWith('.')), [])

    // the next conversion into the folder completes (a dead writer's leftovers are its to clean up)
    await run(3, [dcp, out, model, join(work, `kill${victim}c`), String(MAX_SHARD), ''])
    for (const r of reports(join(work, `kill${victim}c`), 3)) t.truthy(r.ok, JSON.stringify(r))
    const plain = join(work, `single-plain${victim}`)
    await convertDcpToHf(dcp, plain, model, undefined, { maxShardSize: MAX_SHARD, onWarning: () => undefined })
    const want = tree(plain)
    const got = tree(out)
    t.deepEqual([...got.keys()], [...want.keys()])
    for (const [f, bytes] of want) t.true(bytes.equals(got.get(f) as Buffer), f)
  })
}

test.serial('`distcp convert` under torchrun (RANK, WORLD_SIZE from the launcher) writes the same bytes as one process', async (t) => {
  const single = join(work, 'single2')
  const out = join(work, 'cli2')
  const port = await freePort()
  const bin = join(root, 'bin', 'distcp.js')
  const r = spawnSync(
    torchrun,
    ['--nproc-per-node', '2', '--master-port', String(port), '--no-python', 'node', bin, 'convert', dcp, out, '--config', model, '--max-shard-size', String(MAX_SHARD)],
    { cwd: root, encoding: 'utf8', timeout: 170_000, env: { ...process.env, OMP_NUM_THREADS: '1' } },
  )
  t.is(r.status, 0, r.stderr.slice(-3000))
  // one summary, from rank 0
  t.is(r.stdout.match(/^wrote /gm)?.length, 1, r.stdout)
  const want = tree(single)
  const got = tree(out)
  t.deepEqual([...got.keys()], [...want.keys()])
  for (const [f, bytes] of want) t.true(bytes.equals(got.get(f) as Buffer), f)
})

// Any launcher, or none: `--rank R --world W --master-addr --master-port` on two plain processes (no torchrun, no
// RANK/WORLD_SIZE in their environment); rank 0 hosts the store.
test.serial('`distcp convert --rank R --world 2 --master-addr --master-port` on two plain processes writes the same bytes as one process', async (t) => {
  const single = join(work, 'single-flags')
  await convertDcpToHf(dcp, single, model, undefined, { maxShardSize: MAX_SHARD })
  const out = join(work, 'cli-flags')
  const port = await freePort()
  const bin = join(root, 'bin', 'distcp.js')
  const env: NodeJS.ProcessEnv = { ...process.env }
  for (const k of ['RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT', 'TORCHELASTIC_USE_AGENT_STORE']) delete env[k]
  const ranks = await Promise.all(
    [0, 1].map(
      (rank) =>
        new Promise<{ code: number | null; stdout: string; stderr: string }>((resolve, reject) => {
          const args = [bin, 'convert', dcp, out, '--config', model, '--max-shard-size', String(MAX_SHARD), '--rank', String(rank), '--world', '2', '--master-addr', '127.0.0.1', '--master-port', String(port)]
          const p = spawn(process.execPath, args, { cwd: root, env })
          let stdout = ''
          let stderr = ''
          p.stdout.on('data', (d: Buffer) => (stdout += d.toString()))
          p.stderr.on('data', (d: Buffer) => (stderr += d.toString()))
          p.on('error', reject)
          const timer = setTimeout(() => p.kill('SIGKILL'), 170_000)
          p.on('close', (code) => {
            clearTimeout(timer)
            resolve({ code, stdout, stderr })
          })
        }),
    ),
  )
  for (const r of ranks) t.is(r.code, 0, r.stderr.slice(-3000))
  t.is(ranks.map((r) => r.stdout.match(/^wrote /gm)?.length ?? 0).join(','), '1,0', 'one summary, from rank 0')
  const want = tree(single)
  const got = tree(out)
  t.deepEqual([...got.keys()], [...want.keys()])
  for (const [f, bytes] of want) t.true(bytes.equals(got.get(f) as Buffer), f)
})
