import { ERROR_CODES, type DistcpErrorCode } from './codes.js'

export type { DistcpErrorCode } from './codes.js'
export { ERROR_CODES } from './codes.js'

/** Every error distcp raises. `code` is stable (`ERR_DISTCP_*`); the message names the file and the key. */
export class DistcpError extends Error {
  readonly code: DistcpErrorCode

  constructor(code: DistcpErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options)
    this.name = 'DistcpError'
    this.code = code
  }
}

const KNOWN = new Set<string>(ERROR_CODES)

/** A code from the native layer; one the union does not list (a bug: the codes test guards it) is kept as INTERNAL. */
function knownCode(code: string): DistcpErrorCode {
  return KNOWN.has(code) ? (code as DistcpErrorCode) : 'ERR_DISTCP_INTERNAL'
}

/** napi-rs's own argument checks (`StringExpected`, `NumberExpected`, …) before any distcp code runs. */
const NAPI_ARGUMENT = /Expected$|^InvalidArg$/

/**
 * The binding sets `code` natively (`ERR_DISTCP_*`, crates/distcp-node/src/errors.rs); this gives such errors their
 * public class. napi's own argument errors (a wrong JS type reached the binding) become
 * `ERR_DISTCP_INVALID_ARGUMENT`, and its `GenericFailure` (a panic caught on the JS thread) `ERR_DISTCP_INTERNAL`,
 * so every error distcp throws carries an `ERR_DISTCP_*` code.
 */
export function fromNative(e: unknown): unknown {
  if (!(e instanceof Error) || e instanceof DistcpError) return e
  const code = (e as { code?: unknown }).code
  if (typeof code !== 'string') return e
  if (code.startsWith('ERR_DISTCP_')) return new DistcpError(knownCode(code), e.message, { cause: e })
  if (NAPI_ARGUMENT.test(code)) {
    return new DistcpError('ERR_DISTCP_INVALID_ARGUMENT', `invalid argument: ${e.message}`, { cause: e })
  }
  if (code === 'GenericFailure') {
    return new DistcpError('ERR_DISTCP_INTERNAL', `internal error (a bug in distcp): ${e.message}`, { cause: e })
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
