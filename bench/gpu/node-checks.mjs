// The Node half of the GPU proof: distcp's public API (dist/, the release addon) driving a real GPU, checked against
// distcp's host path, which the interop suites check against torch. Runs on the GPU machine with the Node binary
// that bench/gpu/pack-node.sh packs (that machine has no Node), from bench/gpu/run.sh --node.
//
//   node bench/gpu/node-checks.mjs      prints `ok`/`FAIL` per check, RESULT lines, exits 1 if any check failed
//   GPU_CHECKS_HOST=1 node …            the same checks with host memory standing in for the device (tests this
//                                       script itself on a machine without a GPU, so the device time is not spent
//                                       on a typo)
//
// What it checks, on every tensor of every torch-written fixture (all layouts and dtypes) and the example:
// - read to the device (whole, and a box) equals the host read, byte for byte;
// - read into a caller's device memory (`into`) equals the host read and leaves the memory to the caller;
// - load() and loadCheckpoint() fill device leaves with what a host load gives;
// - a save of device tensors (one rank, and two ranks in one process) writes the same files as a host save;
// - DeviceTensor: DLPack fields, double dispose, use after dispose is a coded error.
import assert from 'node:assert/strict'
import { mkdtempSync, readdirSync, readFileSync, rmSync, statSync } from 'node:fs'
import { createServer } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

const root = new URL('../..', import.meta.url).pathname
const d = await import(join(root, 'dist', 'index.js'))

let passed = 0
let failed = 0
async function check(name, fn) {
  const t0 = performance.now()
  try {
    await fn()
    passed++
    console.log(`ok    ${name} (${Math.round(performance.now() - t0)} ms)`)
  } catch (e) {
    failed++
    console.log(`FAIL  ${name}: ${e?.stack ?? e}`)
  }
}
const bytes = (t) => Buffer.from(t.data.buffer, t.data.byteOffset, t.data.byteLength)

const hostMode = process.env.GPU_CHECKS_HOST === '1'
const info = d.cudaInfo()
console.log(JSON.stringify(info))
if (!info.available && !hostMode) {
  console.log(`RESULT node_cuda unavailable`)
  process.exit(2)
}
const dev = 'cuda:0'

// host stand-ins for device tensors (GPU_CHECKS_HOST=1): host tensors with a DeviceTensor's methods (no `device`
// field, so that saves and loads take them as the host tensors they are)
const fakes = new Map()
function fake(t) {
  const ptr = BigInt(fakes.size + 1) << 20n
  const f = { ...t, ptr, byteLength: t.data.byteLength, toHost: async () => Buffer.from(t.data.buffer, t.data.byteOffset, t.data.byteLength), dispose() {}, toDLPack: () => ({ data: ptr, shape: t.shape }) }
  fakes.set(ptr, f)
  return f
}
/** `ck.read(key, { device, ...opts })`, or its host stand-in. */
async function readDev(ck, key, opts = {}) {
  return hostMode ? fake(await ck.read(key, opts)) : ck.read(key, { device: dev, ...opts })
}
/** `ck.read(key, { into: target })` for a device target `{ device, ptr, byteLength }`, or its host stand-in. */
async function readInto(ck, key, target) {
  return hostMode ? ck.read(key, { into: fakes.get(target.ptr).data }) : ck.read(key, { into: target })
}

// every checkpoint folder under fixtures/ and examples/ that distcp opens
const folders = []
function walk(dir, depth) {
  if (depth > 4) return
  const names = readdirSync(dir)
  if (names.includes('.metadata') || names.some((n) => n.endsWith('.safetensors'))) folders.push(dir)
  for (const n of names) {
    const p = join(dir, n)
    if (statSync(p).isDirectory() && !n.startsWith('.')) walk(p, depth + 1)
  }
}
walk(join(root, 'fixtures'), 0)
walk(join(root, 'examples'), 0)
console.log(`${folders.length} checkpoint folders`)

let tensors = 0
for (const folder of folders) {
  let ck
  try {
    ck = await d.openCheckpoint(folder)
  } catch {
    continue // a folder that holds parts of another layout
  }
  await check(`device reads == host reads: ${folder.slice(root.length)}`, async () => {
    for (const key of ck.keys()) {
      const i = ck.info(key)
      if (i.kind !== 'tensor') continue
      const host = await ck.read(key)
      const whole = await readDev(ck, key)
      assert.equal(whole.byteLength, host.data.byteLength, key)
      assert.deepEqual(Buffer.from(await whole.toHost()), bytes(host), key)
      // into caller-owned device memory: the whole tensor's allocation, reused
      await readInto(ck, key, { device: dev, ptr: whole.ptr, byteLength: whole.byteLength })
      assert.deepEqual(Buffer.from(await whole.toHost()), bytes(host), `${key} (into)`)
      whole.dispose()
      // a box: the second half of dimension 0 (a strided read when other dimensions exist)
      if (i.shape.length > 0 && i.shape[0] > 1) {
        const off = i.shape.map((s, k) => (k === 0 ? Math.floor(s / 2) : 0))
        const sizes = i.shape.map((s, k) => (k === 0 ? s - off[0] : s))
        const hb = await ck.read(key, { offsets: off, sizes })
        const db = await readDev(ck, key, { offsets: off, sizes })
        assert.deepEqual(Buffer.from(await db.toHost()), bytes(hb), `${key} box`)
        db.dispose()
      }
      // a column box (the Shard(1) / strided path) where there is a second dimension
      if (i.shape.length > 1 && i.shape[1] > 1) {
        const off = i.shape.map((s, k) => (k === 1 ? 1 : 0))
        const sizes = i.shape.map((s, k) => (k === 1 ? s - 1 : s))
        const hb = await ck.read(key, { offsets: off, sizes })
        const db = await readDev(ck, key, { offsets: off, sizes })
        assert.deepEqual(Buffer.from(await db.toHost()), bytes(hb), `${key} column box`)
        db.dispose()
      }
      tensors++
    }
  })
  ck.close()
}

const example = join(root, 'examples', 'tiny-llama', 'dcp')
const work = mkdtempSync(join(tmpdir(), 'distcp-gpu-node-'))

/** Device tensors holding different bytes (each byte + 1) in the shape of every tensor of `ckpt`, keyed by key. */
async function perturbedDeviceTargets(ckpt) {
  const ck = await d.openCheckpoint(ckpt)
  const host = {}
  for (const key of ck.keys()) {
    if (ck.info(key).kind !== 'tensor') continue
    const t = await ck.read(key)
    const data = new Uint8Array(t.data.buffer, t.data.byteOffset, t.data.byteLength).map((b) => b + 1)
    host[key] = { dtype: t.dtype, shape: t.shape, data }
  }
  ck.close()
  const off = join(work, `perturbed-${Object.keys(host).length}-${Math.random().toString(36).slice(2)}`)
  await d.save(host, { checkpointId: off })
  const p = await d.openCheckpoint(off)
  const out = {}
  for (const key of Object.keys(host)) out[key] = await readDev(p, key)
  p.close()
  return out
}

await check('load() fills device leaves (and mixed host/device trees) with what a host load gives', async () => {
  const ck = await d.openCheckpoint(example)
  const targets = await perturbedDeviceTargets(example)
  const keys = Object.keys(targets)
  const hostLeaf = keys[0]
  const sd = {}
  for (const key of keys) {
    const t = key === hostLeaf ? { ...(await ck.read(key)), data: new Uint8Array((await ck.read(key)).data.byteLength) } : targets[key]
    sd[key] = t
  }
  const r = await d.load(sd, { checkpointId: example, strict: false })
  assert.ok(r)
  for (const key of keys) {
    const want = bytes(await ck.read(key))
    const got = key === hostLeaf ? Buffer.from(sd[key].data) : Buffer.from(await targets[key].toHost())
    assert.deepEqual(got, want, key)
  }
  for (const key of keys) targets[key].dispose()
  ck.close()
})

await check('loadCheckpoint() with a model whose parameters live on the device', async () => {
  const ck = await d.openCheckpoint(example)
  const targets = await perturbedDeviceTargets(example)
  // the example's keys are ModelState's: `model.` + the model's own names
  const params = Object.fromEntries(Object.entries(targets).map(([k, v]) => [k.replace(/^model\./, ''), v]))
  const model = { namedParameters: () => Object.entries(params), stateDict: () => params, loadStateDict: () => undefined }
  await d.loadCheckpoint(model, example)
  for (const [k, v] of Object.entries(targets)) assert.deepEqual(Buffer.from(await v.toHost()), bytes(await ck.read(k)), k)
  for (const v of Object.values(targets)) v.dispose()
  ck.close()
})

await check('a save of device tensors writes the same files as a host save', async () => {
  const ck = await d.openCheckpoint(example)
  const hostSd = {}
  const devSd = {}
  for (const key of ck.keys()) {
    if (ck.info(key).kind !== 'tensor') continue
    hostSd[key] = await ck.read(key)
    devSd[key] = await readDev(ck, key)
  }
  await d.save(hostSd, { checkpointId: join(work, 'host') })
  await d.save(devSd, { checkpointId: join(work, 'dev') })
  for (const f of ['.metadata', '__0_0.distcp']) assert.deepEqual(readFileSync(join(work, 'dev', f)), readFileSync(join(work, 'host', f)), f)
  // saveAsync too: staged, then committed, the same files
  const h = d.saveAsync(devSd, { checkpointId: join(work, 'dev-async') })
  await h.staged
  await h.committed
  for (const f of ['.metadata', '__0_0.distcp']) assert.deepEqual(readFileSync(join(work, 'dev-async', f)), readFileSync(join(work, 'host', f)), `async ${f}`)
  for (const v of Object.values(devSd)) v.dispose()
  ck.close()
})

await check('two ranks in one process save device slices: the same files as their host slices', async () => {
  const port = await new Promise((resolve) => {
    const s = createServer().listen(0, '127.0.0.1', () => {
      const p = s.address().port
      s.close(() => resolve(p))
    })
  })
  const pgs = await Promise.all([0, 1].map((rank) => d.initProcessGroup({ rank, worldSize: 2, masterAddr: '127.0.0.1', masterPort: port, timeoutMs: 30_000, useAgentStore: false, prefix: 'gpu' })))
  try {
    const slice = (r) => ({ dtype: 'float32', shape: [2, 4], data: new Float32Array(8).map((_, i) => r * 8 + i + 0.5), globalShape: [4, 4], globalOffsets: [2 * r, 0] })
    await Promise.all(pgs.map((pg) => d.save({ w: slice(pg.rank) }, { checkpointId: join(work, 'ranks-host'), processGroup: pg })))
    const ck = await d.openCheckpoint(join(work, 'ranks-host'))
    const devs = await Promise.all(pgs.map(async (pg) => Object.assign(await readDev(ck, 'w', { offsets: [2 * pg.rank, 0], sizes: [2, 4] }), { globalShape: [4, 4], globalOffsets: [2 * pg.rank, 0] })))
    ck.close()
    await Promise.all(pgs.map((pg) => d.save({ w: devs[pg.rank] }, { checkpointId: join(work, 'ranks-dev'), processGroup: pg })))
    for (const f of ['.metadata', '__0_0.distcp', '__1_0.distcp']) assert.deepEqual(readFileSync(join(work, 'ranks-dev', f)), readFileSync(join(work, 'ranks-host', f)), f)
    devs.forEach((x) => x.dispose())
  } finally {
    await Promise.all(pgs.map((pg) => pg.destroy()))
  }
})

await check('DeviceTensor: DLPack fields, dispose twice is harmless, use after dispose is a coded error', async () => {
  const ck = await d.openCheckpoint(example)
  const key = ck.keys().find((k) => ck.info(k).kind === 'tensor')
  const t = await readDev(ck, key)
  const p = t.toDLPack()
  assert.equal(typeof p.data, 'bigint')
  assert.equal(p.data, t.ptr)
  assert.deepEqual(p.shape, t.shape)
  t.dispose()
  t.dispose()
  if (hostMode) return
  await assert.rejects(t.toHost(), (e) => e.code === 'ERR_DISTCP_DISPOSED' || /dispos/i.test(String(e.code) + e.message))
  ck.close()
})

rmSync(work, { recursive: true, force: true })
console.log(`RESULT node_tensors ${tensors}`)
console.log(`RESULT node_checks_passed ${passed}`)
console.log(`RESULT node_checks_failed ${failed}`)
process.exit(failed ? 1 : 0)
