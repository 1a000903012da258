// Staging memory: the copy `save` makes of the caller's tensor bytes when it is called (so the caller may change
// its buffers at once) goes into distcp-owned blocks that are reused across saves, instead of fresh allocations.
// A trainer that saves every N steps pays the allocation (and the first-touch page faults) once; after that a
// save's staging is one memcpy per tensor. `saveAsync` settles `staged` when this copy is done. A device tensor's
// bytes come into the same blocks, one device-to-host transfer each (no host buffer of their own per save).

import { downloadInto, type DeviceLeaf } from './cuda.js'
import { native } from './native.js'
import { DistcpError } from './errors.js'

/** Blocks are at most this large (a bigger tensor gets a block of its own size): one ArrayBuffer need not hold 2 GB. */
const BLOCK_BYTES = 1 << 30
/** Each tensor starts at a multiple of this inside a block (cache-line aligned copies, any dtype's alignment). */
const ALIGN = 64
/** A new block is rounded up to a multiple of this, so a state dict that grows a little still fits the block. */
const ROUND = 1 << 20

/**
 * A block whose pages are already faulted in (native, huge pages where the kernel has them): a fresh
 * `ArrayBuffer` takes a page fault per 4 KiB during the copy, which costs several times the copy itself. A plain
 * `ArrayBuffer` if the native allocation fails.
 */
function allocBlock(size: number): ArrayBuffer {
  try {
    return native.allocStaging(size)
  } catch {
    return new ArrayBuffer(size)
  }
}

function alignUp(n: number, a: number): number {
  return Math.ceil(n / a) * a
}

/** What a save stages: bytes in host memory, or a tensor in device memory (copied device-to-host into staging). */
export type StageSource = Uint8Array | DeviceLeaf

/** Staged copies and the lease that owns their memory. */
export interface Staged {
  copies: Uint8Array[]
  lease: StagingLease
}

/** Counters of a {@link StagingPool} (for tests and monitoring). */
export interface StagingStats {
  /** Blocks allocated since the pool was made (a warm pool allocates none per save). */
  allocations: number
  bytesAllocated: number
  /** Blocks handed out again from the idle list. */
  reuses: number
  /** Blocks held by saves that have not settled. */
  blocksInUse: number
  /** Idle blocks kept for the next save, and their bytes. */
  idleBlocks: number
  idleBytes: number
}

/** The staging memory of one save, returned to its pool by {@link StagingLease.release} once the save settled. */
export class StagingLease {
  #released = false
  constructor(
    readonly pool: StagingPool,
    readonly blocks: ArrayBuffer[],
    /** Bytes copied. */
    readonly bytes: number,
  ) {}

  release(): void {
    if (this.#released) return
    this.#released = true
    this.pool.giveBack(this.blocks)
  }
}

/**
 * Reusable staging blocks. {@link StagingPool.stage} copies a list of byte views into blocks taken from the idle
 * list (the smallest that fits) or allocated, and returns the copies; {@link StagingLease.release} gives the
 * blocks back. At most `maxIdleBlocks` idle blocks are kept (the largest), so a one-off save of a large state
 * dict keeps that much host memory until {@link StagingPool.clear} — what lets the next save skip allocating.
 */
export class StagingPool {
  #idle: ArrayBuffer[] = []
  #inUse = 0
  #allocations = 0
  #bytesAllocated = 0
  #reuses = 0

  /**
   * `download` copies a device tensor's bytes into staging memory (default: a device-to-host transfer; tests give a host
   * stand-in, so that the ordering of device and host copies is covered on machines without a GPU).
   */
  constructor(
    readonly maxIdleBlocks = 4,
    readonly download: (leaf: DeviceLeaf, into: Uint8Array) => Promise<void> = downloadInto,
  ) {
    // checked here: a bad count would only fail (a RangeError) when a save gives its blocks back, after it wrote
    if (!Number.isSafeInteger(maxIdleBlocks) || maxIdleBlocks < 0) {
      throw new DistcpError('ERR_DISTCP_INVALID_INPUT', `StagingPool: maxIdleBlocks must be a non-negative integer, not ${String(maxIdleBlocks)}`)
    }
  }

  stats(): StagingStats {
    return {
      allocations: this.#allocations,
      bytesAllocated: this.#bytesAllocated,
      reuses: this.#reuses,
      blocksInUse: this.#inUse,
      idleBlocks: this.#idle.length,
      idleBytes: this.#idle.reduce((s, b) => s + b.byteLength, 0),
    }
  }

  /** Drops the idle blocks (the memory is freed when the garbage collector runs). */
  clear(): void {
    this.#idle = []
  }

  #take(need: number): ArrayBuffer {
    let best = -1
    for (let i = 0; i < this.#idle.length; i++) {
      const b = this.#idle[i]
      if (b.byteLength >= need && (best < 0 || b.byteLength < this.#idle[best].byteLength)) best = i
    }
    this.#inUse++
    if (best >= 0) {
      this.#reuses++
      return this.#idle.splice(best, 1)[0]
    }
    const size = alignUp(Math.max(need, 1), ROUND)
    const block = allocBlock(size)
    this.#allocations++
    this.#bytesAllocated += size
    return block
  }

  /** @internal */
  giveBack(blocks: ArrayBuffer[]): void {
    this.#inUse -= blocks.length
    this.#idle.push(...blocks)
    if (this.#idle.length > this.maxIdleBlocks) {
      this.#idle.sort((a, b) => b.byteLength - a.byteLength)
      this.#idle.length = this.maxIdleBlocks
    }
  }

  /**
   * Copies `sources` into staging blocks: returns the copies (same order) and the lease that owns them. Sources are
   * packed in order into blocks of up to 1 GiB; the block sizes depend only on the source sizes, so the same state
   * dict saved again reuses the same blocks. A promise only when a source is in device memory (its copy is a
   * device-to-host transfer): host bytes are copied before this returns.
   */
  stage(sources: readonly StageSource[]): Staged | Promise<Staged> {
    const r = this.reserve(sources)
    const done = (): Staged => ({ copies: r.copies, lease: r.lease })
    let filling: void | Promise<void>
    try {
      filling = r.fill()
    } catch (e) {
      r.lease.release()
      throw e
    }
    if (!filling) return done()
    return filling.then(done, (e: unknown) => {
      r.lease.release()
      throw e
    })
  }

  /**
   * {@link StagingPool.stage} in two steps: takes the blocks and returns the views the copies will be (not yet
   * holding their bytes), and `fill`, which copies `sources[i]` into `copies[i]` in index order, calling
   * `onFilled(i + 1)` after each — so that a writer given `copies` can start on the first while the rest are
   * being copied. Host sources are all copied before `fill` returns; `fill` returns a promise when a source is in
   * device memory (then it settles when every transfer is done). The caller releases the lease (also when `fill`
   * fails).
   * @internal
   */
  reserve(sources: readonly StageSource[]): { copies: Uint8Array[]; lease: StagingLease; fill: (onFilled?: (filled: number) => void) => void | Promise<void> } {
    // plan: consecutive sources share a block while they fit in BLOCK_BYTES
    const plan: { need: number; members: number[]; offsets: number[] }[] = []
    let cur: { need: number; members: number[]; offsets: number[] } | undefined
    let total = 0
    for (let i = 0; i < sources.length; i++) {
      const n = sources[i].byteLength
      total += n
      if (n === 0) continue
      const at = cur ? alignUp(cur.need, ALIGN) : 0
      if (!cur || at + n > BLOCK_BYTES) {
        cur = { need: 0, members: [], offsets: [] }
        plan.push(cur)
      }
      const off = alignUp(cur.need, ALIGN)
      cur.members.push(i)
      cur.offsets.push(off)
      cur.need = off + n
    }
    const copies: Uint8Array[] = sources.map(() => new Uint8Array(0))
    const blocks: ArrayBuffer[] = []
    try {
      for (const p of plan) {
        const block = this.#take(p.need)
        blocks.push(block)
        for (let j = 0; j < p.members.length; j++) {
          copies[p.members[j]] = new Uint8Array(block, p.offsets[j], sources[p.members[j]].byteLength)
        }
      }
    } catch (e) {
      this.giveBack(blocks)
      throw e
    }
    const onDevice = (i: number): DeviceLeaf | null => {
      const s = sources[i]
      return s instanceof Uint8Array || s.byteLength === 0 ? null : s
    }
    const fill = (onFilled?: (filled: number) => void): void | Promise<void> => {
      if (onFilled === undefined) {
        // nobody waits on single items: one native call copies the host sources, on several threads (the
        // trainer's wait in saveAsync is this copy); device sources follow, one transfer each
        const host = sources.flatMap((v, i) => (v instanceof Uint8Array && v.byteLength > 0 ? [i] : []))
        native.copyStaging(
          host.map((i) => sources[i] as Uint8Array),
          host.map((i) => copies[i]),
        )
        const device = sources.flatMap((_, i) => (onDevice(i) ? [i] : []))
        if (device.length === 0) return
        return device.reduce((p, i) => p.then(() => this.download(onDevice(i) as DeviceLeaf, copies[i])), Promise.resolve())
      }
      // every host source is copied in the call (the caller may change its buffers once `save` returned), the
      // caller told in index order: at once up to the first device source, the rest as the transfers land
      const hostCopy = (i: number): void => {
        const s = sources[i]
        if (s instanceof Uint8Array && s.byteLength > 0) copies[i].set(s)
      }
      let first = 0
      for (; first < sources.length && !onDevice(first); first++) {
        hostCopy(first)
        onFilled(first + 1)
      }
      if (first === sources.length) return
      for (let i = first + 1; i < sources.length; i++) if (!onDevice(i)) hostCopy(i)
      return (async () => {
        for (let i = first; i < sources.length; i++) {
          const leaf = onDevice(i)
          if (leaf) await this.download(leaf, copies[i])
          onFilled(i + 1)
        }
      })()
    }
    return { copies, lease: new StagingLease(this, blocks, total), fill }
  }
}

/** The process-wide pool `save` and `saveAsync` stage into. */
export const stagingPool = new StagingPool()
