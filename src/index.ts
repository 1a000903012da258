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
  DeviceReadOptions,
  StateDict,
  StateValue,
  CheckpointSummary,
  CheckpointLayout,
  RetargetOptions,
  RetargetResult,
} from './checkpoint.js'
export { typedArray, elementSize, numel, isTensor } from './tensor.js'
export type { DType, Tensor, TypedArrayFor } from './tensor.js'
export { PyFloat, PyTuple } from './values.js'
export type { PyValue } from './values.js'
export { DistcpError, ERROR_CODES } from './errors.js'
export type { DistcpErrorCode } from './errors.js'
export { cudaInfo, DeviceTensor } from './cuda.js'
export type { CudaInfo, CudaDeviceInfo, DeviceLeaf, DeviceTarget, DLPackDescriptor } from './cuda.js'
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
// asynchronous save and the checkpoint manager
export { saveAsync, closeAsyncSaves, asyncSaver, AsyncSaver } from './async-save.js'
export type { AsyncSave, AsyncSaveOptions, AsyncSaverOptions, AsyncSaverStats, StagedInfo } from './async-save.js'
export { StagingPool, StagingLease, stagingPool } from './staging.js'
export type { Staged, StageSource, StagingStats } from './staging.js'
export type { AsyncCheckpointSave } from './checkpointing.js'
export { CheckpointManager, MANAGER_MARKER } from './manager.js'
export type { CheckpointManagerOptions, StepCheckpoint, CheckpointEntry, ResumePaths, TrainingInfo } from './manager.js'
// multi-rank: process groups over c10d's TCPStore (torchrun), save/load with `processGroup`
export { initProcessGroup, ProcessGroup, CheckpointError, CollectiveTimeoutError } from './distributed/group.js'
export type { ProcessGroupOptions } from './distributed/group.js'
export { TcpStore, TcpStoreServer } from './distributed/store.js'
export type { StoreOptions, StoreValue } from './distributed/store.js'
export type { ShardedTensor, RanksSaveResult } from './distributed/save.js'
