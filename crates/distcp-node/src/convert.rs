//! Conversion to safetensors: the whole job in one native call (`run`; TypeScript polls `progress` at its own
//! interval and `cancel` sets the flag the job checks between tensors and slabs), or one tensor at a time.

use crate::checkpoint::NativeCheckpoint;
use crate::errors::{invalid_arg, job, to_js, Job, Result, Work};
use distcp_core::convert::{self, ConvertEntry, ConvertJob, JobProgress};
use distcp_core::{Checkpoint, DType};
use napi::bindgen_prelude::AsyncTask;
use napi::Env;
use napi_derive::napi;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

#[napi(object)]
pub struct ConvertEntryJs {
  /// Key in the checkpoint.
  pub key: String,
  /// Tensor name in the output.
  pub name: String,
}

#[napi(object)]
pub struct ConvertProgressJs {
  /// Bytes of tensor data written so far.
  pub bytes_done: f64,
  /// Tensors written so far (the first `tensorsDone` of the plan).
  pub tensors_done: f64,
}

#[napi(object)]
pub struct TensorWrittenJs {
  pub bytes: f64,
  pub kernel_copied: f64,
}

fn plan_for(
  ck: &Checkpoint,
  entries: Vec<ConvertEntryJs>,
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
  let entries: Vec<ConvertEntry> =
    entries.into_iter().map(|e| ConvertEntry { key: e.key, name: e.name }).collect();
  convert::plan(ck, &entries, dtype, max_shard_size as u64).map_err(to_js)
}

/// The conversion plan (shards, tensors, offsets, index) as JSON, from `.metadata` alone.
#[napi(catch_unwind)]
pub fn plan_convert(
  checkpoint: &NativeCheckpoint,
  entries: Vec<ConvertEntryJs>,
  dtype: Option<String>,
  max_shard_size: f64,
) -> Result<String> {
  let ck = checkpoint.get()?;
  let plan = plan_for(&ck, entries, dtype, max_shard_size)?;
  serde_json::to_string(&plan).map_err(|e| invalid_arg(e.to_string()))
}

/// A conversion plan held natively: planned once, read by TypeScript as a summary (or whole, as JSON, for
/// `onPlan` / `dryRun`), and handed to the job that executes it.
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

/// Plans a conversion (as `planConvert`) and keeps the plan natively.
#[napi(catch_unwind)]
pub fn plan_convert_native(
  checkpoint: &NativeCheckpoint,
  entries: Vec<ConvertEntryJs>,
  dtype: Option<String>,
  max_shard_size: f64,
) -> Result<NativeConvertPlan> {
  let ck = checkpoint.get()?;
  let plan = plan_for(&ck, entries, dtype, max_shard_size)?;
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
  /// The whole plan as JSON (what `planConvert` returns).
  #[napi(catch_unwind)]
  pub fn json(&self) -> Result<String> {
    self.with(|p| serde_json::to_string(p).map_err(|e| invalid_arg(e.to_string())))?
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

/// Starts a conversion of `plan` (taken: a plan runs once) into `dir`, as `createConvertJob` without planning again.
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

/// Starts a conversion into `dir` (an existing empty folder; the caller renames it into place when done).
#[napi(catch_unwind)]
pub fn create_convert_job(
  checkpoint: &NativeCheckpoint,
  entries: Vec<ConvertEntryJs>,
  dtype: Option<String>,
  max_shard_size: f64,
  dir: String,
) -> Result<NativeConvertJob> {
  let ck = checkpoint.get()?;
  let plan = plan_for(&ck, entries, dtype, max_shard_size)?;
  let job = ConvertJob::new(plan, dir);
  let cancel = job.cancel_flag();
  let progress = job.progress();
  Ok(NativeConvertJob { ck, job: Arc::new(Mutex::new(job)), cancel, progress })
}

enum Step {
  All,
  Tensor(u32),
  Finish,
  PytorchModelBin,
}

pub struct WriteTensorTask {
  ck: Arc<Checkpoint>,
  job: Arc<Mutex<ConvertJob>>,
  step: Step,
}

impl WriteTensorTask {
  fn progress_bytes(&self, job: &ConvertJob) -> f64 {
    job.progress().bytes() as f64
  }
}

impl Work<'_> for WriteTensorTask {
  type Output = (f64, f64);
  type JsValue = TensorWrittenJs;

  fn compute(&mut self) -> Result<(f64, f64)> {
    let mut job = self.job.lock().unwrap_or_else(|p| p.into_inner());
    match self.step {
      Step::All => {
        job.write_all(&self.ck).map_err(to_js)?;
        Ok((self.progress_bytes(&job), 0.0))
      }
      Step::Tensor(i) => {
        let w = job.write_tensor(&self.ck, i as usize).map_err(to_js)?;
        Ok((w.bytes as f64, w.kernel_copied as f64))
      }
      Step::Finish => {
        job.finish().map_err(to_js)?;
        Ok((0.0, 0.0))
      }
      Step::PytorchModelBin => Ok((job.write_pytorch_model_bin(&self.ck).map_err(to_js)? as f64, 0.0)),
    }
  }

  fn resolve(&mut self, _env: &Env, (bytes, kernel_copied): (f64, f64)) -> Result<TensorWrittenJs> {
    Ok(TensorWrittenJs { bytes, kernel_copied })
  }
}

#[napi]
impl NativeConvertJob {
  /// Writes every tensor of the plan and finishes (the whole conversion on a worker thread); resolves with the
  /// bytes written. Poll `progress` meanwhile; `cancel` stops it with ERR_DISTCP_ABORTED.
  #[napi(ts_return_type = "Promise<TensorWrittenJs>")]
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

  /// Writes tensor `index` of the plan (the plan's `tensors` order).
  #[napi(ts_return_type = "Promise<TensorWrittenJs>")]
  pub fn write_tensor(&self, index: u32) -> AsyncTask<Job<WriteTensorTask>> {
    job(WriteTensorTask { ck: self.ck.clone(), job: self.job.clone(), step: Step::Tensor(index) })
  }

  /// Creates empty shards, writes the index, fsyncs every file.
  #[napi(ts_return_type = "Promise<TensorWrittenJs>")]
  pub fn finish(&self) -> AsyncTask<Job<WriteTensorTask>> {
    job(WriteTensorTask { ck: self.ck.clone(), job: self.job.clone(), step: Step::Finish })
  }

  /// Writes `pytorch_model.bin` (the seed's single torch.save file) instead of safetensors shards.
  #[napi(ts_return_type = "Promise<TensorWrittenJs>")]
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

/// The keys of `checkpoint` that hold tensors, in `.metadata` order: what a conversion considers, in one call
/// instead of one `info` per key (an MoE checkpoint has tens of thousands).
#[napi(catch_unwind)]
pub fn convert_tensor_keys(checkpoint: &NativeCheckpoint) -> Result<Vec<String>> {
  let ck = checkpoint.get()?;
  Ok(
    ck.keys()
      .filter(|k| matches!(ck.item(k), Ok(distcp_core::metadata::ItemMetadata::Tensor(_))))
      .map(str::to_owned)
      .collect(),
  )
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
