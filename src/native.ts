// The napi-rs loader is CommonJS (generated `index.cjs`); load it from ESM.
import { createRequire } from 'node:module'
import type * as Native from '../index.cjs'

const require = createRequire(import.meta.url)

export const native: typeof Native = require('../index.cjs')
export type { NativeCheckpoint, NativeDeviceBuffer, ItemInfo as NativeItemInfo, CheckpointSummary } from '../index.cjs'
