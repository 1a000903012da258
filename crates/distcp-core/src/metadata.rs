//! The typed contents of a DCP `.metadata` file (PyTorch's `torch.distributed.checkpoint.metadata.Metadata`).

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::limits::{checked_nbytes, checked_numel, MAX_CHUNK_COMPARISONS, MAX_DIMS};
use crate::pickle::{self, Object, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// One element of a key's path in the original nested state dict (`planner_data`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PathElem {
  /// A dict key.
  Key(String),
  /// A list or tuple index.
  Index(i64),
}

/// The `TensorProperties` torch records per tensor (only `dtype` matters for reading).
#[derive(Debug, Clone, PartialEq)]
pub struct TensorProperties {
  /// Element type.
  pub dtype: DType,
  /// `requires_grad` of the saved tensor (recorded, not applied by distcp).
  pub requires_grad: bool,
  /// `pin_memory` of the saved tensor (recorded, not applied by distcp).
  pub pin_memory: bool,
  /// The module the class was pickled from: `torch.distributed.checkpoint.metadata` (torch ≥ 2.3) or
  /// `torch.distributed._shard.sharded_tensor.metadata` (older).
  pub module: String,
}

/// One saved box of a tensor, in global coordinates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
  /// Where the box starts, per dimension.
  pub offsets: Vec<u64>,
  /// The box's extent per dimension.
  pub sizes: Vec<u64>,
}

impl Chunk {
  /// Elements of the chunk; [`Metadata::validate`] refused chunks where this overflows.
  pub fn numel(&self) -> u64 {
    checked_numel(&self.sizes).unwrap_or(u64::MAX)
  }
}

/// A stored tensor: its properties, global shape and the boxes (chunks) it was saved in.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorMetadata {
  /// dtype and the flags torch records.
  pub properties: TensorProperties,
  /// Global shape (the whole tensor, not one rank's shard).
  pub size: Vec<u64>,
  /// The saved boxes; validated to tile the tensor exactly, without overlap or gap.
  pub chunks: Vec<Chunk>,
}

impl TensorMetadata {
  /// Element type (shortcut for `properties.dtype`).
  pub fn dtype(&self) -> DType {
    self.properties.dtype
  }

  /// Elements of the tensor; [`Metadata::validate`] refused tensors where this (or the byte size) overflows.
  pub fn numel(&self) -> u64 {
    checked_numel(&self.size).unwrap_or(u64::MAX)
  }

  /// Bytes of the tensor, or `None` when that overflows 64 bits.
  pub fn nbytes(&self) -> Option<u64> {
    checked_nbytes(&self.size, self.dtype().size())
  }
}

/// What one key of the flat state dict holds.
#[derive(Debug, Clone, PartialEq)]
pub enum ItemMetadata {
  /// A tensor, possibly saved in several chunks.
  Tensor(TensorMetadata),
  /// A non-tensor value, stored as one `torch.save` blob.
  Bytes,
}

/// Identifies one stored item: a tensor chunk by `(fqn, chunk offsets)`, a non-tensor value by `(fqn, None)`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StorageKey {
  /// The flat key.
  pub fqn: String,
  /// The chunk's offsets for a tensor chunk; `None` for a non-tensor value.
  pub offset: Option<Vec<u64>>,
}

/// Where one stored item's bytes are: a byte range of a data file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageInfo {
  /// The data file, relative to the checkpoint folder.
  pub relative_path: String,
  /// First byte of the item in the file.
  pub offset: u64,
  /// Bytes of the item in the file (after any transform, e.g. compressed size).
  pub length: u64,
  /// Transforms applied on save (e.g. zstd compression), in torch's names.
  pub transform_descriptors: Vec<String>,
}

/// The `StorageMeta` newer torch writers record about the save itself.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StorageMeta {
  /// The checkpoint id (usually the folder) the writer was given.
  pub checkpoint_id: Option<String>,
  /// An id unique to this save.
  pub save_id: Option<String>,
  /// Modules the writer recorded as needed to load the checkpoint.
  pub modules: Vec<String>,
}

/// The parsed `.metadata` of a checkpoint (torch's `Metadata`).
#[derive(Debug, Clone, Default)]
pub struct Metadata {
  /// Every flat key, in the order the file lists them.
  pub items: Vec<(String, ItemMetadata)>,
  /// Position of each key in `items`, filled by `parse`.
  index: HashMap<String, usize>,
  /// Each key's path in the original nested state dict, when the writer recorded it.
  pub planner_data: Option<HashMap<String, Vec<PathElem>>>,
  /// Where every stored item (tensor chunk or non-tensor value) is.
  pub storage_data: HashMap<StorageKey, StorageInfo>,
  /// What the writer recorded about the save (torch ≥ 2.4).
  pub storage_meta: Option<StorageMeta>,
  /// The metadata format version torch recorded, if any.
  pub version: Option<String>,
  /// Longest `TensorProperties` pickle state found (5 up to torch 2.14, 6 from 2.15 on; 0 when none).
  pub properties_state_len: usize,
}

// The modules `.metadata`'s classes live in: the reader's allow-list and the writer's globals share these.
pub(crate) const DCP_METADATA: &str = "torch.distributed.checkpoint.metadata";
pub(crate) const SHARD_METADATA: &str = "torch.distributed._shard.sharded_tensor.metadata";
pub(crate) const DCP_FILESYSTEM: &str = "torch.distributed.checkpoint.filesystem";

/// The globals a `.metadata` written by the default planner and file system writer can contain.
pub fn metadata_allows(module: &str, name: &str) -> bool {
  match module {
    DCP_METADATA => matches!(
      name,
      "Metadata"
        | "TensorStorageMetadata"
        | "BytesStorageMetadata"
        | "ChunkStorageMetadata"
        | "MetadataIndex"
        | "TensorProperties"
        | "_MEM_FORMAT_ENCODING"
        | "MEM_FORMAT_ENCODING"
        | "StorageMeta"
    ),
    SHARD_METADATA => matches!(name, "TensorProperties" | "MEM_FORMAT_ENCODING"),
    DCP_FILESYSTEM => name == "_StorageInfo",
    "torch" => torch_value_global(name),
    // torch.layout pickles as `_get_layout("torch.strided")`, a name lookup (seen in torch 2.15's .metadata)
    "torch.serialization" => name == "_get_layout",
    "pathlib" | "pathlib._local" => {
      matches!(name, "PosixPath" | "WindowsPath" | "PurePosixPath" | "PureWindowsPath" | "Path")
    }
    "collections" => name == "OrderedDict",
    "builtins" => matches!(name, "set" | "frozenset"),
    _ => false,
  }
}

/// Plain values from the `torch` module that pickles reference: sizes, dtypes, layouts, memory formats.
pub fn torch_value_global(name: &str) -> bool {
  name == "Size"
    || DType::from_name(name).is_some_and(|d| d.name() == name)
    || matches!(
      name,
      "strided"
        | "sparse_coo"
        | "sparse_csr"
        | "sparse_csc"
        | "sparse_bsr"
        | "sparse_bsc"
        | "_mkldnn"
        | "contiguous_format"
        | "channels_last"
        | "channels_last_3d"
        | "preserve_format"
    )
}

struct Ctx<'a> {
  path: &'a Path,
  /// Longest `TensorProperties` state tuple seen (torch 2.15 pickles 6 values, older torch unpacks exactly 5).
  properties_len: std::cell::Cell<usize>,
}

impl Ctx<'_> {
  fn err<T>(&self, reason: impl Into<String>) -> Result<T> {
    Err(Error::Metadata { path: self.path.to_path_buf(), reason: reason.into() })
  }

  fn object<'v>(&self, v: &'v Value, class: &str, what: &str) -> Result<&'v Object> {
    match v {
      Value::Object(o) if o.class.name == class => Ok(o),
      other => self.err(format!("{what}: expected a {class}, found {}", describe(other))),
    }
  }

  /// The attribute dict a dataclass was BUILT with.
  fn state<'v>(&self, o: &'v Object, what: &str) -> Result<&'v Value> {
    match &o.state {
      Some(s @ Value::Dict(_)) => Ok(s),
      // `BUILD` with `(None, slots)` is how a dataclass with __slots__ pickles; take the slot dict
      Some(Value::Tuple(t)) if t.len() == 2 && matches!(t[1], Value::Dict(_)) => Ok(&t[1]),
      Some(other) => self.err(format!("{what}: state is a {}, expected a dict", other.type_name())),
      None => self.err(format!("{what}: has no state")),
    }
  }

  fn u64(&self, v: &Value, what: &str) -> Result<u64> {
    match v {
      Value::Int(i) if *i >= 0 => Ok(*i as u64),
      other => self.err(format!("{what}: expected a non-negative int, found {}", describe(other))),
    }
  }

  fn ints(&self, v: &Value, what: &str) -> Result<Vec<u64>> {
    // torch.Size pickles as REDUCE(torch.Size, (tuple,))
    let seq = match v {
      Value::Object(o) if o.class.name == "Size" => match o.args.first() {
        Some(inner) => inner,
        None => return self.err(format!("{what}: torch.Size without arguments")),
      },
      other => other,
    };
    let Some(items) = seq.as_seq() else {
      return self.err(format!("{what}: expected a torch.Size, found {}", describe(seq)));
    };
    items.iter().map(|i| self.u64(i, what)).collect()
  }

  fn string(&self, v: &Value, what: &str) -> Result<String> {
    match v {
      Value::Str(s) => Ok(s.clone()),
      other => self.err(format!("{what}: expected a str, found {}", describe(other))),
    }
  }

  fn dtype(&self, v: &Value, what: &str) -> Result<DType> {
    match v {
      Value::Global(g) => match DType::from_name(&g.name) {
        Some(d) => Ok(d),
        None => self.err(format!("{what}: unknown dtype `{g}`")),
      },
      other => self.err(format!("{what}: expected a torch dtype, found {}", describe(other))),
    }
  }

  fn properties(&self, v: &Value, key: &str) -> Result<TensorProperties> {
    let what = format!("properties of `{key}`");
    let o = self.object(v, "TensorProperties", &what)?;
    let (dtype, requires_grad, pin_memory) = match &o.state {
      // __getstate__ → (dtype, layout, requires_grad, memory_format, pin_memory)
      Some(Value::Tuple(t)) if !t.is_empty() => {
        self.properties_len.set(self.properties_len.get().max(t.len()));
        (
          self.dtype(&t[0], &what)?,
          matches!(t.get(2), Some(Value::Bool(true))),
          matches!(t.get(4), Some(Value::Bool(true))),
        )
      }
      Some(d @ Value::Dict(_)) => match d.get("dtype") {
        Some(dt) => (
          self.dtype(dt, &what)?,
          matches!(d.get("requires_grad"), Some(Value::Bool(true))),
          matches!(d.get("pin_memory"), Some(Value::Bool(true))),
        ),
        None => return self.err(format!("{what}: no dtype")),
      },
      _ => return self.err(format!("{what}: unexpected state")),
    };
    Ok(TensorProperties { dtype, requires_grad, pin_memory, module: o.class.module.clone() })
  }

  fn item(&self, key: &str, v: &Value) -> Result<ItemMetadata> {
    let Value::Object(o) = v else {
      return self.err(format!("entry `{key}`: expected storage metadata, found {}", describe(v)));
    };
    match o.class.name.as_str() {
      "BytesStorageMetadata" => Ok(ItemMetadata::Bytes),
      "TensorStorageMetadata" => {
        let what = format!("entry `{key}`");
        let st = self.state(o, &what)?;
        let field = |name: &str| match st.get(name) {
          Some(v) => Ok(v),
          None => self.err(format!("{what}: missing field `{name}`")),
        };
        let properties = self.properties(field("properties")?, key)?;
        let size = self.ints(field("size")?, &format!("size of `{key}`"))?;
        let Some(chunk_values) = field("chunks")?.as_seq() else {
          return self.err(format!("{what}: chunks is not a list"));
        };
        let mut chunks = Vec::with_capacity(chunk_values.len());
        for c in chunk_values {
          let co = self.object(c, "ChunkStorageMetadata", &what)?;
          let cs = self.state(co, &what)?;
          let (Some(off), Some(sz)) = (cs.get("offsets"), cs.get("sizes")) else {
            return self.err(format!("{what}: chunk without offsets/sizes"));
          };
          let chunk = Chunk { offsets: self.ints(off, &what)?, sizes: self.ints(sz, &what)? };
          if chunk.offsets.len() != size.len() || chunk.sizes.len() != size.len() {
            return self.err(format!(
              "{what}: chunk {:?}+{:?} has a different rank than the tensor {:?}",
              chunk.offsets, chunk.sizes, size
            ));
          }
          chunks.push(chunk);
        }
        Ok(ItemMetadata::Tensor(TensorMetadata { properties, size, chunks }))
      }
      _ => self.err(format!("entry `{key}`: unexpected class {}", o.class)),
    }
  }

  fn storage_key(&self, v: &Value) -> Result<StorageKey> {
    let o = self.object(v, "MetadataIndex", "storage_data key")?;
    let st = self.state(o, "MetadataIndex")?;
    let fqn = match st.get("fqn") {
      Some(f) => self.string(f, "MetadataIndex.fqn")?,
      None => return self.err("MetadataIndex without fqn"),
    };
    let offset = match st.get("offset") {
      None | Some(Value::None) => None,
      Some(off) => Some(self.ints(off, &format!("MetadataIndex offset of `{fqn}`"))?),
    };
    Ok(StorageKey { fqn, offset })
  }

  fn storage_info(&self, v: &Value, fqn: &str) -> Result<StorageInfo> {
    let what = format!("storage info of `{fqn}`");
    let o = self.object(v, "_StorageInfo", &what)?;
    let st = self.state(o, &what)?;
    let get = |name: &str| match st.get(name) {
      Some(v) => Ok(v),
      None => self.err(format!("{what}: missing `{name}`")),
    };
    let transform_descriptors = match st.get("transform_descriptors") {
      None | Some(Value::None) => Vec::new(),
      Some(v) => match v.as_seq() {
        Some(items) => items.iter().map(|d| self.string(d, &what)).collect::<Result<_>>()?,
        None => return self.err(format!("{what}: transform_descriptors is not a list")),
      },
    };
    Ok(StorageInfo {
      relative_path: self.string(get("relative_path")?, &what)?,
      offset: self.u64(get("offset")?, &what)?,
      length: self.u64(get("length")?, &what)?,
      transform_descriptors,
    })
  }

  fn path_elems(&self, v: &Value, key: &str) -> Result<Vec<PathElem>> {
    let Some(items) = v.as_seq() else {
      return self.err(format!("planner_data of `{key}` is not a tuple"));
    };
    items
      .iter()
      .map(|p| match p {
        Value::Str(s) => Ok(PathElem::Key(s.clone())),
        Value::Int(i) => Ok(PathElem::Index(*i)),
        other => self.err(format!("planner_data of `{key}`: unexpected path element {}", describe(other))),
      })
      .collect()
  }

  fn storage_meta(&self, v: &Value) -> Result<Option<StorageMeta>> {
    let Value::Object(o) = v else { return Ok(None) };
    let Ok(st) = self.state(o, "StorageMeta") else {
      return Ok(None);
    };
    let text = |name: &str| match st.get(name) {
      Some(Value::Str(s)) => Some(s.clone()),
      Some(Value::Object(p)) if p.class.name.ends_with("Path") => Some(path_from_parts(&p.args)),
      _ => None,
    };
    let modules = match st.get("modules").and_then(Value::as_seq) {
      Some(m) => m.iter().filter_map(|x| x.as_str().map(str::to_owned)).collect(),
      None => Vec::new(),
    };
    Ok(Some(StorageMeta { checkpoint_id: text("checkpoint_id"), save_id: text("save_id"), modules }))
  }
}

fn path_from_parts(parts: &[Value]) -> String {
  let parts: Vec<&str> = parts.iter().filter_map(Value::as_str).collect();
  let mut out = PathBuf::new();
  for p in parts {
    out.push(p);
  }
  out.to_string_lossy().into_owned()
}

fn describe(v: &Value) -> String {
  match v {
    Value::Object(o) => format!("an instance of {}", o.class),
    Value::Global(g) => format!("the global {g}"),
    other => format!("a {}", other.type_name()),
  }
}

impl Metadata {
  /// Metadata built from another source than a `.metadata` file (a folder of safetensors headers), with no
  /// planner data; `items` in the order reads list them. Validate it like a parsed one.
  pub fn from_parts(
    items: Vec<(String, ItemMetadata)>,
    storage_data: HashMap<StorageKey, StorageInfo>,
  ) -> Metadata {
    let index = items.iter().enumerate().map(|(i, (k, _))| (k.clone(), i)).collect();
    Metadata {
      items,
      index,
      planner_data: None,
      storage_data,
      storage_meta: None,
      version: None,
      properties_state_len: 0,
    }
  }

  /// Parses the bytes of a `.metadata` (or rank-local `__{rank}.metadata`) file. `path` is only for messages.
  pub fn parse(bytes: &[u8], path: &Path) -> Result<Metadata> {
    let root = pickle::unpickle(bytes, &metadata_allows).map_err(|e| crate::unpickle_error(e, path))?;
    let cx = Ctx { path, properties_len: std::cell::Cell::new(0) };
    let o = cx.object(&root, "Metadata", ".metadata")?;
    let st = cx.state(o, "Metadata")?;
    let mut md = Metadata::default();

    let Some(sdm) = st.get("state_dict_metadata").and_then(Value::as_dict) else {
      return cx.err("Metadata has no state_dict_metadata dict");
    };
    for (k, v) in sdm {
      let key = cx.string(k, "state_dict_metadata key")?;
      let item = cx.item(&key, v)?;
      md.index.insert(key.clone(), md.items.len());
      md.items.push((key, item));
    }

    match st.get("planner_data") {
      Some(Value::Dict(pairs)) => {
        let mut map = HashMap::with_capacity(pairs.len());
        for (k, v) in pairs {
          let key = cx.string(k, "planner_data key")?;
          let path = cx.path_elems(v, &key)?;
          map.insert(key, path);
        }
        md.planner_data = Some(map);
      }
      // custom planners may store anything; only the default planner's mapping is understood
      _ => md.planner_data = None,
    }

    match st.get("storage_data") {
      Some(Value::Dict(pairs)) => {
        for (k, v) in pairs {
          let key = cx.storage_key(k)?;
          let info = cx.storage_info(v, &key.fqn)?;
          md.storage_data.insert(key, info);
        }
      }
      Some(other) => return cx.err(format!("storage_data is {}, expected a dict", describe(other))),
      None => return cx.err("Metadata has no storage_data"),
    }

    if let Some(sm) = st.get("storage_meta") {
      md.storage_meta = cx.storage_meta(sm)?;
    }
    if let Some(Value::Str(v)) = st.get("version") {
      md.version = Some(v.clone());
    }
    md.properties_state_len = cx.properties_len.get();
    Ok(md)
  }

  /// Checks, in one pass, everything reads rely on: every size fits in 64 bits (elements and bytes), tensors
  /// have at most [`MAX_DIMS`] dimensions, every chunk lies inside its tensor, no two chunks overlap, the chunks
  /// cover the tensor exactly, and every chunk and non-tensor value has a storage entry. `path` is for messages.
  pub fn validate(&self, path: &Path) -> Result<()> {
    self.validate_with(path, true)
  }

  /// [`Metadata::validate`] for a rank-local `__{rank}.metadata` (torch's `use_collectives=False`): it lists only
  /// that rank's chunks of a sharded tensor, so the chunks need not cover the tensor (a read of a box they do not
  /// cover fails, [`crate::checkpoint::Checkpoint::read_into`]).
  pub fn validate_rank_local(&self, path: &Path) -> Result<()> {
    self.validate_with(path, false)
  }

  fn validate_with(&self, path: &Path, whole: bool) -> Result<()> {
    let layout_err = |key: &str, reason: String| Error::ChunkLayout {
      path: path.to_path_buf(),
      key: key.to_owned(),
      reason,
    };
    for (key, item) in &self.items {
      let t = match item {
        ItemMetadata::Tensor(t) => t,
        ItemMetadata::Bytes => {
          let sk = StorageKey { fqn: key.clone(), offset: None };
          if !self.storage_data.contains_key(&sk) {
            return Err(Error::Metadata {
              path: path.to_path_buf(),
              reason: format!("key `{key}`: no storage entry"),
            });
          }
          continue;
        }
      };
      if t.size.len() > MAX_DIMS {
        return Err(layout_err(key, format!("{} dimensions (distcp reads up to {MAX_DIMS})", t.size.len())));
      }
      let Some(numel) = checked_numel(&t.size) else {
        return Err(Error::SizeOverflow {
          path: path.to_path_buf(),
          key: key.clone(),
          what: format!("the element count of shape {:?}", t.size),
        });
      };
      if t.nbytes().is_none() {
        return Err(Error::SizeOverflow {
          path: path.to_path_buf(),
          key: key.clone(),
          what: format!("the byte size of a {} tensor of shape {:?}", t.dtype(), t.size),
        });
      }
      let mut covered = 0u64;
      // non-empty chunks; empty ones hold nothing (torch ≥ 2.8 writes them with offsets at the end of a dim)
      let mut boxes: Vec<&Chunk> = Vec::with_capacity(t.chunks.len());
      for c in &t.chunks {
        // parse checked the rank of every chunk against the tensor's
        let Some(n) = checked_numel(&c.sizes) else {
          return Err(Error::SizeOverflow {
            path: path.to_path_buf(),
            key: key.clone(),
            what: format!("the element count of chunk {:?} at {:?}", c.sizes, c.offsets),
          });
        };
        if n == 0 {
          continue;
        }
        for (d, ((&o, &s), &dim)) in c.offsets.iter().zip(&c.sizes).zip(&t.size).enumerate() {
          if o.checked_add(s).is_none_or(|end| end > dim) {
            return Err(layout_err(
              key,
              format!(
                "chunk {:?} at {:?} lies outside the tensor {:?} in dimension {d}",
                c.sizes, c.offsets, t.size
              ),
            ));
          }
        }
        let sk = StorageKey { fqn: key.clone(), offset: Some(c.offsets.clone()) };
        if !self.storage_data.contains_key(&sk) {
          return Err(Error::Metadata {
            path: path.to_path_buf(),
            reason: format!("key `{key}`: no storage entry for the chunk at {:?}", c.offsets),
          });
        }
        // chunks lie inside the tensor and do not overlap (checked below), so this sum is at most numel
        covered = covered.saturating_add(n);
        boxes.push(c);
      }
      check_disjoint(&boxes).map_err(|r| layout_err(key, r))?;
      if whole && covered != numel {
        return Err(layout_err(
          key,
          format!(
            "the stored chunks cover {covered} of the tensor's {numel} elements (a gap in {:?})",
            t.size
          ),
        ));
      }
    }
    Ok(())
  }

  /// What `key` holds, or `None` when there is no such key.
  pub fn item(&self, key: &str) -> Option<&ItemMetadata> {
    // `items` is public: trust the index only while it still points at the key
    match self.index.get(key).and_then(|&i| self.items.get(i)) {
      Some((k, item)) if k == key => Some(item),
      _ => self.items.iter().find(|(k, _)| k == key).map(|(_, v)| v),
    }
  }

  /// The oldest torch (major, minor) that can unpickle this `.metadata`: 2.15 for 6-value `TensorProperties`
  /// (torch ≤ 2.14 unpacks exactly 5), 2.4 for `StorageMeta` (the class is new in 2.4), 2.3 for
  /// `TensorProperties` from `torch.distributed.checkpoint.metadata`, else 2.0.
  pub fn oldest_torch(&self) -> (u32, u32) {
    if self.properties_state_len > 5 {
      (2, 15)
    } else if self.storage_meta.is_some() {
      (2, 4)
    } else if self.tensor_properties_module() == Some(DCP_METADATA) {
      (2, 3)
    } else {
      (2, 0)
    }
  }

  /// Which TensorProperties class path the writer used (tells torch ≤ 2.2 from ≥ 2.3 writers).
  pub fn tensor_properties_module(&self) -> Option<&str> {
    self.items.iter().find_map(|(_, item)| match item {
      ItemMetadata::Tensor(t) => Some(t.properties.module.as_str()),
      ItemMetadata::Bytes => None,
    })
  }
}

fn overlaps(a: &Chunk, b: &Chunk) -> bool {
  // both lie inside the tensor (checked first), so these sums cannot overflow
  a.offsets
    .iter()
    .zip(&a.sizes)
    .zip(b.offsets.iter().zip(&b.sizes))
    .all(|((&ao, &asz), (&bo, &bsz))| ao < bo + bsz && bo < ao + asz)
}

/// Fails when two of `chunks` (non-empty, inside their tensor) overlap. A sweep along dimension 0 compares only
/// chunks whose row ranges meet, which for sharded tensors is a handful; the total work is bounded.
fn check_disjoint(chunks: &[&Chunk]) -> std::result::Result<(), String> {
  if chunks.len() < 2 || chunks[0].sizes.is_empty() {
    // a 0-dim tensor has one element: two non-empty chunks of it overlap
    return match chunks {
      [a, b, ..] => Err(format!("chunks at {:?} and {:?} overlap", a.offsets, b.offsets)),
      _ => Ok(()),
    };
  }
  let mut order: Vec<&Chunk> = chunks.to_vec();
  order.sort_by_key(|c| c.offsets[0]);
  let mut active: Vec<&Chunk> = Vec::new();
  let mut work = 0u64;
  for c in order {
    let start = c.offsets[0];
    active.retain(|a| a.offsets[0] + a.sizes[0] > start);
    for a in &active {
      work += 1;
      if work > MAX_CHUNK_COMPARISONS {
        return Err(format!(
          "too many chunks to check for overlaps (limits::MAX_CHUNK_COMPARISONS = {MAX_CHUNK_COMPARISONS})"
        ));
      }
      if overlaps(a, c) {
        return Err(format!(
          "chunks {:?} at {:?} and {:?} at {:?} overlap",
          a.sizes, a.offsets, c.sizes, c.offsets
        ));
      }
    }
    active.push(c);
  }
  Ok(())
}

#[cfg(test)]
mod validate_tests {
  use super::*;

  fn md(size: &[u64], chunks: &[(&[u64], &[u64])]) -> Metadata {
    let mut m = Metadata::default();
    let t = TensorMetadata {
      properties: TensorProperties {
        dtype: DType::Float32,
        requires_grad: false,
        pin_memory: false,
        module: String::new(),
      },
      size: size.to_vec(),
      chunks: chunks.iter().map(|(o, s)| Chunk { offsets: o.to_vec(), sizes: s.to_vec() }).collect(),
    };
    for c in &t.chunks {
      let info = StorageInfo {
        relative_path: "__0_0.distcp".into(),
        offset: 0,
        length: 0,
        transform_descriptors: vec![],
      };
      m.storage_data.insert(StorageKey { fqn: "w".into(), offset: Some(c.offsets.clone()) }, info);
    }
    m.items.push(("w".into(), ItemMetadata::Tensor(t)));
    m
  }

  fn code(m: &Metadata) -> Option<&'static str> {
    m.validate(Path::new(".metadata")).err().map(|e| e.code())
  }

  #[test]
  fn exact_tilings_pass() {
    assert_eq!(code(&md(&[4, 6], &[(&[0, 0], &[2, 6]), (&[2, 0], &[2, 6])])), None);
    assert_eq!(code(&md(&[4, 6], &[(&[0, 0], &[4, 3]), (&[0, 3], &[4, 3]), (&[4, 0], &[0, 6])])), None);
    assert_eq!(code(&md(&[], &[(&[], &[])])), None);
    assert_eq!(code(&md(&[0, 5], &[])), None);
  }

  #[test]
  fn overlap_plus_gap_is_refused() {
    // the sizes add up to the tensor (8 + 8 = 16), but rows 0..2 are stored twice and rows 2..4 not at all
    let m = md(&[4, 4], &[(&[0, 0], &[2, 4]), (&[0, 0], &[2, 4])]);
    let e = m.validate(Path::new(".metadata")).unwrap_err();
    assert_eq!(e.code(), "ERR_DISTCP_CHUNK_LAYOUT");
    assert!(e.to_string().contains("overlap"), "{e}");
  }

  #[test]
  fn gaps_outside_and_overflow_are_refused() {
    assert_eq!(code(&md(&[4, 4], &[(&[0, 0], &[2, 4])])), Some("ERR_DISTCP_CHUNK_LAYOUT"));
    assert_eq!(
      code(&md(&[4, 4], &[(&[0, 0], &[4, 4]), (&[3, 0], &[2, 4])])),
      Some("ERR_DISTCP_CHUNK_LAYOUT")
    );
    // element count wraps to 2 with unchecked arithmetic
    assert_eq!(
      code(&md(&[3, 6148914691236517206], &[(&[0, 0], &[3, 6148914691236517206])])),
      Some("ERR_DISTCP_SIZE_OVERFLOW")
    );
    // numel fits, bytes (× 4) do not
    assert_eq!(code(&md(&[1 << 62], &[(&[0], &[1 << 62])])), Some("ERR_DISTCP_SIZE_OVERFLOW"));
    assert_eq!(code(&md(&[u64::MAX, 2], &[(&[u64::MAX, 0], &[1, 2])])), Some("ERR_DISTCP_SIZE_OVERFLOW"));
  }

  #[test]
  fn missing_storage_entries_are_refused() {
    let mut m = md(&[4], &[(&[0], &[4])]);
    m.storage_data.clear();
    assert_eq!(code(&m), Some("ERR_DISTCP_METADATA"));
    let mut m = Metadata::default();
    m.items.push(("n".into(), ItemMetadata::Bytes));
    assert_eq!(code(&m), Some("ERR_DISTCP_METADATA"));
  }
}
