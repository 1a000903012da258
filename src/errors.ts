/** Every error distcp raises. `code` is stable (`ERR_DISTCP_*`); the message names the file and the key. */
export class DistcpError extends Error {
  readonly code: string

  constructor(code: string, message: string, options?: { cause?: unknown }) {
    super(message, options)
    this.name = 'DistcpError'
    this.code = code
  }
}

const CODED = /^\[(ERR_[A-Z_]+)\] ([\s\S]*)$/

/** Native errors arrive as `[CODE] message`; give them their code back. */
export function fromNative(e: unknown): unknown {
  if (e instanceof Error) {
    const m = CODED.exec(e.message)
    if (m) return new DistcpError(m[1], m[2], { cause: e })
  }
  return e
}

export function callNative<T>(f: () => T): T {
  try {
    return f()
  } catch (e) {
    throw fromNative(e)
  }
}

export async function awaitNative<T>(f: () => Promise<T>): Promise<T> {
  try {
    return await f()
  } catch (e) {
    throw fromNative(e)
  }
}
