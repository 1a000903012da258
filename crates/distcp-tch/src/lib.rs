//! Save and load [`tch`] models as PyTorch Distributed Checkpoints (DCP).
//!
//! [`save_var_store`] writes the named variables of a [`VarStore`] as the state dict `{"model": {name: tensor}}`
//! (NeMo-RL's layout: flat keys `model.<name>`), which `torch.distributed.checkpoint.load` reads into a
//! `{"model": model.state_dict()}` of the same names. [`load_var_store`] reads such a checkpoint, written by torch
//! or by this crate, back into the existing variables: every variable must be in the checkpoint with the same
//! dtype and shape; keys of the checkpoint that the store does not have are left alone, as `dcp.load` does.
//!
//! The rules of the format (the pickles, the metadata, the crash-safe commit, how shards are assembled) belong to
//! [`distcp_core`]; this crate only maps [`tch::Kind`] to [`DType`] and moves bytes between tensors and host
//! buffers. Tensors on a CUDA device are copied through host memory, one at a time when loading.
//!
//! ```no_run
//! use tch::nn::{self, VarStore};
//!
//! # fn main() -> distcp_tch::Result<()> {
//! let mut vs = VarStore::new(tch::Device::cuda_if_available());
//! let _layer = nn::linear(&vs.root() / "0", 4, 8, Default::default()); // saved as `model.0.weight`, `model.0.bias`
//! distcp_tch::save_var_store(&vs, "ckpt/step-100")?;
//! let loaded = distcp_tch::load_var_store(&mut vs, "ckpt/step-100")?;
//! assert_eq!(loaded, ["model.0.bias", "model.0.weight"]);
//! # Ok(())
//! # }
//! ```
//!
//! Optimizer state is not covered: `tch` 0.26 keeps its optimizers behind an opaque libtorch handle whose C API
//! (`ato_*` in torch-sys) can add parameters, set hyperparameters, step and zero gradients, but not read or write
//! Adam's moments or step counts. See the README.
#![deny(unsafe_op_in_unsafe_fn)]
#![deny(missing_docs)]
#![deny(clippy::all)]

#[cfg(target_endian = "big")]
compile_error!(
  "distcp-tch assumes a little-endian host: DCP stores little-endian bytes, libtorch keeps host order"
);

use std::path::{Path, PathBuf};

use distcp_core::plan::Region;
use distcp_core::write::{save, SaveOptions, SaveSummary, SaveValue, TensorRef};
use distcp_core::{Checkpoint, DType};
use tch::nn::VarStore;
use tch::{Kind, TchError, Tensor};

/// The top-level key the variables are saved under (NeMo-RL's `{"model": ModelState}`).
pub const MODEL_KEY: &str = "model";

/// An error from saving or loading: the core's errors as they are, plus failures inside libtorch.
#[derive(Debug, thiserror::Error)]
pub enum Error {
  /// Reading or writing the checkpoint failed, or a variable does not fit the checkpoint.
  #[error(transparent)]
  Core(#[from] distcp_core::Error),

  /// libtorch refused an operation on the tensor of `key` (a device copy, most likely).
  #[error("{checkpoint}: key `{key}`: libtorch: {source}")]
  Tch {
    /// The checkpoint folder.
    checkpoint: PathBuf,
    /// The flat key of the tensor.
    key: String,
    /// What libtorch reported.
    #[source]
    source: TchError,
  },
}

impl Error {
  /// A short, stable name for the kind of error: the core's `ERR_DISTCP_*` codes, and `ERR_DISTCP_TCH` for
  /// libtorch failures.
  pub fn code(&self) -> &'static str {
    match self {
      Error::Core(e) => e.code(),
      Error::Tch { .. } => "ERR_DISTCP_TCH",
    }
  }
}

/// The result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The DCP element type of a `tch` kind; `None` for the quantized kinds, which DCP does not store.
pub fn dtype_of_kind(kind: Kind) -> Option<DType> {
  Some(match kind {
    Kind::Uint8 => DType::UInt8,
    Kind::Int8 => DType::Int8,
    Kind::Int16 => DType::Int16,
    Kind::Int => DType::Int32,
    Kind::Int64 => DType::Int64,
    Kind::Half => DType::Float16,
    Kind::Float => DType::Float32,
    Kind::Double => DType::Float64,
    Kind::ComplexHalf => DType::Complex32,
    Kind::ComplexFloat => DType::Complex64,
    Kind::ComplexDouble => DType::Complex128,
    Kind::Bool => DType::Bool,
    Kind::BFloat16 => DType::BFloat16,
    Kind::Float8e5m2 => DType::Float8E5M2,
    Kind::Float8e4m3fn => DType::Float8E4M3Fn,
    Kind::Float8e5m2fnuz => DType::Float8E5M2Fnuz,
    Kind::Float8e4m3fnuz => DType::Float8E4M3Fnuz,
    Kind::QInt8 | Kind::QUInt8 | Kind::QInt32 => return None,
  })
}

/// The `tch` kind of a DCP element type; `None` for the types `tch` 0.26 has no kind for (`uint16`, `uint32`,
/// `uint64`, `float8_e8m0fnu`).
pub fn kind_of_dtype(dtype: DType) -> Option<Kind> {
  Some(match dtype {
    DType::UInt8 => Kind::Uint8,
    DType::Int8 => Kind::Int8,
    DType::Int16 => Kind::Int16,
    DType::Int32 => Kind::Int,
    DType::Int64 => Kind::Int64,
    DType::Float16 => Kind::Half,
    DType::Float32 => Kind::Float,
    DType::Float64 => Kind::Double,
    DType::Complex32 => Kind::ComplexHalf,
    DType::Complex64 => Kind::ComplexFloat,
    DType::Complex128 => Kind::ComplexDouble,
    DType::Bool => Kind::Bool,
    DType::BFloat16 => Kind::BFloat16,
    DType::Float8E5M2 => Kind::Float8e5m2,
    DType::Float8E4M3Fn => Kind::Float8e4m3fn,
    DType::Float8E5M2Fnuz => Kind::Float8e5m2fnuz,
    DType::Float8E4M3Fnuz => Kind::Float8e4m3fnuz,
    DType::UInt16 | DType::UInt32 | DType::UInt64 | DType::Float8E8M0Fnu => return None,
  })
}

/// The flat DCP key of the variable `name` (`model.<name>`; `tch` joins path elements with dots, as torch does).
pub fn flat_key(name: &str) -> String {
  format!("{MODEL_KEY}.{name}")
}

/// A variable of the store, in a fixed order (by name: `VarStore` keeps them in a `HashMap`).
struct Named {
  name: String,
  tensor: Tensor,
}

fn sorted_variables(vs: &VarStore) -> Vec<Named> {
  let mut vars: Vec<Named> =
    vs.variables().into_iter().map(|(name, tensor)| Named { name, tensor }).collect();
  vars.sort_by(|a, b| a.name.cmp(&b.name));
  vars
}

/// Shape as DCP writes it; libtorch sizes are never negative.
fn shape_u64(t: &Tensor) -> Vec<u64> {
  t.size().iter().map(|&d| d.max(0) as u64).collect()
}

/// Bytes of a dense tensor of `shape` and `dtype`, if that fits in memory at all.
fn byte_len(shape: &[u64], dtype: DType) -> Option<usize> {
  let bytes = shape.iter().try_fold(dtype.size() as u64, |a, &d| a.checked_mul(d))?;
  usize::try_from(bytes).ok().filter(|&n| n <= isize::MAX as usize)
}

/// Saves the variables of `vs` into the checkpoint folder `path` as `{"model": {name: tensor}}`, with the core's
/// crash-safe commit (a checkpoint already there is replaced only once the new one is complete).
///
/// Each tensor is copied to a host buffer first (from its device, contiguous): the whole model is in host memory
/// once while the data file is written.
pub fn save_var_store(vs: &VarStore, path: impl AsRef<Path>) -> Result<SaveSummary> {
  save_var_store_with(vs, path, &SaveOptions::default())
}

/// [`save_var_store`] with the core's [`SaveOptions`] (layout, `Metadata.version`, fsync).
pub fn save_var_store_with(
  vs: &VarStore,
  path: impl AsRef<Path>,
  options: &SaveOptions,
) -> Result<SaveSummary> {
  let path = path.as_ref();
  let invalid = |key: String, reason: String| distcp_core::Error::InvalidInput {
    checkpoint: path.to_path_buf(),
    key,
    reason,
  };
  let vars = sorted_variables(vs);
  let mut host: Vec<(String, DType, Vec<u64>, Vec<u8>)> = Vec::with_capacity(vars.len());
  for Named { name, tensor } in vars {
    let key = flat_key(&name);
    let kind =
      tensor.f_kind().map_err(|source| Error::Tch { checkpoint: path.into(), key: key.clone(), source })?;
    let Some(dtype) = dtype_of_kind(kind) else {
      return Err(invalid(key, format!("tch kind {kind:?} (a quantized tensor) has no DCP dtype")).into());
    };
    let shape = shape_u64(&tensor);
    let Some(len) = byte_len(&shape, dtype) else {
      return Err(
        invalid(key, format!("a {dtype} tensor of shape {shape:?} does not fit in host memory")).into(),
      );
    };
    let mut bytes = vec![0u8; len];
    if len > 0 {
      // at_copy_data moves a CUDA tensor to the host and makes it contiguous before copying
      let numel = len / dtype.size();
      tensor.f_copy_data_u8(&mut bytes, numel).map_err(|source| Error::Tch {
        checkpoint: path.into(),
        key: key.clone(),
        source,
      })?;
    }
    host.push((name, dtype, shape, bytes));
  }
  let model = host
    .iter()
    .map(|(name, dtype, shape, bytes)| {
      let t = TensorRef { dtype: *dtype, shape: shape.clone(), data: bytes };
      (SaveValue::Str(name.clone()), SaveValue::Tensor(t))
    })
    .collect();
  let root = SaveValue::Dict(vec![(SaveValue::Str(MODEL_KEY.to_owned()), SaveValue::Dict(model))]);
  Ok(save(path, &root, options)?)
}

/// Loads the checkpoint folder `path` into the variables of `vs`: each variable `name` from the tensor
/// `model.<name>`, which must have the variable's dtype and shape. The checkpoint may have been written by
/// `torch.distributed.checkpoint.save` (any number of ranks and shards) or by [`save_var_store`].
///
/// Every variable is checked against the checkpoint's metadata before the first one is written, so a missing key
/// or a mismatch leaves the store unchanged; an I/O error or a corrupt data file found while copying can leave it
/// partly loaded. Returns the flat keys it loaded, in the order it loaded them.
pub fn load_var_store(vs: &mut VarStore, path: impl AsRef<Path>) -> Result<Vec<String>> {
  let path = path.as_ref();
  let ckpt = Checkpoint::open(path, None)?;
  let mismatch = |key: &str, reason: String| distcp_core::Error::BadRequest {
    checkpoint: path.to_path_buf(),
    key: key.to_owned(),
    reason,
  };

  struct Planned {
    key: String,
    tensor: Tensor,
    kind: Kind,
    shape: Vec<u64>,
    len: usize,
  }
  let mut planned = Vec::new();
  for Named { name, tensor } in sorted_variables(vs) {
    let key = flat_key(&name);
    let meta = ckpt.tensor(&key)?;
    let kind =
      tensor.f_kind().map_err(|source| Error::Tch { checkpoint: path.into(), key: key.clone(), source })?;
    let stored = meta.dtype();
    if dtype_of_kind(kind) != Some(stored) {
      let reason = match kind_of_dtype(stored) {
        Some(k) => {
          format!("the checkpoint holds {stored} (tch {k:?}), the variable `{name}` is tch {kind:?}")
        }
        None => format!(
          "the checkpoint holds {stored}, which tch has no kind for; the variable `{name}` is {kind:?}"
        ),
      };
      return Err(mismatch(&key, reason).into());
    }
    let shape = shape_u64(&tensor);
    if meta.size != shape {
      let reason =
        format!("the checkpoint holds shape {:?}, the variable `{name}` has shape {shape:?}", meta.size);
      return Err(mismatch(&key, reason).into());
    }
    let Some(len) = byte_len(&shape, stored) else {
      return Err(
        mismatch(&key, format!("a {stored} tensor of shape {shape:?} does not fit in host memory")).into(),
      );
    };
    planned.push(Planned { key, tensor, kind, shape, len });
  }

  let mut loaded = Vec::with_capacity(planned.len());
  for Planned { key, mut tensor, kind, shape, len } in planned {
    let mut bytes = vec![0u8; len];
    ckpt.read_into(&key, &Region::whole(&shape), &mut bytes)?;
    // sizes came from the tensor itself, so they fit in i64
    let dims: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
    let tch_err = |source| Error::Tch { checkpoint: path.into(), key: key.clone(), source };
    // the buffer holds exactly numel × element size bytes (checked by read_into), as at_tensor_of_data reads
    let src = Tensor::f_from_data_size(&bytes, &dims, kind).map_err(tch_err)?;
    // copy_ into the variable itself (shallow clones share its storage) moves the bytes to its device
    tch::no_grad(|| tensor.f_copy_(&src)).map_err(tch_err)?;
    loaded.push(key);
  }
  Ok(loaded)
}
