//! `NativeCheckpoint`: an open checkpoint shared by JS and by worker-thread reads.

use crate::enums::{CheckpointLayout, DType};
use crate::errors::{internal, invalid_arg, job, to_js, Job, Result, Work};
use crate::tagged::TaggedJs;
use distcp_core::metadata::{ItemMetadata, PathElem};
use distcp_core::plan::Region;
use distcp_core::Checkpoint;
use napi::bindgen_prelude::{AsyncTask, Buffer, BufferSlice, Either, Uint32Array, Uint8Array};
use napi::Env;
use napi_derive::napi;
use std::collections::BTreeSet;
use std::sync::{Arc, RwLock};

/// Every key's path in the nested state dict, end to end: key `i` (in `keys()` order) owns the `lengths[i]`
/// elements after those of the keys before it. An element is a dict key (a string) or a list index (a number).
#[napi(object)]
pub struct PlannerPaths {
  pub lengths: Uint32Array,
  pub elements: Vec<Either<String, i64>>,
}

/// One stored chunk of a tensor (a box in global coordinates) and where its record is.
#[napi(object)]
pub struct ChunkInfo {
  pub offsets: Vec<f64>,
  pub sizes: Vec<f64>,
  pub file: String,
  /// Byte offset of the item's record in `file`.
  pub byte_offset: f64,
  /// Length of the record (a `torch.save` archive, or its compressed form).
  pub byte_length: f64,
}

/// What `.metadata` says of one key: a tensor (`kind: "tensor"`, `nbytes` of the whole tensor) or a non-tensor
/// value (`kind: "object"`, `nbytes` of its stored record).
#[napi(discriminant = "kind", discriminant_case = "lowercase")]
pub enum ItemInfo {
  Tensor {
    key: String,
    dtype: DType,
    shape: Vec<f64>,
    nbytes: f64,
    chunks: Vec<ChunkInfo>,
    files: Vec<String>,
  },
  Object {
    key: String,
    nbytes: f64,
    files: Vec<String>,
  },
}

#[napi(object)]
pub struct CheckpointSummary {
  pub path: String,
  pub metadata_file: String,
  /// `Metadata.version` (DCP format version, written by torch ≥ 2.9).
  pub version: Option<String>,
  pub tensor_properties_module: Option<String>,
  pub save_id: Option<String>,
  pub checkpoint_id: Option<String>,
  pub files: Vec<String>,
  /// Number of ranks that wrote data files (`__{rank}_{n}.distcp`).
  pub ranks: u32,
  pub has_planner_data: bool,
  pub has_storage_meta: bool,
  pub layout: CheckpointLayout,
  /// Which writer produced the checkpoint, in words.
  pub writer: String,
  /// The NeMo-RL weights folder the checkpoint was found in.
  pub nemo_rl_weights: Option<String>,
  /// The tokenizer NeMo-RL saved beside the weights (`policy/tokenizer`).
  pub tokenizer_beside: Option<String>,
  /// The oldest torch (`"2.15"`) whose `dcp.load` reads the `.metadata`; absent for layouts without one.
  pub oldest_torch: Option<String>,
}

/// What `retargetCheckpoint` did.
#[napi(object)]
pub struct RetargetResult {
  /// The oldest torch that loaded the checkpoint before, and after (`"2.15"`).
  pub before: String,
  pub after: String,
  /// False when it already loaded on the target torch (nothing was written).
  pub rewritten: bool,
  /// Where the original `.metadata` was kept.
  pub original: Option<String>,
  /// Every metadata file rewritten (`.metadata` and rank-local `__{rank}.metadata`).
  pub files: Vec<String>,
}

fn version_text((major, minor): (u32, u32)) -> String {
  format!("{major}.{minor}")
}

/// Rewrites only the metadata files (`.metadata`, `__{rank}.metadata`) of the checkpoint at `path` so that torch `torch` ("2.13") loads it.
#[napi(catch_unwind)]
pub fn retarget_checkpoint(path: String, torch: String, keep_original: bool) -> Result<RetargetResult> {
  use distcp_core::retarget;
  let Some(target) = retarget::parse_torch_version(&torch) else {
    return Err(invalid_arg(format!("torch: expected a version like 2.13, got {torch:?}")));
  };
  let r = retarget::retarget(std::path::Path::new(&path), target, keep_original).map_err(to_js)?;
  Ok(RetargetResult {
    before: version_text(r.before),
    after: version_text(r.after),
    rewritten: r.rewritten,
    original: r.original.map(|p| p.to_string_lossy().into_owned()),
    files: r.files.iter().map(|p| p.to_string_lossy().into_owned()).collect(),
  })
}

fn dims(v: &[u64]) -> Vec<f64> {
  v.iter().map(|&x| x as f64).collect()
}

fn to_u64s(v: &[f64], what: &str) -> Result<Vec<u64>> {
  v.iter()
    .map(|&x| {
      if x >= 0.0 && x.fract() == 0.0 && x <= 9_007_199_254_740_991.0 {
        Ok(x as u64)
      } else {
        Err(invalid_arg(format!("{what} must be non-negative integers, got {x}")))
      }
    })
    .collect()
}

#[napi]
pub struct NativeCheckpoint {
  inner: Arc<RwLock<Option<Arc<Checkpoint>>>>,
}

impl NativeCheckpoint {
  pub(crate) fn get(&self) -> Result<Arc<Checkpoint>> {
    let guard = self.inner.read().unwrap_or_else(|p| p.into_inner());
    guard.clone().ok_or_else(|| invalid_arg("the checkpoint was closed"))
  }

  pub(crate) fn region(
    &self,
    ck: &Checkpoint,
    key: &str,
    offsets: Option<Vec<f64>>,
    sizes: Option<Vec<f64>>,
  ) -> Result<Region> {
    let offsets = offsets.map(|o| to_u64s(&o, "offsets")).transpose()?;
    let sizes = sizes.map(|s| to_u64s(&s, "sizes")).transpose()?;
    ck.region(key, offsets, sizes).map_err(to_js)
  }
}

pub struct OpenTask {
  path: String,
  rank: Option<u32>,
}

impl Work<'_> for OpenTask {
  type Output = Checkpoint;
  type JsValue = NativeCheckpoint;

  fn compute(&mut self) -> Result<Checkpoint> {
    Checkpoint::open(&self.path, self.rank).map_err(to_js)
  }

  fn resolve(&mut self, _env: &Env, ck: Checkpoint) -> Result<NativeCheckpoint> {
    Ok(NativeCheckpoint { inner: Arc::new(RwLock::new(Some(Arc::new(ck)))) })
  }
}

/// Opens a checkpoint folder on a worker thread (parses `.metadata`).
#[napi(ts_return_type = "Promise<NativeCheckpoint>")]
pub fn open_native_checkpoint(path: String, rank: Option<u32>) -> AsyncTask<Job<OpenTask>> {
  job(OpenTask { path, rank })
}

/// Node's largest Buffer on 64-bit Node 20.
const MAX_BUFFER: u64 = 1 << 32;

pub enum ReadOutput {
  Owned(Vec<u8>),
  /// Fresh anonymous memory, for large results.
  Anonymous(memmap2::MmapMut),
}

/// Results at least this large get their own anonymous mapping, prefaulted by the kernel
/// ([`distcp_core::copy::alloc_host`]) and handed to JS without a copy; smaller ones come from the heap.
const ANON_MIN: usize = 1 << 20;

fn alloc_output(len: usize) -> std::io::Result<memmap2::MmapMut> {
  distcp_core::copy::alloc_host(len)
}

pub struct ReadTask {
  ck: Arc<Checkpoint>,
  key: String,
  region: Region,
  /// Bytes of the result (checked by `read`).
  len: usize,
}

impl<'env> Work<'env> for ReadTask {
  type Output = ReadOutput;
  type JsValue = BufferSlice<'env>;

  fn compute(&mut self) -> Result<ReadOutput> {
    let len = self.len;
    // a WASI module has no anonymous mappings (memmap2's stub fails there): its results come from the heap
    if len >= ANON_MIN && cfg!(not(target_family = "wasm")) {
      // the disk starts before the kernel faults in the new memory, not after: on a cold read the faults (about
      // as costly as the copy, see `alloc_host`) then overlap the disk's work
      let read = self.ck.plan_read(&self.key, &self.region).map_err(to_js)?;
      read.will_need();
      let mut map = alloc_output(len).map_err(|e| to_js(distcp_core::Error::io(&self.ck.root, e)))?;
      read.copy_into(&mut map).map_err(to_js)?;
      return Ok(ReadOutput::Anonymous(map));
    }
    let mut buf = vec![0u8; len];
    self.ck.read_into(&self.key, &self.region, &mut buf).map_err(to_js)?;
    Ok(ReadOutput::Owned(buf))
  }

  fn resolve(&mut self, env: &'env Env, output: ReadOutput) -> Result<BufferSlice<'env>> {
    match output {
      ReadOutput::Owned(v) => BufferSlice::from_data(env, v),
      ReadOutput::Anonymous(mut m) => {
        let (ptr, len) = (m.as_mut_ptr(), m.len());
        // SAFETY: the mapping is ours alone, `len` bytes long, and owned by the finalizer until JS drops the buffer.
        unsafe { BufferSlice::from_external(env, ptr, len, m, |_, m| drop(m)) }
      }
    }
    .map_err(internal)
  }
}

pub struct ReadIntoTask {
  ck: Arc<Checkpoint>,
  key: String,
  region: Region,
  into: Uint8Array,
}

impl Work<'_> for ReadIntoTask {
  type Output = ();
  type JsValue = ();

  fn compute(&mut self) -> Result<()> {
    // SAFETY: the caller promised (documented on `read`) not to touch `into` until the promise settles; the
    // Uint8Array reference keeps its memory alive meanwhile.
    let dst = unsafe { self.into.as_mut() };
    // no huge-page advice on the caller's memory: see `alloc_host` (interleaved A/B on this VM, 8 rounds, fresh
    // 1.08 GB: 3.0–9.5 s with MADV_HUGEPAGE, 0.7–2.4 s without)
    self.ck.read_into(&self.key, &self.region, dst).map_err(to_js)
  }

  fn resolve(&mut self, _env: &Env, _output: ()) -> Result<()> {
    // emnapi hands a WASM module a copy of a JS buffer: what was read into the copy goes back to `into` here
    #[cfg(target_family = "wasm")]
    self.into.sync(_env);
    Ok(())
  }
}

#[napi(object, object_from_js = false)]
pub struct EncodedObject {
  /// The value as a tagged tree (`distcp_core::value::to_tagged_json`; decoded by `src/values.ts`).
  #[napi(ts_type = "TaggedValue")]
  pub value: TaggedJs,
  pub buffers: Vec<Buffer>,
}

pub struct ReadObjectTask {
  ck: Arc<Checkpoint>,
  key: String,
}

impl Work<'_> for ReadObjectTask {
  type Output = (serde_json::Value, Vec<Vec<u8>>);
  type JsValue = EncodedObject;

  fn compute(&mut self) -> Result<(serde_json::Value, Vec<Vec<u8>>)> {
    let obj = self.ck.read_object(&self.key).map_err(to_js)?;
    let mut buffers = Vec::new();
    let json = distcp_core::value::to_tagged_json(obj, &mut buffers);
    Ok((json, buffers))
  }

  fn resolve(
    &mut self,
    _env: &Env,
    (json, buffers): (serde_json::Value, Vec<Vec<u8>>),
  ) -> Result<EncodedObject> {
    Ok(EncodedObject { value: TaggedJs(json), buffers: buffers.into_iter().map(Buffer::from).collect() })
  }
}

#[napi]
impl NativeCheckpoint {
  /// Flat keys in `.metadata` order.
  #[napi(catch_unwind)]
  pub fn keys(&self) -> Result<Vec<String>> {
    Ok(self.get()?.keys().map(str::to_owned).collect())
  }

  #[napi(catch_unwind)]
  pub fn info(&self, key: String) -> Result<ItemInfo> {
    let ck = self.get()?;
    match ck.item(&key).map_err(to_js)? {
      ItemMetadata::Tensor(t) => {
        let nbytes = ck.tensor_bytes(&key).map_err(to_js)?;
        let chunks = ck.chunk_locations(&key).map_err(to_js)?;
        let files: BTreeSet<String> = chunks.iter().map(|c| c.info.relative_path.clone()).collect();
        Ok(ItemInfo::Tensor {
          dtype: t.dtype().into(),
          shape: dims(&t.size),
          nbytes: nbytes as f64,
          chunks: chunks
            .into_iter()
            .map(|c| ChunkInfo {
              offsets: dims(&c.offsets),
              sizes: dims(&c.sizes),
              file: c.info.relative_path,
              byte_offset: c.info.offset as f64,
              byte_length: c.info.length as f64,
            })
            .collect(),
          files: files.into_iter().collect(),
          key,
        })
      }
      ItemMetadata::Bytes => {
        let loc = ck.object_location(&key).map_err(to_js)?;
        Ok(ItemInfo::Object { nbytes: loc.length as f64, files: vec![loc.relative_path], key })
      }
    }
  }

  /// Each key's path in the original nested state dict, keys in `keys()` order: its `planner_data` path, or the
  /// key alone when the checkpoint records none (the core's `Checkpoint::planner_path`).
  #[napi(catch_unwind)]
  pub fn planner_paths(&self) -> Result<PlannerPaths> {
    let ck = self.get()?;
    let mut lengths = Vec::new();
    let mut elements = Vec::new();
    for key in ck.keys() {
      let path = ck.planner_path(key);
      lengths.push(crate::state_dict::to_u32(path.len(), "a planner_data path's length")?);
      elements.extend(path.iter().map(|e| match e {
        PathElem::Key(k) => Either::A(k.clone()),
        PathElem::Index(i) => Either::B(*i),
      }));
    }
    Ok(PlannerPaths { lengths: Uint32Array::new(lengths), elements })
  }

  /// The nested state dict torch saved, as a preorder list of nodes whose leaves index `keys()`
  /// (`state_dict::NestedTree`); the nesting is the core's `Checkpoint::nested`, from `planner_data`.
  #[napi(catch_unwind)]
  pub fn nested(&self) -> Result<crate::state_dict::NestedTree> {
    crate::state_dict::nested_tree(&self.get()?.nested().map_err(to_js)?)
  }

  #[napi(catch_unwind)]
  pub fn summary(&self) -> Result<CheckpointSummary> {
    let ck = self.get()?;
    let s = ck.summary();
    Ok(CheckpointSummary {
      path: ck.root.to_string_lossy().into_owned(),
      metadata_file: s.metadata_file,
      version: s.version,
      tensor_properties_module: s.tensor_properties_module,
      save_id: s.save_id,
      checkpoint_id: s.checkpoint_id,
      ranks: u32::try_from(s.ranks).unwrap_or(u32::MAX),
      files: s.files,
      has_planner_data: s.has_planner_data,
      has_storage_meta: s.has_storage_meta,
      layout: ck.layout.kind.into(),
      writer: s.writer,
      nemo_rl_weights: s.nemo_rl_weights,
      tokenizer_beside: s.tokenizer_beside,
      oldest_torch: s.oldest_torch.map(version_text),
    })
  }

  /// Reads a tensor, or the box `offsets`/`sizes` of it, into a new Buffer (row-major).
  #[napi(ts_return_type = "Promise<Buffer>")]
  pub fn read(
    &self,
    key: String,
    offsets: Option<Vec<f64>>,
    sizes: Option<Vec<f64>>,
  ) -> Result<AsyncTask<Job<ReadTask>>> {
    let ck = self.get()?;
    let region = self.region(&ck, &key, offsets, sizes)?;
    let dtype = ck.dtype(&key).map_err(to_js)?;
    let bytes = distcp_core::limits::checked_nbytes(&region.sizes, dtype.size()).unwrap_or(u64::MAX);
    if bytes >= MAX_BUFFER {
      return Err(invalid_arg(format!(
        "{}: key `{key}`: {bytes} bytes is more than one Node buffer can hold ({MAX_BUFFER}); read it in boxes with \
         offsets/sizes, or into your own memory with `into`",
        ck.root.display()
      )));
    }
    Ok(job(ReadTask { ck, key, region, len: bytes as usize }))
  }

  /// Reads a tensor (or a box of it) straight into `into`, which must hold exactly its bytes.
  #[napi(ts_return_type = "Promise<void>")]
  pub fn read_into(
    &self,
    key: String,
    into: Uint8Array,
    offsets: Option<Vec<f64>>,
    sizes: Option<Vec<f64>>,
  ) -> Result<AsyncTask<Job<ReadIntoTask>>> {
    let ck = self.get()?;
    let region = self.region(&ck, &key, offsets, sizes)?;
    Ok(job(ReadIntoTask { ck, key, region, into }))
  }

  /// Reads a non-tensor value (encoded, see `src/values.ts`).
  #[napi(ts_return_type = "Promise<EncodedObject>")]
  pub fn read_object(&self, key: String) -> Result<AsyncTask<Job<ReadObjectTask>>> {
    Ok(job(ReadObjectTask { ck: self.get()?, key }))
  }

  /// Drops the metadata and data-file mappings held by this handle (buffers already handed out stay valid).
  #[napi]
  pub fn close(&self) {
    let mut guard = self.inner.write().unwrap_or_else(|p| p.into_inner());
    *guard = None;
  }
}
