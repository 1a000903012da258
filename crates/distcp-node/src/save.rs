//! `writeStateDict` (the native half of `save`; `saveCheckpoint` is the NeMo-style API in TypeScript): writes a DCP checkpoint on a worker thread. The state dict arrives as a tagged tree, a JS value
//! (the tags `distcp_core::value::from_tagged_json` documents: the codec reads are encoded with; see `tagged.rs`)
//! plus the caller's buffers, referenced (not copied) until the promise settles.

use crate::background::at_background_priority;
use crate::errors::{guarded, internal, invalid_input, job, to_js, Error, Job, Result, Work};
use crate::tagged::json_from_js;
use distcp_core::write::save::{BytesReady, FailPoint};
use distcp_core::write::{from_tagged_json, save, Layout, SaveOptions, SaveSummary};
use napi::bindgen_prelude::{ArrayBuffer, AsyncTask, Uint8Array, Unknown};
use napi::Env;
use napi_derive::napi;
use std::collections::BTreeMap;
use std::sync::{Arc, Condvar, Mutex};

#[napi(object)]
pub struct NativeSaveOptions {
  /// `"2.4"` (default: torch ≥ 2.4's flat keys) or `"2.3"` (torch ≤ 2.3's).
  pub layout: Option<String>,
  /// Test hook: stop the save at this point (`afterFirstItem`, `beforeCommit`, `afterCommit`, `afterLink`,
  /// `afterFinalCommit`) with an error, or with a process abort when `failAbort` is set.
  pub fail_at: Option<String>,
  pub fail_abort: Option<bool>,
  /// Write on a thread of lower CPU priority (`saveAsync`: the trainer goes on meanwhile), see `background.rs`.
  pub background: Option<bool>,
}

#[napi(object)]
pub struct SaveResult {
  /// Flat keys, in `.metadata` order.
  pub keys: Vec<String>,
  pub tensors: u32,
  pub objects: u32,
  /// The data file `.metadata` names.
  pub data_file: String,
  pub data_bytes: f64,
  pub metadata_bytes: f64,
  /// A checkpoint that was there before was replaced.
  pub replaced: bool,
}

pub struct SaveTask {
  dir: String,
  tree: serde_json::Value,
  buffers: Vec<Uint8Array>,
  options: SaveOptions,
  background: bool,
}

/// How far the JS thread has copied a save's tensors into staging memory while the writer already runs (see
/// `save` in src/save.ts): buffers are filled in index order, and the writer reads buffer `i` only once
/// `advance(i + 1)` has been called, or stops the save when `abort()` is.
#[napi]
pub struct StagingGate {
  inner: Arc<Gate>,
}

#[derive(Debug, Default)]
struct Gate {
  /// (buffers filled, aborted)
  state: Mutex<(u32, bool)>,
  filled: Condvar,
  /// (start address, length, index) of each non-empty buffer, sorted by address; set when the save starts.
  ranges: Mutex<Vec<(usize, usize, usize)>>,
}

impl Gate {
  fn state(&self) -> std::sync::MutexGuard<'_, (u32, bool)> {
    // the lock guards two plain numbers: a panic while it was held cannot have left them half-written
    self.state.lock().unwrap_or_else(|e| e.into_inner())
  }
}

impl BytesReady for Gate {
  fn wait(&self, data: &[u8]) -> std::io::Result<()> {
    if data.is_empty() {
      return Ok(());
    }
    let (start, len) = (data.as_ptr() as usize, data.len());
    let ranges = self.ranges.lock().unwrap_or_else(|e| e.into_inner());
    // sorted by address (a binary search: a MoE state dict has tens of thousands of buffers); bytes outside every
    // buffer (none today) wait for all of them
    let at = ranges.partition_point(|&(s, _, _)| s <= start);
    let need = match at.checked_sub(1).map(|k| ranges[k]) {
      Some((s, l, i)) if start + len <= s + l => i + 1,
      _ => ranges.iter().map(|r| r.2 + 1).max().unwrap_or(0),
    };
    drop(ranges);
    let mut st = self.state();
    // a WASM module has one thread: the copy that would open the gate cannot run while the writer waits
    if cfg!(target_family = "wasm") && (st.0 as usize) < need && !st.1 {
      return Err(std::io::Error::other(
        "the WASM build writes only fully staged saves (it has no threads to overlap with)",
      ));
    }
    while (st.0 as usize) < need && !st.1 {
      st = self.filled.wait(st).unwrap_or_else(|e| e.into_inner());
    }
    if st.1 {
      return Err(std::io::Error::other("the copy of the state dict into staging memory failed"));
    }
    Ok(())
  }
}

#[napi]
impl StagingGate {
  #[napi(constructor)]
  #[allow(clippy::new_without_default)]
  pub fn new() -> Self {
    StagingGate { inner: Arc::new(Gate::default()) }
  }

  /// Buffers `0..filled` hold their bytes.
  #[napi]
  pub fn advance(&self, filled: u32) {
    let mut st = self.inner.state();
    st.0 = st.0.max(filled);
    self.inner.filled.notify_all();
  }

  /// The copy failed: the writer stops (and removes what it wrote) instead of waiting.
  #[napi]
  pub fn abort(&self) {
    self.inner.state().1 = true;
    self.inner.filled.notify_all();
  }
}

impl Work<'_> for SaveTask {
  type Output = SaveSummary;
  type JsValue = SaveResult;

  fn compute(&mut self) -> Result<SaveSummary> {
    // the caller promised not to touch these buffers until the promise settles (see `save` in src/save.ts);
    // the Uint8Array references keep their memory alive meanwhile
    let slices: Vec<&[u8]> = self.buffers.iter().map(|b| &**b).collect();
    let value =
      from_tagged_json(&self.tree, &slices).map_err(|e| invalid_input(format!("{}: {e}", self.dir)))?;
    let write = || save(&self.dir, &value, &self.options).map_err(to_js);
    // a panic on the background thread is re-raised here, where the Job's guard catches it
    if self.background {
      at_background_priority(write)
    } else {
      write()
    }
  }

  fn resolve(&mut self, _env: &Env, s: SaveSummary) -> Result<SaveResult> {
    Ok(SaveResult {
      keys: s.keys,
      tensors: s.tensors as u32,
      objects: s.objects as u32,
      data_file: s.data_file,
      data_bytes: s.data_bytes as f64,
      metadata_bytes: s.metadata_bytes as f64,
      replaced: s.replaced,
    })
  }
}

/// Saves a state dict into the checkpoint folder `dir` (created if needed; an existing checkpoint is replaced
/// crash-safely). `tree` is the state dict as a tagged tree, converted here, in the call; tensors and bytes refer
/// to `buffers` by index. With a `gate`, the buffers may still be being filled: each is read only once the gate
/// says it is.
#[napi(ts_return_type = "Promise<SaveResult>")]
pub fn write_state_dict(
  env: &Env,
  dir: String,
  #[napi(ts_arg_type = "TaggedValue")] tree: Unknown<'_>,
  buffers: Vec<Uint8Array>,
  options: Option<NativeSaveOptions>,
  gate: Option<&StagingGate>,
) -> Result<AsyncTask<Job<SaveTask>>> {
  let tree = json_from_js(env, tree, &dir)?;
  let mut opts = SaveOptions::default();
  let background = options.as_ref().and_then(|o| o.background).unwrap_or(false);
  if let Some(g) = gate {
    let mut ranges: Vec<(usize, usize, usize)> = buffers
      .iter()
      .enumerate()
      .filter(|(_, b)| !b.is_empty())
      .map(|(i, b)| (b.as_ptr() as usize, b.len(), i))
      .collect();
    ranges.sort_unstable();
    *g.inner.ranges.lock().unwrap_or_else(|e| e.into_inner()) = ranges;
    opts.ready = Some(g.inner.clone());
  }
  if let Some(o) = options {
    if let Some(l) = o.layout {
      opts.layout = Layout::from_name(&l)
        .ok_or_else(|| invalid_input(format!("{dir}: layout must be \"2.4\" or \"2.3\", not {l:?}")))?;
    }
    if let Some(f) = o.fail_at {
      let point =
        FailPoint::from_name(&f).ok_or_else(|| invalid_input(format!("unknown fail point {f:?}")))?;
      opts.fail_at = Some((point, o.fail_abort.unwrap_or(false)));
    }
  }
  Ok(job(SaveTask { dir, tree, buffers, options: opts, background }))
}

/// Staging memory for `save` (src/staging.ts): `len` bytes of anonymous memory with every page already faulted in
/// ([`distcp_core::copy::alloc_host`]), as an ArrayBuffer that unmaps it when collected. A fresh `ArrayBuffer`
/// would take one page fault per 4 KiB during the copy, which costs more than the copy.
#[napi(ts_return_type = "ArrayBuffer")]
pub fn alloc_staging(env: &Env, len: f64) -> Result<ArrayBuffer<'_>> {
  if !((1.0..=9_007_199_254_740_991.0).contains(&len) && len.fract() == 0.0) {
    return Err(invalid_input(format!("staging size must be a positive integer, not {len}")));
  }
  let n =
    usize::try_from(len as u64).map_err(|_| invalid_input(format!("staging size {len} is too large")))?;
  let mut map = guarded(|| {
    distcp_core::copy::alloc_host(n)
      .map_err(|e| Error::new("ERR_DISTCP_IO", format!("cannot map {n} bytes of staging memory: {e}")))
  })?;
  let ptr = map.as_mut_ptr();
  STAGING_BLOCKS.lock().unwrap_or_else(|p| p.into_inner()).insert(ptr as usize, (n, None));
  let block = StagingBlock { start: ptr as usize, _map: map };
  // V8 does not see this memory: say how much it is, so that garbage collection weighs dropped blocks
  let _ = env.adjust_external_memory(n as i64);
  // SAFETY: the mapping is ours alone, `n` bytes long, and owned by the finalizer until JS drops the buffer.
  unsafe {
    ArrayBuffer::from_external(env, ptr, n, block, move |env, b| {
      let _ = env.adjust_external_memory(-(n as i64));
      drop(b)
    })
    .map_err(internal)
  }
}

/// Every live staging block: start address → its length and, once a device tensor was staged into it, its
/// page-locking ([`distcp_cuda::pinned::HostRegistration`]).
static STAGING_BLOCKS: Mutex<BTreeMap<usize, (usize, Option<Pinned>)>> = Mutex::new(BTreeMap::new());

#[cfg(not(target_family = "wasm"))]
type Pinned = distcp_cuda::pinned::HostRegistration;
/// The WASM build has no CUDA: nothing is ever pinned.
#[cfg(target_family = "wasm")]
enum Pinned {}

/// A staging block's memory. On drop its registration is undone (in `Drop::drop`) before the memory is unmapped
/// (when the fields drop, after it).
struct StagingBlock {
  start: usize,
  _map: memmap2::MmapMut,
}

impl Drop for StagingBlock {
  fn drop(&mut self) {
    let entry = STAGING_BLOCKS.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.start);
    drop(entry);
  }
}

/// Page-locks the staging block that holds `ptr .. ptr + len`, through the context of `cuda:device`, unless it is
/// already: a device tensor's bytes then reach it in one DMA transfer, in this save and every later one that reuses
/// the block. Only saves of device tensors get here, so a host-only save never touches CUDA. Memory that is not a
/// staging block, a failed registration, or DISTCP_PIN_STAGING=0: nothing is done (the copy goes through the
/// reader's pinned slots instead).
#[cfg(not(target_family = "wasm"))]
pub(crate) fn pin_staging_block(device: usize, ptr: *const u8, len: usize) {
  if std::env::var_os("DISTCP_PIN_STAGING").is_some_and(|v| v == "0") {
    return;
  }
  let mut blocks = STAGING_BLOCKS.lock().unwrap_or_else(|p| p.into_inner());
  let at = ptr as usize;
  if let Some((&start, (n, reg))) = blocks.range_mut(..=at).next_back() {
    let inside = at.checked_add(len).is_some_and(|end| end <= start.saturating_add(*n));
    if inside && reg.is_none() {
      // SAFETY: the block stays mapped until its StagingBlock drops, which first removes (and so unregisters) this
      // entry; a block is registered at most once (`reg` is None here).
      *reg = unsafe { distcp_cuda::pinned::HostRegistration::new(device, start as *mut u8, *n) }.ok();
    }
  }
}

/// The staging copy of `save` / `saveAsync` (src/staging.ts): `src[i]` into `dst[i]` on several threads
/// ([`distcp_core::staging::copy_many`]), in the call — the caller's buffers are free again when it returns.
/// Returns how many threads copied. Refuses pairs of different lengths and destinations that overlap a source or
/// each other (staging blocks never do; a slice pair that aliased would be undefined behaviour).
#[napi(catch_unwind)]
pub fn copy_staging(_env: &Env, src: Vec<Uint8Array>, mut dst: Vec<Uint8Array>) -> Result<u32> {
  if src.len() != dst.len() {
    return Err(invalid_input(format!("copyStaging: {} sources but {} destinations", src.len(), dst.len())));
  }
  let mut spans: Vec<(usize, usize, bool)> = Vec::with_capacity(src.len() * 2);
  for (i, (s, d)) in src.iter().zip(dst.iter()).enumerate() {
    if s.len() != d.len() {
      return Err(invalid_input(format!(
        "copyStaging: pair {i} has {} source bytes but {} destination bytes",
        s.len(),
        d.len()
      )));
    }
    if !s.is_empty() {
      spans.push((s.as_ptr() as usize, s.len(), false));
      spans.push((d.as_ptr() as usize, d.len(), true));
    }
  }
  // sorted by start, a destination may not overlap whatever comes next (sources may overlap each other: they are
  // only read)
  spans.sort_unstable();
  let mut reach: Option<(usize, bool)> = None; // the furthest end so far, and whether a destination reaches it
  for &(start, len, is_dst) in &spans {
    if let Some((end, end_dst)) = reach {
      if start < end && (is_dst || end_dst) {
        return Err(invalid_input("copyStaging: a destination overlaps a source or another destination"));
      }
    }
    let end = start + len;
    match reach {
      Some((e, _)) if e >= end => {}
      _ => reach = Some((end, is_dst)),
    }
  }
  let pairs: Vec<distcp_core::staging::CopyPair> = src
    .iter()
    .zip(dst.iter_mut())
    // SAFETY: the destinations were checked above not to overlap the sources or each other, so the `&mut`
    // slices alias nothing; the Uint8Array references keep the memory alive for this synchronous call, during
    // which JS cannot run.
    .map(|(s, d)| (s.as_ref(), unsafe { d.as_mut() }))
    .collect();
  let threads = distcp_core::staging::copy_many(pairs) as u32;
  // emnapi hands a WASM module copies of JS buffers: the copied bytes go back to the staging blocks here
  #[cfg(target_family = "wasm")]
  for d in dst.iter_mut() {
    d.sync(_env);
  }
  Ok(threads)
}

// What `CheckpointManager` (src/manager.ts) needs of the core's commit rules: the folder lock, temporary names
// that tell a dead writer's leftovers from a live one's, and durable renames.

/// The core's folder lock ([`distcp_core::commit::DirLock`]) held by JS until `release()` (or the process ends).
#[napi]
pub struct FolderLock {
  inner: Option<distcp_core::commit::DirLock>,
}

#[napi]
impl FolderLock {
  /// Takes the lock of folder `dir` (which must exist); `ERR_DISTCP_LOCKED` when another writer holds it.
  #[napi(factory)]
  pub fn acquire(dir: String) -> Result<FolderLock> {
    guarded(|| {
      let lock = distcp_core::commit::DirLock::acquire(std::path::Path::new(&dir)).map_err(to_js)?;
      Ok(FolderLock { inner: Some(lock) })
    })
  }

  /// Releases the lock (removing the lock file); a second call does nothing.
  #[napi]
  pub fn release(&mut self) {
    self.inner = None;
  }
}

/// A temporary name `<prefix><pid>-<boot id>-<random>` ([`distcp_core::commit::temp_name`]).
#[napi]
pub fn commit_temp_name(prefix: String) -> String {
  distcp_core::commit::temp_name(&prefix)
}

/// Whether the writer that made `name` with [`commit_temp_name`] and `prefix` is certainly gone.
#[napi]
pub fn commit_writer_is_dead(name: String, prefix: String) -> bool {
  distcp_core::commit::writer_is_dead(&name, &prefix)
}

/// fsyncs a folder, so that renames and removals in it are durable.
#[napi]
pub fn commit_sync_dir(dir: String) -> Result<()> {
  guarded(|| distcp_core::commit::sync_dir(std::path::Path::new(&dir)).map_err(to_js))
}
