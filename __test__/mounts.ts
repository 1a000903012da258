import { spawnSync } from 'node:child_process'
import { mkdirSync } from 'node:fs'

/**
 * Mounts a small tmpfs at `dir` (for disk-full and read-only tests). Returns an unmount function, or the reason
 * it could not (not root, no CAP_SYS_ADMIN) so a test can say what it did not check.
 */
export function mountTmpfs(dir: string, sizeBytes: number): { unmount: () => void } | { reason: string } {
  mkdirSync(dir, { recursive: true })
  const m = spawnSync('mount', ['-t', 'tmpfs', '-o', `size=${sizeBytes}`, 'tmpfs', dir], { encoding: 'utf8' })
  if (m.status !== 0) return { reason: `mount -t tmpfs failed: ${(m.stderr || String(m.error)).trim()}` }
  return { unmount: () => void spawnSync('umount', ['-l', dir]) }
}

/** Remounts a tmpfs mounted by {@link mountTmpfs} read-only. */
export function remountReadOnly(dir: string): boolean {
  return spawnSync('mount', ['-o', 'remount,ro', dir]).status === 0
}
