import { awaitNative, callNative, DistcpError } from './errors.js'
import { native, type NativeCheckpoint, type NativeDeviceBuffer } from './native.js'
import { elementSize, numel, type DType } from './tensor.js'

/** One CUDA device, as the driver reports it. */
export interface CudaDeviceInfo {
  index: number
  name: string
  /** Bytes of device memory. */
  totalMemory: number
  pciBusId: string
}

/** What CUDA this process can use. distcp loads the driver at run time; without one, `available` is false. */
export interface CudaInfo {
  available: boolean
  /** Why CUDA is not available (no driver library, no device, …). */
  reason?: string
  /** The driver's CUDA version, `major.minor`. */
  driverVersion?: string
  devices: CudaDeviceInfo[]
}

/** Probes the CUDA driver and lists the devices. Never throws. */
export function cudaInfo(): CudaInfo {
  const i = callNative(() => native.cudaInfo())
  return {
    available: i.available,
    ...(i.reason != null ? { reason: i.reason } : {}),
    ...(i.driverVersion != null ? { driverVersion: i.driverVersion } : {}),
    devices: i.devices.map((d) => ({ index: d.index, name: d.name, totalMemory: d.totalMemory, pciBusId: d.pciBusId })),
  }
}

/** Device memory owned by someone else (e.g. another CUDA library) that a read fills; distcp never frees it. */
export interface DeviceTarget {
  /** `cuda:N` (or `cuda`, device 0). */
  device: string
  /** Device address of the first byte. */
  ptr: bigint
  /** Bytes at `ptr`; must equal the bytes of the tensor (or box) read. */
  byteLength: number
}

/** A DLPack-shaped description of a device tensor, for native addons that wrap the memory without copying. */
export interface DLPackDescriptor {
  /** `DLTensor.data`. */
  data: bigint
  /** `DLDevice`: `deviceType` 2 is `kDLCUDA`. */
  device: { deviceType: 2; deviceId: number }
  /** `DLDataType`: DLPack type code, bits per lane, lanes (always 1). */
  dtype: { code: number; bits: number; lanes: 1 }
  shape: number[]
  /** Row-major strides, in elements. */
  strides: number[]
  byteOffset: 0
}

// DLPack's DLDataTypeCode (dlpack.h)
const DL_INT = 0
const DL_UINT = 1
const DL_FLOAT = 2
const DL_BFLOAT = 4
const DL_COMPLEX = 5
const DL_BOOL = 6
const DLPACK_CODE: Record<DType, number> = {
  float64: DL_FLOAT,
  float32: DL_FLOAT,
  float16: DL_FLOAT,
  bfloat16: DL_BFLOAT,
  float8_e4m3fn: 10,
  float8_e4m3fnuz: 11,
  float8_e5m2: 12,
  float8_e5m2fnuz: 13,
  float8_e8m0fnu: 14,
  int64: DL_INT,
  int32: DL_INT,
  int16: DL_INT,
  int8: DL_INT,
  uint64: DL_UINT,
  uint32: DL_UINT,
  uint16: DL_UINT,
  uint8: DL_UINT,
  bool: DL_BOOL,
  complex128: DL_COMPLEX,
  complex64: DL_COMPLEX,
  complex32: DL_COMPLEX,
}

/** Parses `cuda` / `cuda:N` into a device index. */
export function parseDevice(device: string): number {
  const m = /^cuda(?::(\d+))?$/.exec(device)
  if (!m) throw new DistcpError('ERR_DISTCP_BAD_REQUEST', `device must be 'cuda' or 'cuda:N', got '${device}'`)
  return m[1] === undefined ? 0 : Number(m[1])
}

/**
 * A tensor in CUDA device memory, row-major. Memory distcp allocated is freed by {@link DeviceTensor.dispose} (or,
 * as a backstop, when the object is garbage-collected); memory read `into` a caller's target is never freed.
 */
export class DeviceTensor {
  readonly dtype: DType
  readonly shape: number[]
  /** `cuda:N`. */
  readonly device: string
  readonly byteLength: number
  readonly #native: NativeDeviceBuffer | undefined
  readonly #ptr: bigint
  #disposed = false

  /** @internal */
  constructor(
    dtype: DType,
    shape: number[],
    device: string,
    byteLength: number,
    owned: NativeDeviceBuffer | undefined,
    ptr: bigint,
  ) {
    this.dtype = dtype
    this.shape = shape
    this.device = device
    this.byteLength = byteLength
    this.#native = owned
    this.#ptr = ptr
  }

  /** Device address of the first byte. Throws `ERR_DISTCP_DISPOSED` after {@link DeviceTensor.dispose}. */
  get ptr(): bigint {
    this.#live()
    return this.#ptr
  }

  /** Whether {@link DeviceTensor.dispose} was called. */
  get disposed(): boolean {
    return this.#disposed
  }

  /** Frees distcp-owned memory now (a caller's `into` memory is left alone). A second call does nothing. */
  dispose(): void {
    if (this.#disposed) return
    this.#disposed = true
    this.#native?.dispose()
  }

  /** Copies the bytes back into a new host buffer (through pinned staging). */
  async toHost(): Promise<Uint8Array> {
    this.#live()
    const n = this.#native
    if (n) return awaitNative(() => n.toHost())
    return awaitNative(() => native.copyFromDevice(parseDevice(this.device), this.#ptr, this.byteLength))
  }

  /** The DLPack fields describing this tensor (no copy; valid until disposed). */
  toDLPack(): DLPackDescriptor {
    this.#live()
    const strides = new Array<number>(this.shape.length)
    let s = 1
    for (let d = this.shape.length - 1; d >= 0; d--) {
      strides[d] = s
      s *= this.shape[d]
    }
    return {
      data: this.#ptr,
      device: { deviceType: 2, deviceId: parseDevice(this.device) },
      dtype: { code: DLPACK_CODE[this.dtype], bits: elementSize(this.dtype) * 8, lanes: 1 },
      shape: [...this.shape],
      strides,
      byteOffset: 0,
    }
  }

  #live(): void {
    if (this.#disposed) {
      throw new DistcpError('ERR_DISTCP_DISPOSED', `the ${this.dtype} device tensor on ${this.device} was disposed`)
    }
  }
}

/** A read into CUDA device memory: new memory on `device`, or the caller's `into` target. */
export interface DeviceReadOptions {
  /** `cuda:N` (or `cuda`): read into new device memory there, a {@link DeviceTensor} you dispose. */
  device?: string
  /** Read into this device memory instead; distcp never frees it. */
  into?: DeviceTarget
  /** Start of the box to read, per dimension (default: 0). */
  offsets?: number[]
  /** Size of the box to read, per dimension (default: to the end). */
  sizes?: number[]
  /**
   * Land the elements in this dtype (default: as stored). Casts are between `float64`, `float32`, `float16` and
   * `bfloat16`, and run where fewer bytes cross PCIe: a narrowing cast on the host before the copy (bit-identical
   * to torch's CPU `.to()`, NaN encodings included), `bfloat16`/`float16` → `float32` on the device after it
   * (exact, bit-identical to torch's `.to(torch.float32)` on CUDA, NaN payloads kept).
   */
  dtype?: DType
}

/** Whether read options ask for device memory (a `device`, or an `into` that is a {@link DeviceTarget}). */
export function isDeviceRead(options: { device?: string; into?: unknown }): options is DeviceReadOptions {
  const into = options.into
  return (
    options.device !== undefined ||
    (typeof into === 'object' &&
      into !== null &&
      !ArrayBuffer.isView(into) &&
      typeof (into as DeviceTarget).ptr === 'bigint')
  )
}

/** @internal `Checkpoint.read` with a device: the shape is the box's, computed by the caller. */
export async function readToDevice(
  ck: NativeCheckpoint,
  key: string,
  dtype: DType,
  shape: number[],
  options: DeviceReadOptions,
): Promise<DeviceTensor> {
  const { offsets, sizes } = options
  const cast = options.dtype
  // DLPACK_CODE has one entry per DType: a name check only; whether the cast exists is the native layer's rule
  if (cast !== undefined && !(typeof cast === 'string' && Object.hasOwn(DLPACK_CODE, cast))) {
    throw new DistcpError('ERR_DISTCP_BAD_REQUEST', `key \`${key}\`: \`dtype\` must be a torch dtype name, got ${String(cast)}`)
  }
  dtype = cast ?? dtype
  const into = options.into
  if (into) {
    const index = parseDevice(into.device)
    if (options.device !== undefined && parseDevice(options.device) !== index) {
      throw new DistcpError(
        'ERR_DISTCP_BAD_REQUEST',
        `key \`${key}\`: device '${options.device}' and into.device '${into.device}' differ`,
      )
    }
    const want = numel(shape) * elementSize(dtype)
    if (into.byteLength !== want) {
      throw new DistcpError(
        'ERR_DISTCP_BAD_REQUEST',
        `key \`${key}\`: \`into\` holds ${into.byteLength} bytes, the ${dtype} box [${shape}] needs ${want}`,
      )
    }
    await awaitNative(() => native.readIntoDevice(ck, key, index, into.ptr, into.byteLength, offsets, sizes, cast))
    return new DeviceTensor(dtype, shape, `cuda:${index}`, want, undefined, into.ptr)
  }
  const index = parseDevice(options.device ?? 'cuda:0')
  const buf = await awaitNative(() => native.readToDevice(ck, key, index, offsets, sizes, cast))
  return new DeviceTensor(dtype, shape, `cuda:${index}`, buf.byteLength, buf, buf.ptr)
}

/** Throws `ERR_DISTCP_NO_CUDA` (with the reason) unless `device` (`cuda:N`) can be used: checked before work starts. */
export function requireCuda(device: string): void {
  const index = parseDevice(device)
  const i = cudaInfo()
  if (!i.available) throw new DistcpError('ERR_DISTCP_NO_CUDA', i.reason ?? 'no CUDA')
  if (index >= i.devices.length) {
    throw new DistcpError(
      'ERR_DISTCP_NO_CUDA',
      `no CUDA: ${device} was requested, but this machine has ${i.devices.length} CUDA device(s)`,
    )
  }
}

/** A leaf of a state dict that lives in device memory: a {@link DeviceTensor}, or a caller's target with its type. */
export type DeviceLeaf = DeviceTarget & { dtype: DType; shape: number[] }

/** The leaf as a device target with its dtype and shape, or null when it is not one (a disposed tensor is not). */
export function asDeviceLeaf(v: unknown): DeviceLeaf | null {
  if (v instanceof DeviceTensor) {
    if (v.disposed) return null
    return { dtype: v.dtype, shape: v.shape, device: v.device, ptr: v.ptr, byteLength: v.byteLength }
  }
  if (typeof v !== 'object' || v === null) return null
  const t = v as Partial<DeviceLeaf>
  const ok =
    typeof t.dtype === 'string' &&
    Array.isArray(t.shape) &&
    typeof t.device === 'string' &&
    typeof t.ptr === 'bigint' &&
    typeof t.byteLength === 'number'
  return ok ? (v as DeviceLeaf) : null
}

/**
 * Every device leaf under `root` (plain objects, Maps, arrays and tuples are walked), for a save: keyed by the leaf
 * object. Their devices are checked here, before any work starts (`ERR_DISTCP_NO_CUDA`, so that a save that cannot
 * read its tensors leaves nothing behind); the save's encoder checks their dtype, shape and size as it does a host
 * tensor's. Their bytes are copied later, straight into the save's staging memory ({@link downloadInto}).
 */
export function deviceLeavesOf(root: unknown): Map<object, DeviceLeaf> {
  const found = new Map<object, DeviceLeaf>()
  const seen = new Set<object>()
  const walk = (v: unknown): void => {
    if (typeof v !== 'object' || v === null || seen.has(v) || ArrayBuffer.isView(v)) return
    seen.add(v)
    const leaf = asDeviceLeaf(v)
    if (leaf) {
      found.set(v, leaf)
      return
    }
    // a list stops at its first hole: the save's encoder refuses it there, and a sparse array's length may be 2**32 - 1;
    // its length and a Map's entries are taken once: a getter or a Proxy that adds items as they are read would
    // never let the walk end
    const list = (a: unknown[]): void => {
      const n = a.length
      for (let i = 0; i < n && i in a; i++) walk(a[i])
    }
    if (v instanceof Map) for (const x of [...v.values()]) walk(x)
    else if (Array.isArray(v)) list(v)
    else if (Array.isArray((v as { items?: unknown }).items)) list((v as { items: unknown[] }).items)
    else if ([Object.prototype, null].includes(Object.getPrototypeOf(v))) Object.values(v).forEach(walk)
  }
  walk(root)
  for (const device of new Set([...found.values()].map((l) => l.device))) requireCuda(device)
  return found
}

/** Copies a device leaf's bytes into `into` (a save's staging memory, exactly `leaf.byteLength` long). */
export function downloadInto(leaf: DeviceLeaf, into: Uint8Array): Promise<void> {
  return awaitNative(() => native.copyFromDeviceInto(parseDevice(leaf.device), leaf.ptr, into))
}
