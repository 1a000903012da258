import type { DType } from './native.js'
import { DistcpError } from './errors.js'

// Element types, by their torch names: the core's enum, whose strings the binding's generated typings carry
// (re-exported as they are, so that the API reference documents the union itself)
export type { DType }

/** A dense tensor: row-major, little-endian bytes. */
export interface Tensor {
  dtype: DType
  shape: number[]
  data: Uint8Array
}

const ELEMENT_SIZE: Record<DType, number> = {
  float64: 8,
  float32: 4,
  float16: 2,
  bfloat16: 2,
  float8_e4m3fn: 1,
  float8_e5m2: 1,
  float8_e4m3fnuz: 1,
  float8_e5m2fnuz: 1,
  float8_e8m0fnu: 1,
  int64: 8,
  int32: 4,
  int16: 2,
  int8: 1,
  uint64: 8,
  uint32: 4,
  uint16: 2,
  uint8: 1,
  bool: 1,
  complex128: 16,
  complex64: 8,
  complex32: 4,
}

export function elementSize(dtype: DType): number {
  return ELEMENT_SIZE[dtype]
}

export function numel(shape: readonly number[]): number {
  return shape.reduce((a, b) => a * b, 1)
}

export function isTensor(v: unknown): v is Tensor {
  return (
    typeof v === 'object' &&
    v !== null &&
    typeof (v as Tensor).dtype === 'string' &&
    Array.isArray((v as Tensor).shape) &&
    (v as Tensor).data instanceof Uint8Array
  )
}

/** The typed array that views a tensor's elements. */
export type TypedArrayFor<D extends DType> = D extends 'float64' | 'complex128'
  ? Float64Array
  : D extends 'float32' | 'complex64'
    ? Float32Array
    : D extends 'int64'
      ? BigInt64Array
      : D extends 'uint64'
        ? BigUint64Array
        : D extends 'int32'
          ? Int32Array
          : D extends 'uint32'
            ? Uint32Array
            : D extends 'int16'
              ? Int16Array
              : D extends 'uint16' | 'float16' | 'bfloat16' | 'complex32'
                ? Uint16Array
                : D extends 'int8'
                  ? Int8Array
                  : Uint8Array

type AnyTypedArray =
  | Float64Array
  | Float32Array
  | BigInt64Array
  | BigUint64Array
  | Int32Array
  | Uint32Array
  | Int16Array
  | Uint16Array
  | Int8Array
  | Uint8Array

/**
 * Views the tensor's bytes as the matching typed array: float32 → Float32Array, int64 → BigInt64Array,
 * float16/bfloat16 → their raw bits as Uint16Array, float8/bool → Uint8Array, complex → interleaved (re, im).
 * No copy unless the bytes are not aligned for the element type.
 */
export function typedArray<D extends DType>(t: Tensor & { dtype: D }): TypedArrayFor<D> {
  const ctor = arrayConstructor(t.dtype)
  // the typed array's constructor would round the length down, silently dropping the bytes past the last element
  if (t.data.byteLength % ctor.BYTES_PER_ELEMENT !== 0) {
    throw new DistcpError(
      'ERR_DISTCP_INVALID_INPUT',
      `typedArray: a ${t.dtype} tensor's data must hold whole ${ctor.BYTES_PER_ELEMENT}-byte elements, it has ${t.data.byteLength} bytes`,
    )
  }
  let data = t.data
  if (data.byteOffset % ctor.BYTES_PER_ELEMENT !== 0) data = data.slice()
  return new ctor(data.buffer, data.byteOffset, data.byteLength / ctor.BYTES_PER_ELEMENT) as TypedArrayFor<D>
}

function arrayConstructor(dtype: DType): {
  new (buffer: ArrayBufferLike, byteOffset: number, length: number): AnyTypedArray
  BYTES_PER_ELEMENT: number
} {
  switch (dtype) {
    case 'float64':
    case 'complex128':
      return Float64Array
    case 'float32':
    case 'complex64':
      return Float32Array
    case 'int64':
      return BigInt64Array
    case 'uint64':
      return BigUint64Array
    case 'int32':
      return Int32Array
    case 'uint32':
      return Uint32Array
    case 'int16':
      return Int16Array
    case 'uint16':
    case 'float16':
    case 'bfloat16':
    case 'complex32':
      return Uint16Array
    case 'int8':
      return Int8Array
    default:
      return Uint8Array
  }
}
