import test, { type ExecutionContext } from 'ava'
import { spawn, spawnSync } from 'node:child_process'
import { cpSync, existsSync, mkdirSync, mkdtempSync, readFileSync, readdirSync, renameSync, rmSync, symlinkSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

import { convertDcpToHf, openCheckpoint, save, DistcpError } from '../src/index.js'
import { readSafetensors, root, runPython } from './helpers.js'
import { smallState } from './save-child.js'

// "Nothing a user had is lost": conversions write into a folder without deleting what distcp did not write, never
// over their input; saves and conversions lock their folder; a kill -9 at any point of a commit leaves the old or
// the new files, and the next run finishes or cleans up what the dead writer left.

const work = mkdtempSync(join(tmpdir(), 'distcp-data-loss-'))
test.after.always(() => {
  if (!process.env.DISTCP_KEEP_TMP) rmSync(work, { recursive: true, force: true })
})

const CHILD = join(root, '__test__', 'data-loss-child.ts')
const TENSORS = ['model.b', 'model.w', 'optim.state.w.exp_avg', 'optim.state.w.step']

function listing(dir: string): string[] {
  return readdirSync(dir).sort()
}

interface ChildResult {
  status: number | null
  signal: NodeJS.Signals | null
  stdout: string
  stderr: string
}

function child(args: string[], env: Record<string, string> = {}): ChildResult {
  const r = spawnSync(process.execPath, ['--import', '@oxc-node/core/register', CHILD, ...args], {
    cwd: root,
    encoding: 'utf8',
    env: { ...process.env, ...env },
    timeout: 120_000,
  })
  return { status: r.status, signal: r.signal, stdout: r.stdout, stderr: r.stderr }
}

let releases = 0
/**
 * A child that has reached `DISTCP_TEST_PAUSE_AT=point` (it says so on stderr) and waits there until `release()`
 * (or two minutes): however slowly a loaded machine starts the writers raced against it, they meet it paused.
 */
async function pausedChild(args: string[], point: string): Promise<{ done: Promise<ChildResult>; pid: number; release: () => void }> {
  const releaseFile = join(work, `release-${process.pid}-${releases++}`)
  const p = spawn(process.execPath, ['--import', '@oxc-node/core/register', CHILD, ...args], {
    cwd: root,
    env: { ...process.env, DISTCP_TEST_PAUSE_AT: point, DISTCP_TEST_PAUSE_MS: '120000', DISTCP_TEST_PAUSE_RELEASE: releaseFile },
  })
  let stdout = ''
  let stderr = ''
  p.stdout.on('data', (d) => (stdout += d))
  const done = new Promise<ChildResult>((resolve) => p.on('close', (status, signal) => resolve({ status, signal, stdout, stderr })))
  await new Promise<void>((resolve, reject) => {
    p.stderr.on('data', (d) => {
      stderr += d
      if (stderr.includes(`paused at ${point}`)) resolve()
    })
    p.on('close', () => reject(new Error(`the child ended before ${point}: ${stderr}`)))
  })
  return { done, pid: p.pid!, release: () => writeFileSync(releaseFile, '') }
}

/** The step a checkpoint holds, read by distcp. */
async function stepOf(ckpt: string): Promise<number> {
  const ck = await openCheckpoint(ckpt)
  try {
    return Number(await ck.readObject('step'))
  } finally {
    ck.close()
  }
}

/** torch loads the checkpoint (dcp.load and dcp_to_torch_save) and sees `step`. */
function torchStep(ckpt: string, name: string): number {
  const dir = join(work, `torch-${name}`)
  const summary = JSON.parse(runPython(['interop/load_with_torch.py', ckpt, dir]).trim().split('\n').at(-1)!) as { methods: Record<string, string> }
  if (summary.methods.dcp_load !== 'ok' || summary.methods.dcp_to_torch_save !== 'ok') throw new Error(`torch: ${JSON.stringify(summary.methods)}`)
  const expected = JSON.parse(readFileSync(join(dir, 'dcp_load', 'expected.json'), 'utf8')) as { objects: { step: { v: string } } }
  return Number(expected.objects.step.v)
}

/** A DCP checkpoint (variant `v`), a model folder with a config, and the bytes each output tensor must have. */
async function convertCase(name: string, v: number): Promise<{ dcp: string; model: string; want: Map<string, Uint8Array> }> {
  const dcp = join(work, `${name}-dcp${v}`)
  await save(smallState(v), { checkpointId: dcp })
  const model = join(work, `${name}-model`)
  mkdirSync(model, { recursive: true })
  writeFileSync(join(model, 'config.json'), JSON.stringify({ model_type: 'toy', torch_dtype: 'float32' }))
  const ck = await openCheckpoint(dcp)
  const want = new Map<string, Uint8Array>()
  for (const k of TENSORS) want.set(k, new Uint8Array((await ck.read(k)).data))
  ck.close()
  return { dcp, model, want }
}

function weightsOf(out: string): Map<string, Uint8Array> {
  return readSafetensors(join(out, 'model.safetensors'))
}

function sameWeights(t: ExecutionContext, out: string, want: Map<string, Uint8Array>, msg: string): void {
  const got = weightsOf(out)
  t.deepEqual([...got.keys()].sort(), [...want.keys()].sort(), msg)
  for (const [k, v] of want) t.deepEqual(got.get(k), v, `${msg}: ${k}`)
}

const USER_FILES: Record<string, string> = {
  'thesis.tex': '\\documentclass{article} % four years of work',
  'data/x.csv': '1,2,3\n',
  'notes.safetensors': 'not listed in any index: not distcp\'s',
}

function addUserFiles(out: string): void {
  for (const [f, body] of Object.entries(USER_FILES)) {
    mkdirSync(join(out, f, '..'), { recursive: true })
    writeFileSync(join(out, f), body)
  }
}

function userFilesIntact(t: ExecutionContext, out: string, msg: string): void {
  for (const [f, body] of Object.entries(USER_FILES)) t.is(readFileSync(join(out, f), 'utf8'), body, `${msg}: ${f}`)
}

test('--overwrite replaces only what distcp writes: user files survive, stale shards of the old index go', async (t) => {
  const a = await convertCase('keep', 1)
  const b = await convertCase('keep', 2)
  const out = join(work, 'keep-out')
  await convertDcpToHf(a.dcp, out, a.model, undefined, { onWarning: () => undefined })
  addUserFiles(out)
  // an earlier sharded output (transformers or distcp) listed its shards in the index
  writeFileSync(join(out, 'model-00001-of-00002.safetensors'), 'old shard 1')
  writeFileSync(join(out, 'model-00002-of-00002.safetensors'), 'old shard 2')
  writeFileSync(join(out, 'model.safetensors.index.json'), JSON.stringify({
    metadata: { total_size: 1 },
    weight_map: { x: 'model-00001-of-00002.safetensors', y: 'model-00002-of-00002.safetensors', z: 'thesis.tex', e: '../escape.safetensors' },
  }))
  writeFileSync(join(work, 'escape.safetensors'), 'outside')
  await convertDcpToHf(b.dcp, out, b.model, undefined, { overwrite: true, onWarning: () => undefined })
  t.deepEqual(listing(out), ['config.json', 'data', 'model.safetensors', 'notes.safetensors', 'thesis.tex'])
  userFilesIntact(t, out, 'after overwrite')
  t.true(existsSync(join(work, 'escape.safetensors')), 'an index entry outside the folder is never followed')
  sameWeights(t, out, b.want, 'the new weights')

  // a regular file at the output path is refused, with or without overwrite, and left alone
  const file = join(work, 'keep-file')
  writeFileSync(file, 'a file, not a folder')
  const e = await t.throwsAsync(convertDcpToHf(b.dcp, file, b.model, undefined, { overwrite: true, onWarning: () => undefined }), { instanceOf: DistcpError })
  t.is(e?.code, 'ERR_DISTCP_NOT_A_DIRECTORY', e?.message)
  t.true(e?.message.includes(file), e?.message)
  t.is(readFileSync(file, 'utf8'), 'a file, not a folder')
})

test('an output that is, contains or lies inside the input is refused whatever the flags; the input survives', async (t) => {
  const c = await convertCase('overlap', 1)
  const x = join(work, 'X')
  cpSync(c.dcp, join(x, 'dcp'), { recursive: true })
  const before = listing(join(x, 'dcp'))
  symlinkSync(x, join(work, 'X-link'))
  for (const out of [x, join(x, 'dcp'), join(x, 'dcp', 'hf'), join(work, 'X-link'), join(work, 'X-link', 'dcp', '..', 'dcp')]) {
    for (const overwrite of [true, false]) {
      const e = await t.throwsAsync(convertDcpToHf(join(x, 'dcp'), out, c.model, undefined, { overwrite, onWarning: () => undefined }), { instanceOf: DistcpError })
      t.is(e?.code, 'ERR_DISTCP_OUTPUT_OVERLAPS_INPUT', `${out}: ${e?.message}`)
    }
  }
  // the CLI's way: `distcp convert X/dcp X --overwrite` (the child converts with overwrite)
  const r = child(['convert', join(x, 'dcp'), x, c.model])
  t.is(r.status, 3, r.stderr)
  t.regex(r.stdout, /^error ERR_DISTCP_OUTPUT_OVERLAPS_INPUT /)
  t.deepEqual(listing(join(x, 'dcp')), before)
  t.deepEqual(listing(x), ['dcp'])
  t.is(await stepOf(join(x, 'dcp')), 1)
})

test('concurrent saves: the second writer fails fast with ERR_DISTCP_LOCKED naming the folder and the holder; nothing is lost', async (t) => {
  const ckpt = join(work, 'race')
  await save(smallState(1), { checkpointId: ckpt })
  const a = await pausedChild(['save', ckpt, '2'], 'save:beforeCommit')
  // a second writer that waited for the lock would succeed once the first is done: LOCKED proves it did not wait
  // (a wall-clock bound here was flaky on a loaded machine, where starting node alone can take seconds)
  const b = child(['save', ckpt, '3'])
  t.is(b.status, 3, b.stderr)
  t.regex(b.stdout, /^error ERR_DISTCP_LOCKED /)
  t.true(b.stdout.includes(ckpt) && b.stdout.includes(`pid ${a.pid}`), b.stdout)
  // saveCheckpoint and convert into the same folder are refused too
  const c = child(['saveCheckpoint', ckpt, '4'])
  t.regex(c.stdout, /^error ERR_DISTCP_LOCKED /)
  a.release()
  const ra = await a.done
  t.is(ra.status, 0, ra.stderr)
  t.is(ra.stdout.trim(), 'ok')
  t.deepEqual(listing(ckpt), ['.metadata', '__0_0.distcp'])
  t.is(await stepOf(ckpt), 2)
  t.is(torchStep(ckpt, 'race'), 2)

  // unpaused races: every pair ends with one or two successes and a checkpoint of a successful writer
  const racing = join(work, 'race2')
  await save(smallState(1), { checkpointId: racing })
  for (let i = 0; i < 6; i++) {
    const spawnSave = (v: number) =>
      new Promise<ChildResult>((resolve) => {
        const p = spawn(process.execPath, ['--import', '@oxc-node/core/register', CHILD, 'save', racing, String(v)], { cwd: root })
        let stdout = ''
        p.stdout.on('data', (d) => (stdout += d))
        p.on('close', (status, signal) => resolve({ status, signal, stdout, stderr: '' }))
      })
    const [r1, r2] = await Promise.all([spawnSave(10 + i), spawnSave(20 + i)])
    const ok = [r1, r2].map((r, j) => (r.stdout.trim() === 'ok' ? [10 + i, 20 + i][j] : null)).filter((v) => v !== null)
    for (const r of [r1, r2]) t.true(r.stdout.trim() === 'ok' || r.stdout.startsWith('error ERR_DISTCP_LOCKED '), r.stdout)
    t.true(ok.length >= 1)
    t.true(ok.includes(await stepOf(racing)), `round ${i}: the checkpoint is one a writer reported`)
    t.deepEqual(listing(racing), ['.metadata', '__0_0.distcp'])
  }
  t.is(torchStep(racing, 'race2'), await stepOf(racing))
})

test('a conversion holds the output folder: a second one fails with ERR_DISTCP_LOCKED, the first completes', async (t) => {
  const c = await convertCase('conv-lock', 1)
  const out = join(work, 'conv-lock-out')
  mkdirSync(out)
  addUserFiles(out)
  const a = await pausedChild(['convert', c.dcp, out, c.model], 'convert:staged')
  const b = child(['convert', c.dcp, out, c.model])
  t.regex(b.stdout, /^error ERR_DISTCP_LOCKED /)
  t.true(b.stdout.includes(`pid ${a.pid}`), b.stdout)
  a.release()
  const ra = await a.done
  t.is(ra.stdout.trim(), 'ok', ra.stderr)
  t.deepEqual(listing(out), ['config.json', 'data', 'model.safetensors', 'notes.safetensors', 'thesis.tex'])
  userFilesIntact(t, out, 'after a locked-out second writer')
  sameWeights(t, out, c.want, 'first writer')
})

test('kill -9 at every commit point of a conversion: the old or the new output, rolled forward by the next run', async (t) => {
  const a = await convertCase('kill-conv', 1)
  const b = await convertCase('kill-conv', 2)
  const points: [string, 'old' | 'new'][] = [
    ['convert:staged', 'old'],
    ['convert:beforeJournal', 'old'],
    ['convert:afterJournal', 'new'],
    ['convert:afterFirstMove', 'new'],
    ['convert:beforeCleanup', 'new'],
    ['convert:afterCommit', 'new'],
  ]
  for (const [point, want] of points) {
    const out = join(work, `kill-${point.replace(':', '-')}`)
    await convertDcpToHf(a.dcp, out, a.model, undefined, { onWarning: () => undefined })
    addUserFiles(out)
    const r = child(['convert', b.dcp, out, b.model], { DISTCP_TEST_CRASH_AT: point })
    t.is(r.signal, 'SIGKILL', `${point}: ${r.stdout} ${r.stderr}`)
    // what a dead writer left is recovered by the next writer as soon as it holds the lock: a run that itself
    // dies right after staging shows the recovered state (the old output, or the new one rolled forward)
    const probe = child(['convert', a.dcp, out, a.model], { DISTCP_TEST_CRASH_AT: 'convert:staged' })
    t.is(probe.signal, 'SIGKILL', point)
    sameWeights(t, out, (want === 'old' ? a : b).want, `${point}: recovered to the ${want} output`)
    t.false(existsSync(join(out, '.distcp-journal')), point)
    userFilesIntact(t, out, point)
    // and the next full run leaves nothing behind
    const next = child(['convert', b.dcp, out, b.model])
    t.is(next.stdout.trim(), 'ok', next.stderr)
    t.deepEqual(listing(out), ['config.json', 'data', 'model.safetensors', 'notes.safetensors', 'thesis.tex'], point)
    sameWeights(t, out, b.want, `${point}: next run`)
  }
  // a killed first conversion into a new folder: the next run finishes it
  const fresh = join(work, 'kill-fresh')
  t.is(child(['convert', b.dcp, fresh, b.model], { DISTCP_TEST_CRASH_AT: 'convert:afterJournal' }).signal, 'SIGKILL')
  t.is(child(['convert', b.dcp, fresh, b.model]).stdout.trim(), 'ok')
  t.deepEqual(listing(fresh), ['config.json', 'model.safetensors'])
})

test('legacy leftovers of the old folder swap: a moved-aside output comes back when the output is missing', async (t) => {
  const a = await convertCase('legacy', 1)
  const parent = join(work, 'legacy-parent')
  const out = join(parent, 'hf')
  await convertDcpToHf(a.dcp, out, a.model, undefined, { onWarning: () => undefined })
  addUserFiles(out)
  // the old code's kill between rename(out → .out.distcp-old-*) and rename(tmp → out), by a process now dead
  renameSync(out, join(parent, '.hf.distcp-old-999999999-0badf00d'))
  mkdirSync(join(parent, '.hf.distcp-tmp-999999999-0badf00d'))
  const r = child(['convert', a.dcp, out, a.model], { DISTCP_TEST_CRASH_AT: 'convert:staged' })
  t.is(r.signal, 'SIGKILL')
  t.deepEqual(listing(parent), ['hf'])
  userFilesIntact(t, out, 'restored')
  sameWeights(t, out, a.want, 'restored')
})

test('kill -9 at every point of a save: the old or the new checkpoint (torch loads it), leftovers go with the next save', async (t) => {
  const points: [string, number][] = [
    ['save:locked', 1],
    ['save:afterFirstItem', 1],
    ['save:beforeCommit', 1],
    ['save:afterCommit', 2],
    ['save:afterLink', 2],
    ['save:afterFinalCommit', 2],
  ]
  for (const [point, want] of points) {
    const ckpt = join(work, `kill-${point.replace(':', '-')}`)
    await save(smallState(1), { checkpointId: ckpt })
    writeFileSync(join(ckpt, 'README.md'), 'mine')
    const r = child(['save', ckpt, '2'], { DISTCP_TEST_CRASH_AT: point })
    t.is(r.signal, 'SIGKILL', `${point}: ${r.stdout} ${r.stderr}`)
    t.is(await stepOf(ckpt), want, point)
    if (point === 'save:afterCommit') t.is(torchStep(ckpt, 'kill-after-commit'), 2)
    // the dead writer's lock does not block the next save, which removes its leftovers
    const s2 = child(['saveCheckpoint', ckpt, '3'])
    t.is(s2.stdout.trim(), 'ok', s2.stderr)
    t.deepEqual(listing(ckpt), ['.metadata', 'README.md', '__0_0.distcp'], point)
    t.is(readFileSync(join(ckpt, 'README.md'), 'utf8'), 'mine')
  }
})

test('a save never deletes a file that the old .metadata names unless it is a DCP data file (precious.txt)', async (t) => {
  const ckpt = join(work, 'precious')
  await save(smallState(1), { checkpointId: ckpt })
  // an old checkpoint whose .metadata names `precious.txt` as its data file (same length as `__0_0.distcp`,
  // so the pickle stays valid): it loads, and the file is also the user's
  const md = readFileSync(join(ckpt, '.metadata'))
  const from = Buffer.from('__0_0.distcp')
  let at = md.indexOf(from)
  t.true(at >= 0)
  while (at >= 0) {
    Buffer.from('precious.txt').copy(md, at)
    at = md.indexOf(from, at + 1)
  }
  writeFileSync(join(ckpt, '.metadata'), md)
  renameSync(join(ckpt, '__0_0.distcp'), join(ckpt, 'precious.txt'))
  t.is(await stepOf(ckpt), 1, 'the doctored checkpoint is valid')
  const precious = readFileSync(join(ckpt, 'precious.txt'))
  await save(smallState(2), { checkpointId: ckpt })
  t.deepEqual(listing(ckpt), ['.metadata', '__0_0.distcp', 'precious.txt'])
  t.deepEqual(readFileSync(join(ckpt, 'precious.txt')), precious)
  t.is(await stepOf(ckpt), 2)
})
