//! Multi-rank save (`distcp_core::write::ranks`): the TypeScript layer plans and coordinates over c10d's TCPStore;
//! this converts its JSON to the core's types, writes one rank's data file on a worker thread, and holds the
//! coordinator's folder lock between calls. JSON shapes (all produced by `src/distributed/`):
//! - plan: `[[key, offsets | null], …]`;
//! - storage entries: `[[fqn, offsets | null, relativePath, offset, length], …]`;
//! - metadata: `{ items: [[key, null | { dtype, size, chunks: [[offsets, sizes], …] }], …],
//!   planner: [[key, [str | int, …]], …], storage: […], version: str | null }`;
//! - a planner path (from `flattenStateDictKeys`): `[str | int, …]` (dict key, list index).

use crate::background::at_background_priority;
use crate::errors::{closed, invalid_input as bad, job, to_js, Job, Result, Work};
use distcp_core::dtype::DType;
use distcp_core::metadata::{
  Chunk, ItemMetadata, PathElem, StorageInfo, StorageKey, TensorMetadata, TensorProperties,
};
use distcp_core::write::ranks::{write_rank_data, PlannedItem, RankLocalSave, RanksMetadata, RanksSave};
use distcp_core::write::{from_tagged_json, Layout};
use napi::bindgen_prelude::{AsyncTask, Uint8Array};
use napi::Env;
use napi_derive::napi;
use serde_json::{json, Value};
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

fn parse(what: &str, s: &str) -> Result<Value> {
  serde_json::from_str(s).map_err(|e| bad(format!("{what}: {e}")))
}

fn arr<'v>(v: &'v Value, what: &str) -> Result<&'v Vec<Value>> {
  v.as_array().ok_or_else(|| bad(format!("{what}: expected an array")))
}

fn string(v: &Value, what: &str) -> Result<String> {
  v.as_str().map(str::to_owned).ok_or_else(|| bad(format!("{what}: expected a string")))
}

fn uint(v: &Value, what: &str) -> Result<u64> {
  v.as_u64().ok_or_else(|| bad(format!("{what}: expected a non-negative integer")))
}

fn dims(v: &Value, what: &str) -> Result<Vec<u64>> {
  arr(v, what)?.iter().map(|d| uint(d, what)).collect()
}

fn offsets(v: &Value, what: &str) -> Result<Option<Vec<u64>>> {
  if v.is_null() {
    Ok(None)
  } else {
    dims(v, what).map(Some)
  }
}

fn storage_from_json(v: &Value) -> Result<Vec<(StorageKey, StorageInfo)>> {
  arr(v, "storage")?
    .iter()
    .map(|e| {
      let e = arr(e, "storage entry")?;
      if e.len() != 5 {
        return Err(bad("storage entry: expected [fqn, offsets, relativePath, offset, length]"));
      }
      Ok((
        StorageKey { fqn: string(&e[0], "fqn")?, offset: offsets(&e[1], "offsets")? },
        StorageInfo {
          relative_path: string(&e[2], "relativePath")?,
          offset: uint(&e[3], "offset")?,
          length: uint(&e[4], "length")?,
          transform_descriptors: vec![],
        },
      ))
    })
    .collect()
}

fn storage_to_json(s: &[(StorageKey, StorageInfo)]) -> String {
  Value::Array(s.iter().map(|(k, i)| json!([k.fqn, k.offset, i.relative_path, i.offset, i.length])).collect())
    .to_string()
}

fn path_from_json(v: &Value) -> Result<Vec<PathElem>> {
  arr(v, "planner path")?
    .iter()
    .map(|e| match e {
      Value::String(s) => Ok(PathElem::Key(s.clone())),
      Value::Number(n) => n.as_i64().map(PathElem::Index).ok_or_else(|| bad("planner path: bad index")),
      _ => Err(bad("planner path: expected strings and integers")),
    })
    .collect()
}

pub struct RankWriteTask {
  dir: String,
  file_name: String,
  tree: String,
  buffers: Vec<Uint8Array>,
  plan: Vec<PlannedItem>,
  layout: Layout,
  background: bool,
}

impl Work<'_> for RankWriteTask {
  type Output = String;
  type JsValue = String;

  fn compute(&mut self) -> Result<String> {
    let json = parse(&self.dir, &self.tree)?;
    // the buffers are the save's own copies (src/save.ts `owned`), alive until the promise settles
    let slices: Vec<&[u8]> = self.buffers.iter().map(|b| &**b).collect();
    let value = from_tagged_json(&json, &slices).map_err(|e| bad(format!("{}: {e}", self.dir)))?;
    let (dir, name, layout, plan) = (self.dir.as_ref(), &self.file_name, self.layout, &self.plan);
    let write = || write_rank_data(dir, name, &value, layout, plan, true).map_err(to_js);
    // a panic on the background thread is re-raised here, where the Job's guard catches it
    let storage = if self.background { at_background_priority(write) } else { write() }?;
    Ok(storage_to_json(&storage))
  }

  fn resolve(&mut self, _env: &Env, s: String) -> Result<String> {
    Ok(s)
  }
}

/// Writes one rank's data file `dir/fileName` with the items of `plan` (JSON `[[key, offsets | null], …]`) from the
/// state dict `tree`; resolves to the storage entries as JSON. `background` (saveAsync) writes on a thread of lower
/// CPU priority, as a single-rank `saveAsync` does (see `background.rs`).
#[napi(ts_return_type = "Promise<string>")]
pub fn write_rank_data_file(
  dir: String,
  file_name: String,
  tree: String,
  buffers: Vec<Uint8Array>,
  plan: String,
  layout: Option<String>,
  background: Option<bool>,
) -> Result<AsyncTask<Job<RankWriteTask>>> {
  let layout = layout_of(layout)?;
  let plan = arr(&parse("plan", &plan)?, "plan")?
    .iter()
    .map(|e| {
      let e = arr(e, "plan item")?;
      match e.as_slice() {
        [k, o] => Ok(PlannedItem { key: string(k, "plan key")?, offsets: offsets(o, "plan offsets")? }),
        _ => Err(bad("plan item: expected [key, offsets]")),
      }
    })
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

fn metadata_from_json(v: &Value) -> Result<RanksMetadata> {
  let items = arr(&v["items"], "items")?
    .iter()
    .map(|e| {
      let e = arr(e, "item")?;
      let [k, m] = e.as_slice() else { return Err(bad("item: expected [key, meta]")) };
      let key = string(k, "item key")?;
      if m.is_null() {
        return Ok((key, ItemMetadata::Bytes));
      }
      let dtype_name = string(&m["dtype"], "dtype")?;
      let dtype =
        DType::from_name(&dtype_name).ok_or_else(|| bad(format!("`{key}`: unknown dtype {dtype_name}")))?;
      let chunks = arr(&m["chunks"], "chunks")?
        .iter()
        .map(|c| {
          let c = arr(c, "chunk")?;
          let [o, s] = c.as_slice() else { return Err(bad("chunk: expected [offsets, sizes]")) };
          Ok(Chunk { offsets: dims(o, "chunk offsets")?, sizes: dims(s, "chunk sizes")? })
        })
        .collect::<Result<Vec<_>>>()?;
      let properties = TensorProperties {
        dtype,
        requires_grad: false,
        pin_memory: false,
        module: SHARD_METADATA.to_owned(),
      };
      Ok((key, ItemMetadata::Tensor(TensorMetadata { properties, size: dims(&m["size"], "size")?, chunks })))
    })
    .collect::<Result<Vec<_>>>()?;
  let planner_data = arr(&v["planner"], "planner")?
    .iter()
    .map(|e| {
      let e = arr(e, "planner entry")?;
      let [k, p] = e.as_slice() else { return Err(bad("planner entry: expected [key, path]")) };
      Ok((string(k, "planner key")?, path_from_json(p)?))
    })
    .collect::<Result<Vec<_>>>()?;
  let storage = storage_from_json(&v["storage"])?;
  let version = if v["version"].is_null() { None } else { Some(string(&v["version"], "version")?) };
  Ok(RanksMetadata { items, planner_data, storage, version })
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

  /// Commits the metadata (JSON, see the module docs) on a worker thread; resolves to its size in bytes.
  #[napi(catch_unwind, ts_return_type = "Promise<number>")]
  pub fn commit(&self, metadata: String) -> Result<AsyncTask<Job<RanksCommitTask>>> {
    let md = metadata_from_json(&parse("metadata", &metadata)?)?;
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
