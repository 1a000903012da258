// State dicts for the save tests (and interop/compat_matrix.ts), and a child process that saves one and may crash
// on purpose:
//   node --import @oxc-node/core/register __test__/save-child.ts <ckpt> <variant> [<fail point> [abort|error]]
import { pathToFileURL } from 'node:url'

import { save, pyFloat, pyTuple, elementSize, PyFloat, PyTuple, type DType, type Model, type SaveStateDict } from '../src/index.js'

function f32(values: number[], shape = [values.length]): { dtype: 'float32'; shape: number[]; data: Uint8Array } {
  return { dtype: 'float32', shape, data: new Uint8Array(new Float32Array(values).buffer) }
}

export const DTYPES: readonly DType[] = [
  'float64', 'float32', 'float16', 'bfloat16', 'float8_e4m3fn', 'float8_e5m2', 'float8_e4m3fnuz', 'float8_e5m2fnuz',
  'float8_e8m0fnu', 'int64', 'int32', 'int16', 'int8', 'uint64', 'uint32', 'uint16', 'uint8', 'bool', 'complex128',
  'complex64', 'complex32',
]

let seed = 1
/** A tensor with deterministic, varied bytes (0/1 for bool). */
export function tensor(dtype: DType, shape: number[]): { dtype: DType; shape: number[]; data: Uint8Array } {
  const n = shape.reduce((a, b) => a * b, 1) * elementSize(dtype)
  const data = new Uint8Array(n)
  const s = seed++
  for (let i = 0; i < n; i++) data[i] = dtype === 'bool' ? (i + s) % 2 : (i * 73 + s * 29) % 251
  return { dtype, shape, data }
}

/** Every kind of tensor and value `save` takes; `dtypes` limits the dtypes (older torch lacks some). */
export function fullState(dtypes: readonly DType[] = DTYPES): SaveStateDict {
  return {
    dtypes: Object.fromEntries(dtypes.map((d) => [d, tensor(d, [2, 3])])),
    scalar_f32: tensor('float32', []),
    scalar_i64: tensor('int64', []),
    empty: tensor('float32', [0, 3]),
    empty_mid: tensor('int16', [2, 0, 3]),
    big: tensor('bfloat16', [256, 1024]),
    five_dims: tensor('uint8', [1, 2, 1, 3, 2]),
    nested: {
      l1: { l2: { l3: tensor('float32', [2]), n: 3 }, w: tensor('float32', [1, 2]) },
      list: [tensor('float32', [2]), tensor('int32', [3]), { x: tensor('float64', [1]) }, 's'],
      'a.b': tensor('float32', [2]),
      list_of_dicts: [{ a: 1 }, { b: [2, pyFloat(3)] }],
    },
    objects: {
      none: null,
      true: true,
      false: false,
      zero: 0,
      neg: -5,
      int53: 2 ** 53 - 1,
      huge_integer_number: 1e20,
      big: 2n ** 70n,
      min_i64: -(2n ** 63n),
      small_bigint: 5n,
      f01: 0.1,
      f1: pyFloat(1),
      inf: Infinity,
      ninf: -Infinity,
      nan: NaN,
      negzero: -0,
      tiny: 5e-324,
      str: 'héllo ✓ 😀',
      empty_str: '',
      bytes: new Uint8Array([0, 255, 1, 0x80]),
      one_byte: new Uint8Array([7]),
      empty_bytes: new Uint8Array(0),
      list: [1, 2, 3, 'a', 'a', 'ab', 'ab'],
      tuple: pyTuple(1, 'a', 2.5),
      nested_tuple: pyTuple(pyTuple(), pyTuple(1, 2), pyTuple(1, 2, 3, 4)),
      dict_in_tuple: pyTuple(new Map<unknown, unknown>([[0, 'zero'], [1, pyFloat(2)], ['k', null]])),
      empty_list: [],
      empty_dict: {},
    },
    tuple_with_tensors: pyTuple(tensor('float32', [2]), 'cpu', 3, tensor('float8_e5m2', [3])),
    optim: {
      state: { 'layer.weight': { exp_avg: tensor('float32', [2, 2]), step: tensor('float32', []) } },
      param_groups: [
        {
          lr: 0.001,
          betas: pyTuple(0.9, 0.999),
          eps: 1e-8,
          weight_decay: 0,
          amsgrad: false,
          params: ['layer.weight'],
        },
      ],
    },
  }
}

/**
 * The state dict as torch sees it after a load, in distcp's exact mode: floats as PyFloat, traversed dicts keyed by
 * str(key) (a dict inside a tuple is pickled whole and keeps its keys), and — torch ≥ 2.4 layout — no traversed
 * empty dicts (they have no key).
 */
export function toExact(v: unknown, layout: '2.4' | '2.3' = '2.4', inTuple = false): unknown {
  if (typeof v === 'number') return Number.isInteger(v) && !Object.is(v, -0) ? v : new PyFloat(v)
  if (v === null || typeof v !== 'object') return v
  if (v instanceof PyFloat || v instanceof Uint8Array) return v
  if (v instanceof PyTuple) return new PyTuple(v.items.map((x) => toExact(x, layout, true)) as PyTuple['items'])
  if (Array.isArray(v)) return v.map((x) => toExact(x, layout, inTuple))
  if ('dtype' in v && 'data' in v) return v
  const entries = v instanceof Map ? [...v.entries()] : Object.entries(v)
  if (inTuple) return new Map(entries.map(([k, x]) => [toExact(k, layout, true), toExact(x, layout, true)]))
  const out: Record<string, unknown> = {}
  for (const [k, x] of entries) {
    const e = toExact(x, layout)
    const emptyDict = typeof e === 'object' && e !== null && e.constructor === Object && Object.keys(e).length === 0
    if (!(layout === '2.4' && emptyDict)) out[String(k)] = e
  }
  return out
}

/** A small training-like state; `variant` changes every value, so a reader can tell which save it sees. */
export function smallState(variant: number): SaveStateDict {
  const v = variant
  return {
    model: { w: f32([v, v + 1, v + 2, v + 3], [2, 2]), b: f32([v / 2]) },
    step: v,
    optim: {
      state: { w: { exp_avg: f32([v * 10, 0, 0, 1], [2, 2]), step: f32([v], []) } },
      param_groups: [{ lr: pyFloat(v), betas: pyTuple(0.9, 0.999), params: ['model.w', 'model.b'] }],
    },
  }
}

/** A one-parameter model (`w`, 2 x 2 float32) whose values depend on `variant`: a reader can tell which save it sees. */
export function tinyModel(variant: number): Model {
  const w = { dtype: 'float32' as const, shape: [2, 2], data: new Uint8Array(new Float32Array([variant, variant + 1, variant + 2, variant + 3]).buffer) }
  return { namedParameters: () => [['w', w]], stateDict: () => ({ w }), loadStateDict: () => undefined }
}

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
  const [ckpt, variant, point, mode] = process.argv.slice(2)
  await save(smallState(Number(variant)), {
    checkpointId: ckpt,
    _testFailAt: point ? { point, abort: mode === 'abort' } : undefined,
  })
}
