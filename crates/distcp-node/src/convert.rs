//! Conversion to safetensors: the selection of tensors, the plan and the whole job held natively and run in one
//! native call (`run`, or `runShards` for one rank's share; TypeScript polls `progress` at its own interval and
//! `cancel` sets the flag the job checks between tensors and slabs).

use crate::checkpoint::NativeCheckpoint;
use crate::errors::{invalid_arg, job, to_js, Job, Result, Work};
use distcp_core::convert::{self, ConvertJob, JobProgress};
use distcp_core::{Checkpoint, DType};
use napi::bindgen_prelude::AsyncTask;
use napi::Env;
use napi_derive::napi;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

#[napi(object)]
pub struct KeyRenameJs {
  /// Prefix to replace.
  pub from: String,
  /// What replaces it.
  pub to: String,
}

/// Which tensors a conversion writes and under which names (`ConvertOptions.keyMap` / `include` / `exclude`).
#[napi(object)]
pub struct ConvertSelectionJs {
  /// Prefix renames, tried in order; the first that starts the name applies.
  pub key_map: Option<Vec<KeyRenameJs>>,
  /// Only names matching one of these globs.
  pub include: Option<Vec<String>>,
  /// Names matching one of these globs are left out.
  pub exclude: Option<Vec<String>>,
}

#[napi(object)]
pub struct SkippedJs {
  /// Key in the checkpoint.
  pub key: String,
  /// Why it is left out.
  pub reason: String,
}

/// The tensors a conversion writes, chosen natively from every key of the checkpoint (`select`), held here so
/// that tens of thousands of keys and names never cross into JavaScript.
#[napi]
pub struct NativeConvertSelection {
  selected: Mutex<convert::Selected>,
}

/// Chooses the tensors of `checkpoint` to convert and their output names (the core's `convert::select`).
#[napi(catch_unwind)]
pub fn select_convert_entries(
  checkpoint: &NativeCheckpoint,
  selection: ConvertSelectionJs,
) -> Result<NativeConvertSelection> {
  let ck = checkpoint.get()?;
  let sel = convert::Selection {
    key_map: selection.key_map.unwrap_or_default().into_iter().map(|r| (r.from, r.to)).collect(),
    include: selection.include,
    exclude: selection.exclude.unwrap_or_default(),
  };
  Ok(NativeConvertSelection { selected: Mutex::new(convert::select(&ck, &sel)) })
}

impl NativeConvertSelection {
  fn with<T>(&self, f: impl FnOnce(&mut convert::Selected) -> T) -> T {
    f(&mut self.selected.lock().unwrap_or_else(|p| p.into_inner()))
  }
}

#[napi]
impl NativeConvertSelection {
  /// The keys left out, and why.
  #[napi]
  pub fn skipped(&self) -> Vec<SkippedJs> {
    self.with(|s| {
      s.skipped.iter().map(|k| SkippedJs { key: k.key.clone(), reason: k.reason.clone() }).collect()
    })
  }

  /// The key written under output name `name`, or null.
  #[napi]
  pub fn key_of(&self, name: String) -> Option<String> {
    self.with(|s| s.key_of(&name).map(str::to_owned))
  }

  /// Leaves out the tensor written as `name` (listed in `skipped` with `reason`); false if there is none.
  #[napi]
  pub fn leave_out(&self, name: String, reason: String) -> bool {
    self.with(|s| s.drop_name(&name, &reason))
  }
}

#[napi(object)]
pub struct ConvertProgressJs {
  /// Bytes of tensor data written so far.
  pub bytes_done: f64,
  /// Tensors written so far (the first `tensorsDone` of the plan).
  pub tensors_done: f64,
}

fn plan_for(
  ck: &Checkpoint,
  selection: &NativeConvertSelection,
  dtype: Option<String>,
  max_shard_size: f64,
) -> Result<convert::ConvertPlan> {
  let dtype = match dtype {
    Some(d) => Some(DType::from_name(&d).ok_or_else(|| invalid_arg(format!("unknown dtype `{d}`")))?),
    None => None,
  };
  if max_shard_size.is_nan() || max_shard_size < 1.0 {
    return Err(invalid_arg(format!("maxShardSize must be at least 1 byte, got {max_shard_size}")));
  }
  selection.with(|s| convert::plan(ck, &s.entries, dtype, max_shard_size as u64)).map_err(to_js)
}

#[napi(object)]
pub struct ShardPlanJs {
  /// File name inside the output folder.
  pub file: String,
  /// Bytes of the file.
  pub size: f64,
  /// Bytes of its JSON header.
  pub header_len: f64,
  /// Indices into `tensors` of the tensors in this file, in file order.
  pub tensors: Vec<u32>,
}

#[napi(object)]
pub struct TensorPlanJs {
  pub key: String,
  pub name: String,
  /// Stored dtype (torch name).
  pub source_dtype: String,
  /// Output dtype (torch name).
  pub dtype: String,
  pub shape: Vec<f64>,
  /// Byte offset of the tensor's data in its file.
  pub offset: f64,
  pub nbytes: f64,
  /// Index into `shards`.
  pub shard: u32,
}

/// The whole plan, for `onPlan`, `dryRun` and the ranks' agreement check.
#[napi(object)]
pub struct ConvertPlanJs {
  pub shards: Vec<ShardPlanJs>,
  pub tensors: Vec<TensorPlanJs>,
  pub total_size: f64,
  /// `model.safetensors.index.json`, when there is more than one shard.
  pub index_json: Option<String>,
}

/// A conversion plan held natively: planned once, read by TypeScript as a summary (or whole, for `onPlan`,
/// `dryRun` and the ranks' agreement check), and handed to the job that executes it.
#[napi]
pub struct NativeConvertPlan {
  plan: Mutex<Option<convert::ConvertPlan>>,
}

#[napi(object)]
pub struct ConvertPlanSummaryJs {
  /// Sum of tensor bytes.
  pub total_size: f64,
  /// Tensors in the plan.
  pub tensors: f64,
  /// Output files, in order.
  pub shard_files: Vec<String>,
  /// Tensors in each output file (the plan's tensors are shard by shard).
  pub shard_tensors: Vec<f64>,
  /// Output bytes per dtype (torch names), for the config's dtype.
  pub dtypes: Vec<String>,
  /// Bytes of each of `dtypes`.
  pub dtype_bytes: Vec<f64>,
}

/// Plans the conversion of `selection` (shards of at most `maxShardSize` bytes of tensor data, floating tensors
/// cast to `dtype` if given) from `.metadata` alone, and keeps the plan natively.
#[napi(catch_unwind)]
pub fn plan_convert_native(
  checkpoint: &NativeCheckpoint,
  selection: &NativeConvertSelection,
  dtype: Option<String>,
  max_shard_size: f64,
) -> Result<NativeConvertPlan> {
  let ck = checkpoint.get()?;
  let plan = plan_for(&ck, selection, dtype, max_shard_size)?;
  Ok(NativeConvertPlan { plan: Mutex::new(Some(plan)) })
}

impl NativeConvertPlan {
  fn with<T>(&self, f: impl FnOnce(&convert::ConvertPlan) -> T) -> Result<T> {
    match &*self.plan.lock().unwrap_or_else(|p| p.into_inner()) {
      Some(p) => Ok(f(p)),
      None => Err(invalid_arg("this plan was already handed to a conversion job")),
    }
  }
}

#[napi]
impl NativeConvertPlan {
  /// The whole plan.
  #[napi(catch_unwind)]
  pub fn plan(&self) -> Result<ConvertPlanJs> {
    self.with(|p| ConvertPlanJs {
      shards: p
        .shards
        .iter()
        .map(|s| ShardPlanJs {
          file: s.file.clone(),
          size: s.size as f64,
          header_len: s.header_len as f64,
          tensors: s.tensors.iter().map(|&i| i as u32).collect(),
        })
        .collect(),
      tensors: p
        .tensors
        .iter()
        .map(|t| TensorPlanJs {
          key: t.key.clone(),
          name: t.name.clone(),
          source_dtype: t.source_dtype.clone(),
          dtype: t.dtype.clone(),
          shape: t.shape.iter().map(|&d| d as f64).collect(),
          offset: t.offset as f64,
          nbytes: t.nbytes as f64,
          shard: t.shard as u32,
        })
        .collect(),
      total_size: p.total_size as f64,
      index_json: p.index_json.clone(),
    })
  }

  /// What a conversion reports and writes beside the weights, without the per-tensor list.
  #[napi(catch_unwind)]
  pub fn summary(&self) -> Result<ConvertPlanSummaryJs> {
    self.with(|p| {
      let mut dtypes: Vec<(String, f64)> = Vec::new();
      for t in &p.tensors {
        match dtypes.iter_mut().find(|(d, _)| *d == t.dtype) {
          Some((_, n)) => *n += t.nbytes as f64,
          None => dtypes.push((t.dtype.clone(), t.nbytes as f64)),
        }
      }
      ConvertPlanSummaryJs {
        total_size: p.total_size as f64,
        tensors: p.tensors.len() as f64,
        shard_files: p.shards.iter().map(|s| s.file.clone()).collect(),
        shard_tensors: p.shards.iter().map(|s| s.tensors.len() as f64).collect(),
        dtype_bytes: dtypes.iter().map(|(_, n)| *n).collect(),
        dtypes: dtypes.into_iter().map(|(d, _)| d).collect(),
      }
    })
  }
}

/// Starts a conversion of `plan` (taken: a plan runs once) into `dir` (an existing empty folder: the staged output).
#[napi(catch_unwind)]
pub fn create_convert_job_from_plan(
  checkpoint: &NativeCheckpoint,
  plan: &NativeConvertPlan,
  dir: String,
) -> Result<NativeConvertJob> {
  let ck = checkpoint.get()?;
  let Some(plan) = plan.plan.lock().unwrap_or_else(|p| p.into_inner()).take() else {
    return Err(invalid_arg("this plan was already handed to a conversion job"));
  };
  let job = ConvertJob::new(plan, dir);
  let cancel = job.cancel_flag();
  let progress = job.progress();
  Ok(NativeConvertJob { ck, job: Arc::new(Mutex::new(job)), cancel, progress })
}

#[napi]
pub struct NativeConvertJob {
  ck: Arc<Checkpoint>,
  job: Arc<Mutex<ConvertJob>>,
  cancel: Arc<AtomicBool>,
  progress: Arc<JobProgress>,
}

enum Step {
  All,
  Shards { shards: Vec<usize>, index: bool },
  PytorchModelBin,
}

pub struct WriteTensorTask {
  ck: Arc<Checkpoint>,
  job: Arc<Mutex<ConvertJob>>,
  step: Step,
}

impl Work<'_> for WriteTensorTask {
  /// Bytes of tensor data written.
  type Output = f64;
  type JsValue = f64;

  fn compute(&mut self) -> Result<f64> {
    let mut job = self.job.lock().unwrap_or_else(|p| p.into_inner());
    match self.step {
      Step::All => job.write_all(&self.ck).map_err(to_js)?,
      Step::Shards { ref shards, index } => {
        job.write_shards(&self.ck, shards).map_err(to_js)?;
        job.finish_shards(shards, index).map_err(to_js)?;
      }
      Step::PytorchModelBin => return Ok(job.write_pytorch_model_bin(&self.ck).map_err(to_js)? as f64),
    }
    Ok(job.progress().bytes() as f64)
  }

  fn resolve(&mut self, _env: &Env, bytes: f64) -> Result<f64> {
    Ok(bytes)
  }
}

#[napi]
impl NativeConvertJob {
  /// Writes every tensor of the plan and finishes (the whole conversion on a worker thread); resolves with the
  /// bytes written. Poll `progress` meanwhile; `cancel` stops it with ERR_DISTCP_ABORTED.
  #[napi(ts_return_type = "Promise<number>")]
  pub fn run(&self) -> AsyncTask<Job<WriteTensorTask>> {
    job(WriteTensorTask { ck: self.ck.clone(), job: self.job.clone(), step: Step::All })
  }

  /// What `run` has written so far (read without waiting for it).
  #[napi]
  pub fn progress(&self) -> ConvertProgressJs {
    ConvertProgressJs {
      bytes_done: self.progress.bytes() as f64,
      tensors_done: self.progress.tensors() as f64,
    }
  }

  /// One rank's share of a multi-rank conversion (`src/distributed/convert.ts`), in one call as `run`: writes the
  /// tensors of `shards` (indices into the plan's shards) into the folder rank 0 staged, and makes those files
  /// durable; with `index`, also writes `model.safetensors.index.json`. Each shard is written by one rank only,
  /// with the same job as a single-process conversion, so the files are the same bytes.
  #[napi(ts_return_type = "Promise<number>")]
  pub fn run_shards(&self, shards: Vec<u32>, index: bool) -> AsyncTask<Job<WriteTensorTask>> {
    let shards = shards.into_iter().map(|s| s as usize).collect();
    job(WriteTensorTask { ck: self.ck.clone(), job: self.job.clone(), step: Step::Shards { shards, index } })
  }

  /// Writes `pytorch_model.bin` (the seed's single torch.save file) instead of safetensors shards.
  #[napi(ts_return_type = "Promise<number>")]
  pub fn write_pytorch_model_bin(&self) -> AsyncTask<Job<WriteTensorTask>> {
    job(WriteTensorTask { ck: self.ck.clone(), job: self.job.clone(), step: Step::PytorchModelBin })
  }

  /// Stops the tensor being written at its next slab; later writes fail with ERR_DISTCP_ABORTED.
  #[napi]
  pub fn cancel(&self) {
    self.cancel.store(true, Ordering::Relaxed);
  }
}

pub struct EqualTask {
  ck: Arc<Checkpoint>,
  a: String,
  b: String,
}

impl Work<'_> for EqualTask {
  type Output = bool;
  type JsValue = bool;

  fn compute(&mut self) -> Result<bool> {
    convert::tensors_equal(&self.ck, &self.a, &self.b).map_err(to_js)
  }

  fn resolve(&mut self, _env: &Env, v: bool) -> Result<bool> {
    Ok(v)
  }
}

/// Whether two tensors of a checkpoint have the same dtype, shape and bytes.
#[napi(ts_return_type = "Promise<boolean>")]
pub fn tensors_equal(
  checkpoint: &NativeCheckpoint,
  a: String,
  b: String,
) -> Result<AsyncTask<Job<EqualTask>>> {
  Ok(job(EqualTask { ck: checkpoint.get()?, a, b }))
}

/// Parses a size like "5GB", "500MB", "2GiB" or "123" into bytes; null if it is not one.
#[napi]
pub fn parse_size(text: String) -> Option<f64> {
  convert::parse_size(&text).map(|v| v as f64)
}

fn paths(v: Vec<String>) -> Vec<std::path::PathBuf> {
  v.into_iter().map(std::path::PathBuf::from).collect()
}

/// Refuses an output folder that is, contains or lies inside one of `inputs` (ERR_DISTCP_OUTPUT_OVERLAPS_INPUT).
#[napi(catch_unwind)]
pub fn check_convert_output(out: String, inputs: Vec<String>) -> Result<()> {
  distcp_core::commit::check_output_path(std::path::Path::new(&out), &paths(inputs)).map_err(to_js)
}

/// An output folder being written: locked, with a temporary folder inside it that the conversion writes into.
/// `commit` moves the files into place (journalled); `abort` (or garbage collection) removes what was staged.
#[napi]
pub struct NativeConvertOutput {
  staged: Mutex<Option<distcp_core::commit::Staged>>,
  tmp: String,
}

/// Locks `out` (created if needed), finishes or removes a dead writer's leftovers and stages a temporary folder.
/// Fails with ERR_DISTCP_LOCKED while another process writes there.
#[napi(catch_unwind)]
pub fn begin_convert_output(out: String, inputs: Vec<String>) -> Result<NativeConvertOutput> {
  let staged =
    distcp_core::commit::stage_output(std::path::Path::new(&out), &paths(inputs)).map_err(to_js)?;
  let tmp = staged.tmp_dir().to_string_lossy().into_owned();
  Ok(NativeConvertOutput { staged: Mutex::new(Some(staged)), tmp })
}

#[napi]
impl NativeConvertOutput {
  /// The temporary folder to write every output file into.
  #[napi(getter)]
  pub fn tmp_dir(&self) -> String {
    self.tmp.clone()
  }

  /// Moves the staged files into the output folder and removes the earlier output's stale weights.
  #[napi(catch_unwind)]
  pub fn commit(&self) -> Result<()> {
    let staged = self.staged.lock().unwrap_or_else(|p| p.into_inner()).take();
    match staged {
      Some(s) => convert::commit_output(s).map_err(to_js),
      None => Err(invalid_arg("this output was already committed or abandoned")),
    }
  }

  /// Removes the staged files (and the output folder if this conversion created it and it is empty).
  #[napi]
  pub fn abort(&self) {
    if let Some(mut s) = self.staged.lock().unwrap_or_else(|p| p.into_inner()).take() {
      s.abort();
    }
  }
}
