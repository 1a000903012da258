/**
 * distcp: PyTorch Distributed Checkpoints (DCP) from Node.js.
 * @packageDocumentation
 */
export { openCheckpoint, Checkpoint, retarget } from './checkpoint.js'
export type {
  ChunkInfo,
  TensorInfo,
  ObjectInfo,
  ReadOptions,
  ObjectReadOptions,
  OpenOptions,
  StateDict,
  StateValue,
  CheckpointSummary,
  RetargetOptions,
  RetargetResult,
} from './checkpoint.js'
export { typedArray, elementSize, numel, isTensor } from './tensor.js'
export type { DType, Tensor, TypedArrayFor } from './tensor.js'
export { PyFloat, PyTuple } from './values.js'
export type { PyValue } from './values.js'
export { DistcpError } from './errors.js'
export { convertDcpToHf, planDcpToHf } from './convert.js'
export type { ConvertOptions, ConvertProgress, ConvertPlan, PlannedTensor } from './convert.js'
export { resolveModel, hubCacheDir } from './hf.js'
// writer
export { save, pyFloat, pyTuple } from './save.js'
export type { SaveOptions, SaveResult, SaveStateDict, HasStateDict } from './save.js'
// trainer API (load, stateful, checkpointing)
export { load, flattenStateDict, isStateful, LoadMismatchError } from './load.js'
export type { LoadOptions, LoadReport, LoadStateDict, Mismatch } from './load.js'
export { ModelState, OptimizerState, initOptimizerState } from './stateful.js'
export type {
  Stateful,
  Parameter,
  Model,
  ParamGroup,
  ParamGroupState,
  Optimizer,
  OptimizerStateDict,
  FqnOptimizerState,
  LRScheduler,
} from './stateful.js'
export { saveCheckpoint, loadCheckpoint, saveTokenizer } from './checkpointing.js'
export type { SaveCheckpointOptions, LoadCheckpointOptions, LoadCheckpointResult, TokenizerSource } from './checkpointing.js'
