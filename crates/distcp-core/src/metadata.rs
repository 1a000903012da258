//! The typed contents of a DCP `.metadata` file (PyTorch's `torch.distributed.checkpoint.metadata.Metadata`).

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::limits::{checked_nbytes, checked_numel, MAX_CHUNK_COMPARISONS, MAX_DIMS};
use crate::pickle::{self, ObjectView, View};
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
  /// The unpickled stream: past its budget, this error is the one reported (see [`pickle::Unpickled`]).
  stream: &'a pickle::Unpickled<'a>,
}

impl<'a> Ctx<'a> {
  fn err<T>(&self, reason: impl Into<String>) -> Result<T> {
    if let Some(e) = self.stream.overspent() {
      return Err(crate::unpickle_error(e, self.path));
    }
    Err(Error::Metadata { path: self.path.to_path_buf(), reason: reason.into() })
  }

  fn object(
    &self,
    v: View<'a>,
    class: &str,
    what: &(impl std::fmt::Display + ?Sized),
  ) -> Result<ObjectView<'a>> {
    match v.as_object() {
      Some(o) if o.class().name == class => Ok(o),
      _ => self.err(format!("{what}: expected a {class}, found {}", describe(v))),
    }
  }

  /// The attribute dict a dataclass was BUILT with.
  fn state(&self, o: ObjectView<'a>, what: &(impl std::fmt::Display + ?Sized)) -> Result<View<'a>> {
    match o.state() {
      Some(s) if s.as_dict().is_some() => Ok(s),
      // `BUILD` with `(None, slots)` is how a dataclass with __slots__ pickles; take the slot dict
      Some(s)
        if s.as_tuple().is_some_and(|t| t.len() == 2 && t.get(1).is_some_and(|d| d.as_dict().is_some())) =>
      {
        match s.as_tuple().and_then(|t| t.get(1)) {
          Some(d) => Ok(d),
          None => self.err(format!("{what}: has no state")),
        }
      }
      Some(other) => self.err(format!("{what}: state is a {}, expected a dict", other.type_name())),
      None => self.err(format!("{what}: has no state")),
    }
  }

  fn u64(&self, v: View<'a>, what: &(impl std::fmt::Display + ?Sized)) -> Result<u64> {
    match v.as_int() {
      Some(i) if i >= 0 => Ok(i as u64),
      _ => self.err(format!("{what}: expected a non-negative int, found {}", describe(v))),
    }
  }

  fn ints(&self, v: View<'a>, what: &(impl std::fmt::Display + ?Sized)) -> Result<Vec<u64>> {
    // torch.Size pickles as REDUCE(torch.Size, (tuple,))
    let seq = match v.as_object() {
      Some(o) if o.class().name == "Size" => match o.args().get(0) {
        Some(inner) => inner,
        None => return self.err(format!("{what}: torch.Size without arguments")),
      },
      _ => v,
    };
    let Some(items) = seq.as_seq() else {
      return self.err(format!("{what}: expected a torch.Size, found {}", describe(seq)));
    };
    items.iter().map(|i| self.u64(i, what)).collect()
  }

  fn string(&self, v: View<'a>, what: &(impl std::fmt::Display + ?Sized)) -> Result<String> {
    match v.as_str() {
      Some(s) => Ok(s.to_owned()),
      None => self.err(format!("{what}: expected a str, found {}", describe(v))),
    }
  }

  fn dtype(&self, v: View<'a>, what: &(impl std::fmt::Display + ?Sized)) -> Result<DType> {
    match v.as_global() {
      Some(g) => match DType::from_name(&g.name) {
        Some(d) => Ok(d),
        None => self.err(format!("{what}: unknown dtype `{g}`")),
      },
      None => self.err(format!("{what}: expected a torch dtype, found {}", describe(v))),
    }
  }

  fn properties(&self, v: View<'a>, key: &str) -> Result<TensorProperties> {
    let what = Named("properties of", key);
    let o = self.object(v, "TensorProperties", &what)?;
    let is_true = |v: Option<View<'a>>| v.and_then(|v| v.as_bool()) == Some(true);
    let state = o.state();
    let (dtype, requires_grad, pin_memory) = match (state.and_then(|s| s.as_tuple()), state) {
      // __getstate__ → (dtype, layout, requires_grad, memory_format, pin_memory)
      (Some(t), Some(_)) if !t.is_empty() => {
        self.properties_len.set(self.properties_len.get().max(t.len()));
        match t.get(0) {
          Some(d) => (self.dtype(d, &what)?, is_true(t.get(2)), is_true(t.get(4))),
          None => return self.err(format!("{}: unexpected state", what)),
        }
      }
      (_, Some(d)) if d.as_dict().is_some() => match d.get("dtype") {
        Some(dt) => (self.dtype(dt, &what)?, is_true(d.get("requires_grad")), is_true(d.get("pin_memory"))),
        None => return self.err(format!("{}: no dtype", what)),
      },
      _ => return self.err(format!("{}: unexpected state", what)),
    };
    Ok(TensorProperties { dtype, requires_grad, pin_memory, module: o.class().module.clone() })
  }

  fn item(&self, key: &str, v: View<'a>) -> Result<ItemMetadata> {
    let Some(o) = v.as_object() else {
      return self.err(format!("entry `{key}`: expected storage metadata, found {}", describe(v)));
    };
    match o.class().name.as_str() {
      "BytesStorageMetadata" => Ok(ItemMetadata::Bytes),
      "TensorStorageMetadata" => {
        let what = Named("entry", key);
        let st = self.state(o, &what)?;
        let field = |name: &str| match st.get(name) {
          Some(v) => Ok(v),
          None => self.err(format!("{}: missing field `{name}`", what)),
        };
        let properties = self.properties(field("properties")?, key)?;
        let size = self.ints(field("size")?, &Named("size of", key))?;
        let Some(chunk_values) = field("chunks")?.as_seq() else {
          return self.err(format!("{}: chunks is not a list", what));
        };
        let mut chunks = Vec::with_capacity(chunk_values.len());
        for c in chunk_values.iter() {
          let co = self.object(c, "ChunkStorageMetadata", &what)?;
          let cs = self.state(co, &what)?;
          let (Some(off), Some(sz)) = (cs.get("offsets"), cs.get("sizes")) else {
            return self.err(format!("{}: chunk without offsets/sizes", what));
          };
          let chunk = Chunk { offsets: self.ints(off, &what)?, sizes: self.ints(sz, &what)? };
          if chunk.offsets.len() != size.len() || chunk.sizes.len() != size.len() {
            return self.err(format!(
              "{}: chunk {:?}+{:?} has a different rank than the tensor {:?}",
              what, chunk.offsets, chunk.sizes, size
            ));
          }
          chunks.push(chunk);
        }
        Ok(ItemMetadata::Tensor(TensorMetadata { properties, size, chunks }))
      }
      _ => self.err(format!("entry `{key}`: unexpected class {}", o.class())),
    }
  }

  fn storage_key(&self, v: View<'a>) -> Result<StorageKey> {
    let o = self.object(v, "MetadataIndex", "storage_data key")?;
    let st = self.state(o, "MetadataIndex")?;
    let fqn = match st.get("fqn") {
      Some(f) => self.string(f, "MetadataIndex.fqn")?,
      None => return self.err("MetadataIndex without fqn"),
    };
    let offset = match st.get("offset") {
      None => None,
      Some(off) if off.is_none() => None,
      Some(off) => Some(self.ints(off, &Named("MetadataIndex offset of", &fqn))?),
    };
    Ok(StorageKey { fqn, offset })
  }

  fn storage_info(&self, v: View<'a>, fqn: &str) -> Result<StorageInfo> {
    let what = Named("storage info of", fqn);
    let o = self.object(v, "_StorageInfo", &what)?;
    let st = self.state(o, &what)?;
    let get = |name: &str| match st.get(name) {
      Some(v) => Ok(v),
      None => self.err(format!("{}: missing `{name}`", what)),
    };
    let transform_descriptors = match st.get("transform_descriptors") {
      None => Vec::new(),
      Some(v) if v.is_none() => Vec::new(),
      Some(v) => match v.as_seq() {
        Some(items) => items.iter().map(|d| self.string(d, &what)).collect::<Result<_>>()?,
        None => return self.err(format!("{}: transform_descriptors is not a list", what)),
      },
    };
    Ok(StorageInfo {
      relative_path: self.string(get("relative_path")?, &what)?,
      offset: self.u64(get("offset")?, &what)?,
      length: self.u64(get("length")?, &what)?,
      transform_descriptors,
    })
  }

  fn path_elems(&self, v: View<'a>, key: &str) -> Result<Vec<PathElem>> {
    let Some(items) = v.as_seq() else {
      return self.err(format!("planner_data of `{key}` is not a tuple"));
    };
    items
      .iter()
      .map(|p| match (p.as_str(), p.as_int()) {
        (Some(s), _) => Ok(PathElem::Key(s.to_owned())),
        (_, Some(i)) => Ok(PathElem::Index(i)),
        _ => self.err(format!("planner_data of `{key}`: unexpected path element {}", describe(p))),
      })
      .collect()
  }

  fn storage_meta(&self, v: View<'a>) -> Result<Option<StorageMeta>> {
    let Some(o) = v.as_object() else { return Ok(None) };
    let Ok(st) = self.state(o, "StorageMeta") else {
      return Ok(None);
    };
    let text = |name: &str| {
      let v = st.get(name)?;
      if let Some(s) = v.as_str() {
        return Some(s.to_owned());
      }
      v.as_object().filter(|p| p.class().name.ends_with("Path")).map(|p| path_from_parts(p.args()))
    };
    let modules = match st.get("modules").and_then(|m| m.as_seq()) {
      Some(m) => m.iter().filter_map(|x| x.as_str().map(str::to_owned)).collect(),
      None => Vec::new(),
    };
    Ok(Some(StorageMeta { checkpoint_id: text("checkpoint_id"), save_id: text("save_id"), modules }))
  }
}

impl<'a> Ctx<'a> {
  fn metadata(&self, root: View<'a>) -> Result<Metadata> {
    let cx = self;
    let o = cx.object(root, "Metadata", ".metadata")?;
    let st = cx.state(o, "Metadata")?;
    let mut md = Metadata::default();

    let Some(sdm) = st.get("state_dict_metadata").and_then(|d| d.as_dict()) else {
      return cx.err("Metadata has no state_dict_metadata dict");
    };
    md.items.reserve(sdm.len() / 2);
    md.index.reserve(sdm.len() / 2);
    for (k, v) in sdm.pairs() {
      let key = cx.string(k, "state_dict_metadata key")?;
      let item = cx.item(&key, v)?;
      md.index.insert(key.clone(), md.items.len());
      md.items.push((key, item));
    }

    match st.get("planner_data").and_then(|d| d.as_dict()) {
      Some(pairs) => {
        let mut map = HashMap::with_capacity(pairs.len() / 2);
        for (k, v) in pairs.pairs() {
          let key = cx.string(k, "planner_data key")?;
          let path = cx.path_elems(v, &key)?;
          map.insert(key, path);
        }
        md.planner_data = Some(map);
      }
      // custom planners may store anything; only the default planner's mapping is understood
      None => md.planner_data = None,
    }

    match st.get("storage_data") {
      Some(d) => match d.as_dict() {
        Some(pairs) => {
          md.storage_data.reserve(pairs.len() / 2);
          for (k, v) in pairs.pairs() {
            let key = cx.storage_key(k)?;
            let info = cx.storage_info(v, &key.fqn)?;
            md.storage_data.insert(key, info);
          }
        }
        None => return cx.err(format!("storage_data is {}, expected a dict", describe(d))),
      },
      None => return cx.err("Metadata has no storage_data"),
    }

    if let Some(sm) = st.get("storage_meta") {
      md.storage_meta = cx.storage_meta(sm)?;
    }
    if let Some(v) = st.get("version").and_then(|v| v.as_str()) {
      md.version = Some(v.to_owned());
    }
    md.properties_state_len = cx.properties_len.get();
    Ok(md)
  }
}

/// What a message is about, e.g. "entry `model.w`", formatted only when a message is.
struct Named<'k>(&'static str, &'k str);

impl std::fmt::Display for Named<'_> {
  fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
    write!(f, "{} `{}`", self.0, self.1)
  }
}

fn path_from_parts(parts: pickle::Items<'_>) -> String {
  let mut out = PathBuf::new();
  for p in parts.iter().filter_map(|v| v.as_str()) {
    out.push(p);
  }
  out.to_string_lossy().into_owned()
}

fn describe(v: View<'_>) -> String {
  if let Some(o) = v.as_object() {
    return format!("an instance of {}", o.class());
  }
  match v.as_global() {
    Some(g) => format!("the global {g}"),
    None => format!("a {}", v.type_name()),
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
    // read in place: a tree of Python values first would cost more than the typed metadata itself
    let stream =
      pickle::unpickle_view(bytes, &metadata_allows).map_err(|e| crate::unpickle_error(e, path))?;
    let cx = Ctx { path, properties_len: std::cell::Cell::new(0), stream: &stream };
    let md = cx.metadata(stream.root())?;
    // a stream past its budget reads as empty containers: whatever was built from it is not the metadata
    if let Some(e) = stream.overspent() {
      return Err(crate::unpickle_error(e, path));
    }
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

#[cfg(test)]
mod parse_tests {
  use super::*;

  /// Raw pickle opcodes, enough to spell a `.metadata` by hand.
  #[derive(Default)]
  struct Raw(Vec<u8>);

  impl Raw {
    fn op(&mut self, b: &[u8]) -> &mut Self {
      self.0.extend_from_slice(b);
      self
    }
    fn global(&mut self, module: &str, name: &str) -> &mut Self {
      self.op(format!("c{module}\n{name}\n").as_bytes())
    }
    fn str(&mut self, s: &str) -> &mut Self {
      self.op(b"X").op(&(s.len() as u32).to_le_bytes()).op(s.as_bytes())
    }
    /// `cls()` of a dataclass with a dict state: NEWOBJ, then BUILD with `fields` pushed by `f` (key, value, …).
    fn dataclass(&mut self, name: &str, f: impl FnOnce(&mut Self)) -> &mut Self {
      self.global(DCP_METADATA, name).op(b")\x81}(");
      f(self);
      self.op(b"ub")
    }
    fn size2(&mut self) -> &mut Self {
      self.op(b"K\x04K\x04\x86")
    }
  }

  /// A `.metadata` whose keys all share one memoised tensor entry with `chunks` (memoised) chunk references:
  /// `keys × chunks` chunks once typed, from a few bytes per key and per chunk.
  fn shared_entry_metadata(keys: usize, chunks: usize) -> Vec<u8> {
    let mut p = Raw::default();
    p.op(b"\x80\x02");
    p.dataclass("Metadata", |p| {
      p.str("state_dict_metadata").op(b"}(");
      for k in 0..keys {
        p.str(&format!("k{k}"));
        if k > 0 {
          p.op(b"h\x02");
          continue;
        }
        p.dataclass("TensorStorageMetadata", |p| {
          p.str("properties").global(DCP_METADATA, "TensorProperties").op(b")\x81");
          p.global("torch", "float32").op(b"\x85b");
          p.str("size").size2();
          p.str("chunks").op(b"](");
          p.dataclass("ChunkStorageMetadata", |p| {
            p.str("offsets").op(b"K\x00K\x00\x86").str("sizes").size2();
          });
          p.op(b"q\x01");
          for _ in 1..chunks {
            p.op(b"h\x01");
          }
          p.op(b"e");
        });
        p.op(b"q\x02");
      }
      p.op(b"u").str("storage_data").op(b"}");
    });
    p.op(b".");
    p.0
  }

  #[test]
  fn a_shared_entry_parses_when_small() {
    let md = Metadata::parse(&shared_entry_metadata(3, 2), Path::new(".metadata")).unwrap();
    assert_eq!(md.items.len(), 3);
    for (i, (k, item)) in md.items.iter().enumerate() {
      assert_eq!(k, &format!("k{i}"));
      let ItemMetadata::Tensor(t) = item else { panic!("{k} is not a tensor") };
      assert_eq!((t.dtype(), t.size.as_slice(), t.chunks.len()), (DType::Float32, &[4u64, 4][..], 2));
      assert_eq!(t.chunks[1], Chunk { offsets: vec![0, 0], sizes: vec![4, 4] });
    }
  }

  #[test]
  fn shared_references_that_expand_stop_at_the_budget() {
    // 20,000 keys × 20,000 chunks = 4e8 chunks (tens of GB) typed, from ~240 KB of pickle
    let bytes = shared_entry_metadata(20_000, 20_000);
    assert!(bytes.len() < 300_000, "{}", bytes.len());
    let t = std::time::Instant::now();
    let e = Metadata::parse(&bytes, Path::new(".metadata")).unwrap_err();
    assert_eq!(e.code(), "ERR_DISTCP_PICKLE", "{e}");
    assert!(e.to_string().contains("expands"), "{e}");
    // it stops at the budget rather than after the whole expansion (generous bound for a loaded machine)
    assert!(t.elapsed() < std::time::Duration::from_secs(20), "{:?}", t.elapsed());
  }
}
