//! Multi-rank save (`distcp_core::write::ranks`): the TypeScript layer plans and coordinates over c10d's TCPStore;
//! this converts its plans and metadata (JS arrays and objects, typed below; produced by `src/distributed/`) to the
//! core's types, writes one rank's data file on a worker thread, and holds the coordinator's folder lock between
//! calls. Sizes and offsets arrive as JS numbers and are checked to be non-negative integers here.

use crate::background::at_background_priority;
use crate::errors::{closed, invalid_input as bad, job, to_js, Job, Result, Work};
use crate::tagged::json_from_js;
use distcp_core::dtype::DType;
use distcp_core::metadata::{
  Chunk, ItemMetadata, PathElem, StorageInfo, StorageKey, TensorMetadata, TensorProperties,
};
use distcp_core::write::ranks::{write_rank_data, PlannedItem, RankLocalSave, RanksMetadata, RanksSave};
use distcp_core::write::{from_tagged_json, Layout};
use napi::bindgen_prelude::{AsyncTask, Either, Uint8Array, Unknown};
use napi::Env;
use napi_derive::napi;
use std::sync::{Arc, Mutex};

const SHARD_METADATA: &str = "torch.distributed._shard.sharded_tensor.metadata";

fn layout_of(name: Option<String>) -> Result<Layout> {
  match name {
    None => Ok(Layout::Torch24),
    Some(l) => {
      Layout::from_name(&l).ok_or_else(|| bad(format!("layout must be \"2.4\" or \"2.3\", not {l:?}")))
    }
  }
}

/// Largest integer a JS number holds exactly: sizes and offsets beyond it were already rounded in JS.
const MAX_SAFE_INTEGER: f64 = 9_007_199_254_740_991.0;

fn uint(v: f64, what: &str) -> Result<u64> {
  if v.fract() == 0.0 && (0.0..=MAX_SAFE_INTEGER).contains(&v) {
    Ok(v as u64)
  } else {
    Err(bad(format!("{what}: expected a non-negative integer, not {v}")))
  }
}

fn dims(v: &[f64], what: &str) -> Result<Vec<u64>> {
  v.iter().map(|&d| uint(d, what)).collect()
}

fn offsets(v: &Option<Vec<f64>>, what: &str) -> Result<Option<Vec<u64>>> {
  v.as_deref().map(|o| dims(o, what)).transpose()
}

/// One entry of `.metadata`'s storage data (torch's `MetadataIndex` → `_StorageInfo`): where an item's bytes are.
#[napi(object)]
pub struct StorageEntry {
  pub fqn: String,
  /// The chunk's offsets in its tensor; absent (or null) for a bytes item.
  pub offsets: Option<Vec<f64>>,
  pub relative_path: String,
  pub offset: f64,
  pub length: f64,
}

fn storage_from_js(v: &[StorageEntry]) -> Result<Vec<(StorageKey, StorageInfo)>> {
  v.iter()
    .map(|e| {
      Ok((
        StorageKey { fqn: e.fqn.clone(), offset: offsets(&e.offsets, "storage offsets")? },
        StorageInfo {
          relative_path: e.relative_path.clone(),
          offset: uint(e.offset, "storage offset")?,
          length: uint(e.length, "storage length")?,
          transform_descriptors: vec![],
        },
      ))
    })
    .collect()
}

fn storage_to_js(s: Vec<(StorageKey, StorageInfo)>) -> Vec<StorageEntry> {
  s.into_iter()
    .map(|(k, i)| StorageEntry {
      fqn: k.fqn,
      offsets: k.offset.map(|o| o.into_iter().map(|d| d as f64).collect()),
      relative_path: i.relative_path,
      offset: i.offset as f64,
      length: i.length as f64,
    })
    .collect()
}

fn path_from_js(v: &[Either<String, f64>]) -> Result<Vec<PathElem>> {
  v.iter()
    .map(|e| match e {
      Either::A(s) => Ok(PathElem::Key(s.clone())),
      Either::B(n) if n.fract() == 0.0 && n.abs() <= MAX_SAFE_INTEGER => Ok(PathElem::Index(*n as i64)),
      Either::B(n) => Err(bad(format!("planner path: bad index {n}"))),
    })
    .collect()
}

pub struct RankWriteTask {
  dir: String,
  file_name: String,
  tree: serde_json::Value,
  buffers: Vec<Uint8Array>,
  plan: Vec<PlannedItem>,
  layout: Layout,
  background: bool,
}

impl Work<'_> for RankWriteTask {
  type Output = Vec<(StorageKey, StorageInfo)>;
  type JsValue = Vec<StorageEntry>;

  fn compute(&mut self) -> Result<Vec<(StorageKey, StorageInfo)>> {
    // the buffers are the save's own copies (src/save.ts `owned`), alive until the promise settles
    let slices: Vec<&[u8]> = self.buffers.iter().map(|b| &**b).collect();
    let value = from_tagged_json(&self.tree, &slices).map_err(|e| bad(format!("{}: {e}", self.dir)))?;
    let (dir, name, layout, plan) = (self.dir.as_ref(), &self.file_name, self.layout, &self.plan);
    let write = || write_rank_data(dir, name, &value, layout, plan, true).map_err(to_js);
    // a panic on the background thread is re-raised here, where the Job's guard catches it
    if self.background {
      at_background_priority(write)
    } else {
      write()
    }
  }

  fn resolve(&mut self, _env: &Env, s: Vec<(StorageKey, StorageInfo)>) -> Result<Vec<StorageEntry>> {
    Ok(storage_to_js(s))
  }
}

/// Writes one rank's data file `dir/fileName` with the items of `plan` (`[key, offsets | null]` each: a tensor
/// chunk's offsets, or null for a bytes item) from the state dict `tree` (a tagged tree, as `writeStateDict`
/// takes); resolves to the storage entries. `background` (saveAsync) writes on a thread of lower CPU priority, as
/// a single-rank `saveAsync` does (see `background.rs`).
#[napi(ts_return_type = "Promise<Array<StorageEntry>>")]
#[allow(clippy::too_many_arguments)]
pub fn write_rank_data_file(
  env: &Env,
  dir: String,
  file_name: String,
  #[napi(ts_arg_type = "TaggedValue")] tree: Unknown<'_>,
  buffers: Vec<Uint8Array>,
  plan: Vec<(String, Option<Vec<f64>>)>,
  layout: Option<String>,
  background: Option<bool>,
) -> Result<AsyncTask<Job<RankWriteTask>>> {
  let layout = layout_of(layout)?;
  let tree = json_from_js(env, tree, &dir)?;
  let plan = plan
    .iter()
    .map(|(key, o)| Ok(PlannedItem { key: key.clone(), offsets: offsets(o, "plan offsets")? }))
    .collect::<Result<Vec<_>>>()?;
  Ok(job(RankWriteTask {
    dir,
    file_name,
    tree,
    buffers,
    plan,
    layout,
    background: background.unwrap_or(false),
  }))
}

/// A tensor's entry in `.metadata` (torch's `TensorStorageMetadata`); its chunks are `[offsets, sizes]`.
#[napi(object)]
pub struct RanksItemMeta {
  pub dtype: String,
  pub size: Vec<f64>,
  pub chunks: Vec<(Vec<f64>, Vec<f64>)>,
}

/// What `commit` writes as `.metadata`: the items (`[key, null]` for a bytes item), torch's `planner_data`
/// (flat key → path of dict keys and list indices), the storage entries every rank's write returned, and the
/// version string (`null`: none).
#[napi(object)]
pub struct RanksMetadataInput {
  pub items: Vec<(String, Option<RanksItemMeta>)>,
  #[napi(ts_type = "Array<[string, Array<string | number>]>")]
  pub planner: Vec<(String, Vec<Either<String, f64>>)>,
  pub storage: Vec<StorageEntry>,
  pub version: Option<String>,
}

fn metadata_from_js(v: &RanksMetadataInput) -> Result<RanksMetadata> {
  let items = v
    .items
    .iter()
    .map(|(key, m)| {
      let Some(m) = m else { return Ok((key.clone(), ItemMetadata::Bytes)) };
      let dtype =
        DType::from_name(&m.dtype).ok_or_else(|| bad(format!("`{key}`: unknown dtype {}", m.dtype)))?;
      let chunks = m
        .chunks
        .iter()
        .map(|(o, s)| Ok(Chunk { offsets: dims(o, "chunk offsets")?, sizes: dims(s, "chunk sizes")? }))
        .collect::<Result<Vec<_>>>()?;
      let properties = TensorProperties {
        dtype,
        requires_grad: false,
        pin_memory: false,
        module: SHARD_METADATA.to_owned(),
      };
      Ok((
        key.clone(),
        ItemMetadata::Tensor(TensorMetadata { properties, size: dims(&m.size, "size")?, chunks }),
      ))
    })
    .collect::<Result<Vec<_>>>()?;
  let planner_data =
    v.planner.iter().map(|(k, p)| Ok((k.clone(), path_from_js(p)?))).collect::<Result<Vec<_>>>()?;
  let storage = storage_from_js(&v.storage)?;
  Ok(RanksMetadata { items, planner_data, storage, version: v.version.clone() })
}

/// The two kinds of multi-rank save a handle drives: rank 0's of a coordinated save, or one rank's own save
/// without collectives.
enum Save {
  Ranks(RanksSave),
  Local(RankLocalSave),
}

impl Save {
  fn commit(&self, md: &RanksMetadata) -> distcp_core::error::Result<u64> {
    match self {
      Save::Ranks(s) => s.commit(md, true),
      Save::Local(s) => s.commit(md, true),
    }
  }
}

/// A handle on a multi-rank save: rank 0's (the coordinator's, holding the folder lock) or, for a save without
/// collectives, one rank's (holding the folder lock shared and its rank's lock); held until `release()`.
#[napi]
pub struct RanksSaveHandle {
  // shared with the commit task, which fsyncs on a worker thread
  inner: Arc<Mutex<Option<Save>>>,
}

/// The commit of a multi-rank save: the metadata written, fsynced and renamed into place, off the event loop (the
/// other ranks' collectives keep being served meanwhile).
pub struct RanksCommitTask {
  inner: Arc<Mutex<Option<Save>>>,
  metadata: Option<RanksMetadata>,
}

impl Work<'_> for RanksCommitTask {
  type Output = f64;
  type JsValue = f64;

  fn compute(&mut self) -> Result<f64> {
    let guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
    let (Some(s), Some(md)) = (guard.as_ref(), self.metadata.take()) else {
      return Err(closed("the save was already released"));
    };
    s.commit(&md).map(|n| n as f64).map_err(to_js)
  }

  fn resolve(&mut self, _env: &Env, n: f64) -> Result<f64> {
    Ok(n)
  }
}

#[napi]
impl RanksSaveHandle {
  /// Creates the folder, takes its lock (`ERR_DISTCP_LOCKED`), removes a dead writer's leftovers.
  #[napi(factory, catch_unwind)]
  pub fn begin(dir: String, world_size: u32) -> Result<RanksSaveHandle> {
    let save = RanksSave::begin(&dir, world_size as usize).map_err(to_js)?;
    Ok(RanksSaveHandle { inner: Arc::new(Mutex::new(Some(Save::Ranks(save)))) })
  }

  /// One rank's save without collectives (torch's `use_collectives=False`): creates the folder, takes the folder
  /// lock shared and this rank's lock (`ERR_DISTCP_LOCKED`), refuses a folder with a global `.metadata`
  /// (`ERR_DISTCP_GLOBAL_METADATA`), removes this rank's leftovers of a dead save.
  #[napi(factory, catch_unwind)]
  pub fn begin_rank_local(dir: String, rank: u32) -> Result<RanksSaveHandle> {
    let save = RankLocalSave::begin(&dir, rank as usize).map_err(to_js)?;
    Ok(RanksSaveHandle { inner: Arc::new(Mutex::new(Some(Save::Local(save)))) })
  }

  fn with<T>(&self, f: impl FnOnce(&Save) -> Result<T>) -> Result<T> {
    let guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
    match guard.as_ref() {
      Some(s) => f(s),
      None => Err(closed("the save was already released")),
    }
  }

  /// The file each rank writes, by rank (a save without collectives: this rank's file only).
  #[napi(catch_unwind)]
  pub fn file_names(&self, world_size: u32) -> Result<Vec<String>> {
    self.with(|s| {
      Ok(match s {
        Save::Ranks(s) => (0..world_size as usize).map(|r| s.file_name(r)).collect(),
        Save::Local(s) => vec![s.file_name()],
      })
    })
  }

  /// Whether something was at the path before (the ranks write temporary names).
  #[napi(catch_unwind)]
  pub fn replacing(&self) -> Result<bool> {
    self.with(|s| {
      Ok(match s {
        Save::Ranks(s) => s.replacing,
        Save::Local(s) => s.replacing,
      })
    })
  }

  /// Commits the metadata on a worker thread; resolves to its size in bytes.
  #[napi(catch_unwind, ts_return_type = "Promise<number>")]
  pub fn commit(&self, metadata: RanksMetadataInput) -> Result<AsyncTask<Job<RanksCommitTask>>> {
    let md = metadata_from_js(&metadata)?;
    Ok(job(RanksCommitTask { inner: Arc::clone(&self.inner), metadata: Some(md) }))
  }

  /// Removes the files this save named (after a failure); the previous checkpoint is untouched.
  #[napi(catch_unwind)]
  pub fn abort(&self) -> Result<()> {
    self.with(|s| {
      match s {
        Save::Ranks(s) => s.abort(),
        Save::Local(s) => s.abort(),
      }
      Ok(())
    })
  }

  /// Releases the locks.
  #[napi]
  pub fn release(&self) {
    let mut guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
    *guard = None;
  }
}
