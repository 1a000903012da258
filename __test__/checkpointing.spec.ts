import test, { type ExecutionContext } from 'ava'
import { spawnSync } from 'node:child_process'
import { existsSync, mkdtempSync, readFileSync, readdirSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

import * as distcp from '../src/index.js'
import {
  DistcpError,
  LoadMismatchError,
  ModelState,
  OptimizerState,
  PyFloat,
  PyTuple,
  load,
  loadCheckpoint,
  openCheckpoint,
  saveCheckpoint,
  type Model,
  type Parameter,
  type StateDict,
  type StateValue,
  type Tensor,
} from '../src/index.js'
import {
  Adam,
  AdamW,
  F32Parameter,
  StepLR,
  TinyMLP,
  createRun,
  evalLoss,
  trainStep,
  uniform,
} from '../examples/tiny-trainer/index.js'
import { diffTyped, floatFromHex, loadExpected, root, runPython, type Typed } from './helpers.js'

const hasSave = typeof (distcp as Record<string, unknown>).save === 'function'
const tmp = (name: string): string => mkdtempSync(join(tmpdir(), `distcp-ckpt-${name}-`))
const FQNS = ['0.weight', '0.bias', '1.weight', '1.bias', '3.weight', '3.bias']

const sameBytes = (a: Uint8Array, b: Uint8Array): boolean =>
  a.byteLength === b.byteLength && Buffer.compare(Buffer.from(a.buffer, a.byteOffset, a.byteLength), Buffer.from(b.buffer, b.byteOffset, b.byteLength)) === 0

const isTensorLike = (v: unknown): v is Tensor => typeof v === 'object' && v !== null && 'dtype' in v && 'data' in v

/** The seed's get_dummy_state_dict: every tensor replaced by random values of its shape, the rest kept. */
function dummy(v: StateValue, seed: { n: number }): StateValue {
  if (isTensorLike(v)) {
    const n = v.shape.reduce((a, b) => a * b, 1)
    const data = new Uint8Array(uniform(99, seed.n++, n).buffer)
    return { dtype: 'float32', shape: [...v.shape], data }
  }
  if (Array.isArray(v)) return v.map((x) => dummy(x, seed))
  if (typeof v === 'object' && v !== null && !(v instanceof PyFloat) && !(v instanceof PyTuple) && !(v instanceof Map) && !(v instanceof Uint8Array)) {
    return Object.fromEntries(Object.entries(v).map(([k, x]) => [k, dummy(x as StateValue, seed)]))
  }
  return v
}

/** The seed's check_dict_equality, exact: iterates `a`'s keys; tensors byte-equal, everything else deep-equal. */
function assertSameState(t: ExecutionContext, a: StateValue, b: StateValue, at = ''): void {
  if (isTensorLike(a)) {
    t.true(isTensorLike(b) && a.dtype === b.dtype && a.shape.join() === b.shape.join() && sameBytes(a.data, b.data), `${at}: tensors differ`)
    return
  }
  if (typeof a === 'object' && a !== null && !Array.isArray(a) && !(a instanceof PyFloat) && !(a instanceof PyTuple) && !(a instanceof Map)) {
    t.true(typeof b === 'object' && b !== null, `${at}: not a dict`)
    for (const [k, v] of Object.entries(a)) assertSameState(t, v as StateValue, (b as Record<string, StateValue>)[k], `${at}.${k}`)
    return
  }
  t.deepEqual(b, a, at)
}

/** NeMo-RL's mock_experiment: ModuleList([Linear(4,4), LayerNorm(4), ReLU(), Linear(4,1)]), Adam(lr=0.001), StepLR(1, 0.1). */
function mockExperiment(seed = 0): { model: TinyMLP; optimizer: Adam; scheduler: StepLR } {
  const model = new TinyMLP({ inFeatures: 4, hidden: 4, outFeatures: 1, seed })
  const optimizer = new Adam(model.namedParameters().map(([, p]) => p), { lr: 0.001 })
  const scheduler = new StepLR(optimizer, { stepSize: 1, gamma: 0.1 })
  return { model, optimizer, scheduler }
}

const f32Values = (t: Tensor): number[] => [...new Float32Array(new Uint8Array(t.data).buffer)]

// ---------------------------------------------------------------------------------------------------------------
// The seed's unit tests (tests/unit/utils/test_native_checkpoint.py), translated

test('seed test_model_state: ModelState keys, load a dummy, read it back', async (t) => {
  const { model } = mockExperiment()
  const state = new ModelState(model)
  const sd = state.stateDict()
  t.deepEqual(new Set(Object.keys(sd)), new Set(FQNS))
  const d = dummy(sd, { n: 0 }) as StateDict
  await state.loadStateDict(d)
  assertSameState(t, d, state.stateDict())
})

test('seed test_optimizer_state: {optim, sched}, FQN-keyed state materialised for a never-stepped optimizer', async (t) => {
  const { model, optimizer, scheduler } = mockExperiment()
  const before = model.namedParameters().map(([, p]) => new Uint8Array(p.data))
  const state = new OptimizerState(model, optimizer, scheduler)
  const sd = state.stateDict()
  t.deepEqual(new Set(Object.keys(sd)), new Set(['optim', 'sched']))
  const optim = sd.optim as { state: Record<string, Record<string, Tensor>>; param_groups: Record<string, StateValue>[] }
  t.deepEqual(Object.keys(optim.state), FQNS)
  for (const fqn of FQNS) {
    t.deepEqual(Object.keys(optim.state[fqn]), ['step', 'exp_avg', 'exp_avg_sq'])
    t.deepEqual(f32Values(optim.state[fqn].step), [1]) // torch's _init_optim_state took one step…
    t.true(f32Values(optim.state[fqn].exp_avg).every((x) => x === 0))
  }
  // …with lr 0 (parameters unchanged), then restored lr and dropped the gradients
  model.namedParameters().forEach(([, p], i) => t.true(sameBytes(p.data, before[i])))
  t.is(optimizer.paramGroups[0].lr, 0.001)
  t.true(model.namedParameters().every(([, p]) => p.grad === null))
  t.deepEqual(optim.param_groups[0].params, FQNS)
  t.deepEqual(optim.param_groups[0].betas, new PyTuple([new PyFloat(0.9), new PyFloat(0.999)]))
  t.deepEqual(optim.param_groups[0].lr, new PyFloat(0.001))
  t.is(optim.param_groups[0].weight_decay, 0) // torch's Adam default is the int 0

  const d = dummy(sd, { n: 100 }) as StateDict
  state.loadStateDict(d)
  assertSameState(t, d, state.stateDict())
})

test('seed test_save_and_load_model_only: exactly .metadata and __0_0.distcp', async (t) => {
  if (!hasSave) return t.pass('save() has not landed yet')
  const dir = tmp('model-only')
  const { model } = mockExperiment()
  await saveCheckpoint(model, join(dir, 'test_model_only'))
  t.true(existsSync(join(dir, 'test_model_only')))
  t.false(existsSync(join(dir, 'test_model_only-hf')))
  t.deepEqual(readdirSync(join(dir, 'test_model_only')).sort(), ['.metadata', '__0_0.distcp'].sort())
  rmSync(dir, { recursive: true })
})

test('seed test_save_and_load_model_and_optimizer: model, Adam and StepLR restored exactly', async (t) => {
  if (!hasSave) return t.pass('save() has not landed yet')
  const dir = tmp('model-and-optimizer')
  const { model, optimizer, scheduler } = mockExperiment()
  for (let i = 0; i < 5; i++) scheduler.step()
  const base = join(dir, 'model_and_optimizer')
  await saveCheckpoint(model, join(base, 'model'), { optimizer, scheduler, optimizerPath: join(base, 'optimizer') })
  for (const sub of ['model', 'optimizer']) t.deepEqual(readdirSync(join(base, sub)).sort(), ['.metadata', '__0_0.distcp'].sort())

  const fresh = new TinyMLP({ inFeatures: 4, hidden: 4, outFeatures: 1, seed: 1 })
  fresh.p('0.weight').values.fill(1)
  fresh.p('0.bias').values.fill(1)
  const newOptimizer = new Adam(fresh.namedParameters().map(([, p]) => p), { lr: 0.001 })
  const newScheduler = new StepLR(newOptimizer, { stepSize: 4, gamma: 0.2 })
  await loadCheckpoint(fresh, join(base, 'model'), { optimizer: newOptimizer, scheduler: newScheduler, optimizerPath: join(base, 'optimizer') })

  t.deepEqual(newScheduler.stateDict(), scheduler.stateDict())
  t.is(newScheduler.stateDict().last_epoch, 5)
  assertSameState(t, model.stateDict(), fresh.stateDict())
  assertSameState(t, optimizer.stateDict() as unknown as StateDict, newOptimizer.stateDict() as unknown as StateDict)
  t.deepEqual(newOptimizer.stateDict().param_groups, optimizer.stateDict().param_groups)
  t.deepEqual(newOptimizer.paramGroups[0].lr, new PyFloat(scheduler.getLastLr()[0]))
  rmSync(dir, { recursive: true })
})

test('saveCheckpoint saves the tokenizer when asked: a folder copied verbatim, or savePretrained(dir)', async (t) => {
  if (!hasSave) return t.pass('save() has not landed yet')
  const dir = tmp('tokenizer')
  const { model } = mockExperiment()
  const src = join(root, 'examples', 'tiny-llama', 'tokenizer')
  const lines: string[] = []
  await saveCheckpoint(model, join(dir, 'weights'), { tokenizer: src, tokenizerPath: join(dir, 'tokenizer'), log: (l) => lines.push(l) })
  t.deepEqual(readdirSync(join(dir, 'tokenizer')).sort(), readdirSync(src).sort())
  for (const f of readdirSync(src)) t.true(readFileSync(join(dir, 'tokenizer', f)).equals(readFileSync(join(src, f))), f)
  t.deepEqual(lines, [`Saving tokenizer (or processor) to ${join(dir, 'tokenizer')}`])

  const calls: string[] = []
  await saveCheckpoint(model, join(dir, 'weights2'), { tokenizer: { savePretrained: (d: string) => calls.push(d) }, tokenizerPath: '/some/tokenizer/path' })
  t.deepEqual(calls, ['/some/tokenizer/path'])
  rmSync(dir, { recursive: true })
})

test('the seed’s errors: optimizerPath / tokenizerPath missing (after the weights are written, as in the seed)', async (t) => {
  if (!hasSave) return t.pass('save() has not landed yet')
  const dir = tmp('errors')
  const { model, optimizer } = mockExperiment()
  const e1 = await t.throwsAsync(saveCheckpoint(model, join(dir, 'w1'), { optimizer }), { instanceOf: DistcpError })
  t.is(e1?.message, 'optimizerPath must be provided when saving optimizer state')
  t.true(existsSync(join(dir, 'w1', '.metadata')))
  const e2 = await t.throwsAsync(saveCheckpoint(model, join(dir, 'w2'), { tokenizer: { savePretrained: () => undefined } }))
  t.is(e2?.message, 'tokenizerPath must be provided when saving tokenizer state')
  const e3 = await t.throwsAsync(loadCheckpoint(model, join(dir, 'w1'), { optimizer }))
  t.is(e3?.message, 'optimizerPath must be provided when loading optimizer state')
  rmSync(dir, { recursive: true })
})

// ---------------------------------------------------------------------------------------------------------------
// PyTorch → Node: torch trains and saves the seed's way, the tiny trainer resumes

interface TorchTrain {
  torch_version: string
  cpu_capability: string
  model: Typed
  optim: Typed
  optimizer_raw: Typed
  next: {
    loss: string
    grads: Record<string, { dtype: 'float32'; shape: number[]; hex: string }>
    params_after: Record<string, Typed>
    optim_after: Typed
    loss_after: string
  }
}

const STEPS = 6
const relClose = (a: number, b: number, tol = 1e-5): boolean => Math.abs(a - b) <= tol * Math.abs(b)

for (const optimizer of ['adamw', 'adam'] as const) {
  test(`PyTorch → Node (${optimizer}): torch's checkpoint loads bit for bit, the next step agrees`, async (t) => {
    const dir = tmp(`torch-${optimizer}`)
    runPython(['interop/tiny_trainer.py', 'torch-train', '--out', dir, '--steps', String(STEPS), '--optimizer', optimizer])
    const want = JSON.parse(readFileSync(join(dir, 'torch-train.json'), 'utf8')) as TorchTrain
    const resume = async (seed: number) => {
      const run = createRun({ seed, optimizer })
      const report = await loadCheckpoint(run.model, join(dir, 'weights'), {
        optimizer: run.optimizer,
        scheduler: run.scheduler,
        optimizerPath: join(dir, 'optimizer'),
      })
      return { run, report }
    }
    const { run, report } = await resume(1)
    t.deepEqual(report.weights, { missing: [], unexpected: [], mismatched: [], layout: '2.4' })

    // every tensor and hyper-parameter, with Python's types, as torch has them
    const errors: string[] = []
    diffTyped(new ModelState(run.model).stateDict(), want.model, new Map(), 'model', errors)
    diffTyped(new OptimizerState(run.model, run.optimizer, run.scheduler).stateDict(), want.optim, new Map(), 'optim', errors)
    diffTyped(run.optimizer.stateDict(), want.optimizer_raw, new Map(), 'optimizer.state_dict()', errors)
    t.deepEqual(errors, [])

    // one more step: the loss before it and the loss after it agree with torch's
    const loss = trainStep(run, STEPS)
    t.true(relClose(loss, floatFromHex(want.next.loss)), `step loss ${loss} vs torch ${floatFromHex(want.next.loss)}`)
    const after = evalLoss(run, STEPS + 1)
    t.true(relClose(after, floatFromHex(want.next.loss_after)), `next loss ${after} vs torch ${floatFromHex(want.next.loss_after)}`)

    // the optimizer update itself is torch's: same gradients in, the same step/exp_avg/exp_avg_sq bit for bit and
    // parameters within one float32 ulp (torch's float32 sqrt on CPU goes through MKL's vsSqrt, which is not
    // correctly rounded: about 1 value in 6 is 1 ulp off, so `denom` can differ in its last bit)
    const exact = (await resume(2)).run
    for (const [fqn, p] of exact.model.namedParameters()) {
      const g = want.next.grads[fqn]
      p.grad = { dtype: 'float32', shape: g.shape, data: new Uint8Array(Buffer.from(g.hex, 'hex')) }
    }
    exact.optimizer.step()
    // (verified on torch's AVX-512 kernels; a build without FMA kernels would round lerp/addcmul twice)
    const optimAfter = (new OptimizerState(exact.model, exact.optimizer).stateDict() as { optim: { state: Record<string, Record<string, Tensor>> } }).optim
    if (want.cpu_capability === 'AVX512') {
      const stepErrors: string[] = []
      diffTyped(optimAfter, want.next.optim_after, new Map(), 'optim after step', stepErrors)
      t.deepEqual(stepErrors, [])
    }
    const wantState = (want.next.optim_after as { v: [Typed, Typed][] }).v.find(([k]) => (k as { v: string }).v === 'state')![1] as { v: [Typed, Typed][] }
    const pairs: [string, Tensor, string][] = exact.model.namedParameters().map(([fqn, p]) => [fqn, p, (want.next.params_after[fqn] as { hex: string }).hex])
    for (const [fk, fv] of wantState.v) {
      for (const [nk, nv] of (fv as { v: [Typed, Typed][] }).v) {
        const fqn = (fk as { v: string }).v
        const name = (nk as { v: string }).v
        pairs.push([`${fqn}.${name}`, optimAfter.state[fqn][name], (nv as { hex: string }).hex])
      }
    }
    let same = 0
    let total = 0
    for (const [what, ours, hex] of pairs) {
      const a = new Int32Array(new Uint8Array(ours.data).buffer)
      const b = new Int32Array(new Uint8Array(Buffer.from(hex, 'hex')).buffer)
      t.is(a.length, b.length, what)
      a.forEach((x, i) => {
        total++
        if (x === b[i]) same++
        else t.true(Math.abs(x - b[i]) <= 1, `${what}[${i}] is more than 1 ulp from torch's`)
      })
    }
    t.log(`${optimizer} (torch on ${want.cpu_capability}): ${same}/${total} parameter and state values bit-identical after the step, the rest 1 ulp away`)
    rmSync(dir, { recursive: true })
  })
}

// ---------------------------------------------------------------------------------------------------------------
// Node → PyTorch: the tiny trainer trains and saves, torch resumes with the seed's load_checkpoint

test('Node → PyTorch: torch loads model, AdamW, StepLR and tokenizer exactly; the next step agrees', async (t) => {
  if (!hasSave) return t.pass('save() has not landed yet')
  const dir = tmp('node')
  const run = createRun({ seed: 5 })
  for (let s = 0; s < STEPS; s++) trainStep(run, s)
  await saveCheckpoint(run.model, join(dir, 'weights'), {
    optimizer: run.optimizer,
    scheduler: run.scheduler,
    optimizerPath: join(dir, 'optimizer'),
    tokenizer: join(root, 'examples', 'tiny-llama', 'tokenizer'),
    tokenizerPath: join(dir, 'tokenizer'),
  })
  runPython(['interop/tiny_trainer.py', 'torch-resume', '--dir', dir, '--steps', String(STEPS), '--tokenizer'])
  const got = JSON.parse(readFileSync(join(dir, 'torch-resume.json'), 'utf8')) as TorchTrain & {
    sched: Typed
    tokenizer: { class: string; ids: number[] }
  }
  const errors: string[] = []
  diffTyped(new ModelState(run.model).stateDict(), got.model, new Map(), 'model', errors)
  diffTyped(new OptimizerState(run.model, run.optimizer, run.scheduler).stateDict(), got.optim, new Map(), 'optim', errors)
  diffTyped(run.optimizer.stateDict(), got.optimizer_raw, new Map(), 'optimizer.state_dict()', errors)
  diffTyped(run.scheduler.stateDict(), got.sched, new Map(), 'scheduler.state_dict()', errors)
  t.deepEqual(errors, [])
  t.true(got.tokenizer.ids.length > 0)

  const loss = trainStep(run, STEPS)
  t.true(relClose(loss, floatFromHex(got.next.loss)), `step loss ${loss} vs torch ${floatFromHex(got.next.loss)}`)
  const after = evalLoss(run, STEPS + 1)
  t.true(relClose(after, floatFromHex(got.next.loss_after)), `next loss ${after} vs torch ${floatFromHex(got.next.loss_after)}`)
  rmSync(dir, { recursive: true })
})

// ---------------------------------------------------------------------------------------------------------------
// Golden: what we write for the fixture's model and optimizer is what torch 2.15 wrote

function fixtureDir(name: string): string | null {
  const d = join(root, 'fixtures', 'torch-2.15.0', name)
  return existsSync(join(d, 'ckpt', '.metadata')) ? d : null
}

/** The fixture's run (interop/make_fixtures.py seed_experiment): AdamW(lr=1e-3, wd=0.01), StepLR(4, 0.2), 5 steps. */
function fixtureRun(seed = 0) {
  const run = createRun({ seed, lr: 1e-3, weightDecay: 0.01, stepSize: 4, gamma: 0.2 })
  for (let s = 0; s < 5; s++) trainStep(run, s)
  return run
}

test('golden: keys, dtypes, shapes, planner paths and every non-tensor value equal torch 2.15’s seed checkpoints', async (t) => {
  if (!hasSave) return t.pass('save() has not landed yet')
  const model = fixtureDir('seed-model')
  const optim = fixtureDir('seed-optim')
  if (!model || !optim) return t.fail('fixtures/torch-2.15.0/seed-model and seed-optim are missing (python interop/make_fixtures.py)')
  const dir = tmp('golden')
  const run = fixtureRun()
  await saveCheckpoint(run.model, join(dir, 'weights'), { optimizer: run.optimizer, scheduler: run.scheduler, optimizerPath: join(dir, 'optimizer') })
  for (const [ours, theirs] of [
    [join(dir, 'weights'), join(model, 'ckpt')],
    [join(dir, 'optimizer'), join(optim, 'ckpt')],
  ]) {
    const a = await openCheckpoint(ours)
    const b = await openCheckpoint(theirs)
    t.deepEqual([...a.keys()].sort(), [...b.keys()].sort(), 'key set')
    t.deepEqual(Object.fromEntries(a.paths()), Object.fromEntries(b.paths()), 'planner_data paths')
    for (const k of b.keys()) {
      const ia = a.info(k)
      const ib = b.info(k)
      t.is(ia.kind, ib.kind, k)
      if (ia.kind === 'tensor' && ib.kind === 'tensor') t.deepEqual([ia.dtype, ia.shape], [ib.dtype, ib.shape], k)
      else t.deepEqual(await a.readObject(k, { exact: true }), await b.readObject(k, { exact: true }), k)
    }
    a.close()
    b.close()
  }
  rmSync(dir, { recursive: true })
})

test('golden: the state dicts we would save have torch’s flat keys and paths (no writer needed)', (t) => {
  const optim = fixtureDir('seed-optim')
  const model = fixtureDir('seed-model')
  if (!model || !optim) return t.fail('fixtures/torch-2.15.0/seed-model and seed-optim are missing')
  const run = fixtureRun()
  for (const [dir, sd] of [
    [model, { model: new ModelState(run.model).stateDict() }],
    [optim, { optim: new OptimizerState(run.model, run.optimizer, run.scheduler).stateDict() }],
  ] as const) {
    const { expected } = loadExpected(dir)
    const flat = distcp.flattenStateDict(sd, '2.4')
    t.deepEqual([...flat.keys()].sort(), [...Object.keys(expected.tensors), ...Object.keys(expected.objects)].sort())
    for (const [k, meta] of Object.entries(expected.tensors)) {
      const v = flat.get(k)?.value as Tensor
      t.deepEqual([v.dtype, v.shape], [meta.dtype, meta.shape], k)
    }
    const errors: string[] = []
    for (const [k, want] of Object.entries(expected.objects)) diffTyped(flat.get(k)?.value, want, new Map(), k, errors)
    t.deepEqual(errors, [])
  }
})

test('PyTorch → Node: the seed fixtures of torch 2.15 and 2.3 (old layout, whole-dict items) load', async (t) => {
  for (const version of ['2.15.0', '2.3.1']) {
    const base = join(root, 'fixtures', `torch-${version}`)
    if (!existsSync(join(base, 'seed-optim', 'ckpt'))) {
      t.fail(`fixtures/torch-${version}/seed-optim is missing`)
      continue
    }
    const run = createRun({ seed: 3, lr: 1e-3, weightDecay: 0.01, stepSize: 4, gamma: 0.2 })
    const r = await loadCheckpoint(run.model, join(base, 'seed-model', 'ckpt'), {
      optimizer: run.optimizer,
      scheduler: run.scheduler,
      optimizerPath: join(base, 'seed-optim', 'ckpt'),
    })
    t.is(r.optimizer?.layout, version === '2.3.1' ? '2.3' : '2.4')
    const m = loadExpected(join(base, 'seed-model'))
    const errors: string[] = []
    diffTyped({ model: new ModelState(run.model).stateDict() }, m.expected.tree, m.bytes, `${version} model`, errors)
    // every value torch saved is what the optimizer and scheduler now hold (the JS side may hold more keys: torch
    // 2.15 adds decoupled_weight_decay/_is_initial to what 2.3 saved, and so do we)
    const o = loadExpected(join(base, 'seed-optim'))
    const sd = new OptimizerState(run.model, run.optimizer, run.scheduler).stateDict()
    const tree = o.expected.tree as { t: 'dict'; v: [Typed, Typed][] }
    const inner = tree.v[0][1] as { t: 'dict'; v: [Typed, Typed][] }
    for (const [k, v] of inner.v) {
      const name = (k as { v: string }).v
      const ours = sd[name] as Record<string, StateValue>
      if (name === 'sched') {
        for (const [sk, sv] of (v as { v: [Typed, Typed][] }).v) diffTyped(ours[(sk as { v: string }).v], sv, o.bytes, `${version} sched`, errors)
        continue
      }
      for (const [ok, ov] of (v as { v: [Typed, Typed][] }).v) {
        const key = (ok as { v: string }).v
        if (key === 'state') diffTyped(ours.state, ov, o.bytes, `${version} optim.state`, errors)
        else {
          for (const [gi, g] of (ov as { v: Typed[] }).v.entries()) {
            for (const [hk, hv] of (g as { v: [Typed, Typed][] }).v) {
              diffTyped((ours.param_groups as Record<string, StateValue>[])[gi][(hk as { v: string }).v], hv, o.bytes, `${version} param_groups`, errors)
            }
          }
        }
      }
    }
    t.deepEqual(errors, [])
    t.is(run.optimizer.paramGroups[0].decoupled_weight_decay, true, 'AdamW.__setstate__ default for a 2.3 checkpoint')
  }
})

// ---------------------------------------------------------------------------------------------------------------
// load(): bad input, non-strict loads, the 2.3 fallback

test('bad input: a model of another shape gets one error listing every mismatch, and nothing is loaded', async (t) => {
  const dir = join(root, 'fixtures', 'torch-2.15.0', 'seed-model', 'ckpt')
  if (!existsSync(dir)) return t.fail('fixtures/torch-2.15.0/seed-model is missing')
  const wide = new TinyMLP({ hidden: 16, seed: 4 })
  const before = wide.namedParameters().map(([, p]) => new Uint8Array(p.data))
  const e = await t.throwsAsync(loadCheckpoint(wide, dir), { instanceOf: LoadMismatchError })
  t.is(e?.code, 'ERR_DISTCP_STATE_MISMATCH')
  t.deepEqual(
    e?.report.mismatched.map((m) => m.key),
    ['model.0.weight', 'model.0.bias', 'model.1.weight', 'model.1.bias', 'model.3.weight'],
  )
  t.regex(e?.message ?? '', /model\.0\.weight: checkpoint has float32 \[8, 4\], the state dict has float32 \[16, 4\]/)
  t.regex(e?.message ?? '', /nothing was loaded/)
  wide.namedParameters().forEach(([k, p], i) => t.true(sameBytes(p.data, before[i]), `${k} untouched`))
})

test('load: missing and unexpected keys and dtype mismatches in one strict error; non-strict loads the rest', async (t) => {
  const dir = join(root, 'fixtures', 'torch-2.15.0', 'seed-model', 'ckpt')
  if (!existsSync(dir)) return t.fail('fixtures/torch-2.15.0/seed-model is missing')
  const m = loadExpected(join(dir, '..'))
  const f32 = (shape: number[]): Tensor => ({ dtype: 'float32', shape, data: new Uint8Array(4 * shape.reduce((a, b) => a * b, 1)) })
  const target = (): StateDict => ({
    model: {
      '0.weight': f32([8, 4]),
      '0.bias': { dtype: 'float64', shape: [8], data: new Uint8Array(64) },
      '1.weight': f32([8]),
      '3.weight': f32([2, 8]),
      '3.bias': f32([2]),
      extra: f32([3]),
    },
  })
  const sd = target()
  const e = await t.throwsAsync(load(sd, { checkpointId: dir }), { instanceOf: LoadMismatchError })
  t.deepEqual(e?.report.missing, ['model.extra'])
  t.deepEqual(e?.report.unexpected, ['model.1.bias'])
  t.deepEqual(e?.report.mismatched, [{ key: 'model.0.bias', reason: 'checkpoint has float32 [8], the state dict has float64 [8]' }])
  t.true(((sd.model as StateDict)['0.weight'] as Tensor).data.every((b) => b === 0))

  const report = await load(sd, { checkpointId: dir, strict: false })
  t.deepEqual(report, { ...e!.report })
  const loaded = sd.model as Record<string, Tensor>
  t.true(sameBytes(loaded['0.weight'].data, m.bytes.get('model.0.weight')!))
  t.true(sameBytes(loaded['3.bias'].data, m.bytes.get('model.3.bias')!))
  t.true(loaded['0.bias'].data.every((b) => b === 0), 'mismatched tensor left as it was')
})

test('load: non-tensor leaves are replaced with exact Python types; the torch ≤ 2.3 layout is found by fallback', async (t) => {
  const dir = join(root, 'fixtures', 'torch-2.3.1', 'seed-optim', 'ckpt')
  if (!existsSync(dir)) return t.fail('fixtures/torch-2.3.1/seed-optim is missing')
  const run = createRun({ seed: 3, lr: 1e-3, weightDecay: 0.01, stepSize: 4, gamma: 0.2 })
  const sd: StateDict = { optim: new OptimizerState(run.model, run.optimizer, run.scheduler).stateDict() }
  // torch 2.3 has no _is_initial and writes `verbose`; the scheduler state is one item there, so it is replaced whole
  const report = await load(sd, { checkpointId: dir })
  t.is(report.layout, '2.3')
  const sched = (sd.optim as StateDict).sched as StateDict
  t.deepEqual(sched.gamma, new PyFloat(0.2))
  t.is(sched.verbose, false)
  t.false('_is_initial' in sched)
  const group = ((sd.optim as StateDict).optim as { param_groups: StateDict[] }).param_groups[0]
  t.deepEqual(group.betas, new PyTuple([new PyFloat(0.9), new PyFloat(0.999)]))
})

test('load: torch ≥ 2.4 cannot resume a 2.7 scheduler (no _is_initial) and neither do we, with the same key', async (t) => {
  const dir = join(root, 'fixtures', 'torch-2.7.1', 'seed-optim', 'ckpt')
  if (!existsSync(dir)) return t.pass('no torch 2.7.1 fixture')
  const run = createRun({ seed: 3, lr: 1e-3, weightDecay: 0.01, stepSize: 4, gamma: 0.2 })
  const e = await t.throwsAsync(load({ optim: new OptimizerState(run.model, run.optimizer, run.scheduler) }, { checkpointId: dir }), {
    instanceOf: LoadMismatchError,
  })
  t.deepEqual(e?.report.missing, ['optim.sched._is_initial'])
  // without a scheduler the seed ignores the saved one; so does loadCheckpoint
  const plain = createRun({ seed: 3, lr: 1e-3 })
  const r = await loadCheckpoint(plain.model, join(dir, '..', '..', 'seed-model', 'ckpt'), { optimizer: plain.optimizer, optimizerPath: dir })
  t.deepEqual(r.optimizer?.unexpected, [])
})

// ---------------------------------------------------------------------------------------------------------------
// OptimizerState details

class TiedModel implements Model {
  readonly emb = new F32Parameter([3, 2], [1, 2, 3, 4, 5, 6])
  readonly bias = new F32Parameter([2], [0.5, -0.5])
  constructor(readonly listTwice = false) {}
  namedParameters(): [string, Parameter][] {
    const named: [string, Parameter][] = [['emb.weight', this.emb], ['bias', this.bias]]
    return this.listTwice ? [...named, ['head.weight', this.emb]] : named
  }
  stateDict(): StateDict {
    return { 'emb.weight': this.emb, bias: this.bias, 'head.weight': this.emb }
  }
  loadStateDict(): void {}
}

test('OptimizerState: a tied parameter appears once, under its first name', (t) => {
  for (const listTwice of [false, true]) {
    const m = new TiedModel(listTwice)
    const opt = new AdamW([m.emb, m.bias])
    const sd = new OptimizerState(m, opt).stateDict() as { optim: { state: StateDict; param_groups: StateDict[] } }
    t.deepEqual(Object.keys(sd), ['optim'], 'no sched without a scheduler')
    t.deepEqual(Object.keys(sd.optim.state), ['emb.weight', 'bias'])
    t.deepEqual(sd.optim.param_groups[0].params, ['emb.weight', 'bias'])
  }
})

test('OptimizerState: a parameter without saved state is an error, as in set_optimizer_state_dict', (t) => {
  const run = createRun({ seed: 1 })
  const state = new OptimizerState(run.model, run.optimizer, run.scheduler)
  const sd = state.stateDict()
  delete ((sd.optim as StateDict).state as StateDict)['1.bias']
  const e = t.throws(() => state.loadStateDict(sd), { instanceOf: DistcpError })
  t.regex(e?.message ?? '', /Missing optimizer state for parameter '1\.bias' in checkpoint/)
})

// ---------------------------------------------------------------------------------------------------------------
// The example's README: train, save, resume = one uninterrupted run

test('examples/tiny-trainer: train 6 + resume 4 gives exactly the losses of 10 straight steps', (t) => {
  if (!hasSave) return t.pass('save() has not landed yet')
  const dir = tmp('example')
  const node = (args: string[]): string => {
    const r = spawnSync('node', ['--import', '@oxc-node/core/register', 'examples/tiny-trainer/train.ts', ...args], {
      cwd: root,
      encoding: 'utf8',
    })
    t.is(r.status, 0, r.stderr)
    return r.stdout
  }
  const losses = (out: string): string[] => out.split('\n').filter((l) => l.startsWith('step '))
  const a = [...losses(node([join(dir, 'a'), '--steps', '6'])), ...losses(node([join(dir, 'a'), '--steps', '4', '--resume']))]
  const b = losses(node([join(dir, 'b'), '--steps', '10']))
  t.is(a.length, 10)
  t.deepEqual(a, b)
  t.deepEqual(readdirSync(join(dir, 'a', 'step_10', 'policy')).sort(), ['weights', 'optimizer', 'tokenizer'].sort())
  rmSync(dir, { recursive: true })
})

test('saveCheckpoint with layout 2.3: tensor-free containers are single items, and loadCheckpoint finds them', async (t) => {
  if (!hasSave) return t.pass('save() has not landed yet')
  const dir = tmp('layout23')
  const run = createRun({ seed: 8 })
  for (let s = 0; s < 3; s++) trainStep(run, s)
  await saveCheckpoint(run.model, join(dir, 'weights'), { optimizer: run.optimizer, scheduler: run.scheduler, optimizerPath: join(dir, 'optimizer'), layout: '2.3' })
  const ck = await openCheckpoint(join(dir, 'optimizer'))
  t.true(ck.keys().includes('optim.sched'))
  t.true(ck.keys().includes('optim.optim.param_groups'))
  ck.close()
  const resumed = createRun({ seed: 9 })
  const r = await loadCheckpoint(resumed.model, join(dir, 'weights'), { optimizer: resumed.optimizer, scheduler: resumed.scheduler, optimizerPath: join(dir, 'optimizer') })
  t.is(r.optimizer?.layout, '2.3')
  assertSameState(t, new OptimizerState(run.model, run.optimizer, run.scheduler).stateDict(), new OptimizerState(resumed.model, resumed.optimizer, resumed.scheduler).stateDict())
  t.is(trainStep(resumed, 3), trainStep(run, 3))
  rmSync(dir, { recursive: true })
})
