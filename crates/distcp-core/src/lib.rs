//! distcp-core: read and write PyTorch Distributed Checkpoints (DCP) exactly as `torch.distributed.checkpoint`
//! does, and convert them to Hugging Face safetensors, in pure Rust (no Python, no libtorch).
//!
//! The user-facing API:
//! - [`Checkpoint::open`] a checkpoint folder, then list [`Checkpoint::keys`], look at an item's dtype, shape and
//!   chunks ([`Checkpoint::item`], [`metadata::TensorMetadata`]), and read tensors whole
//!   ([`Checkpoint::read_tensor`]) or a box of one into your own buffer ([`Checkpoint::read_into`] with a
//!   [`plan::Region`]). Reads touch only the chunks that overlap the box; bytes are row-major, little-endian.
//! - [`write::save()`] a state dict given as a [`write::SaveValue`] tree; tensors borrow your bytes
//!   ([`write::TensorRef`]). The folder is what `torch.distributed.checkpoint.save` writes on one rank, and the
//!   save is atomic: complete or absent.
//! - [`convert`] a checkpoint to safetensors, planned from `.metadata` and written tensor by tensor.
//! - Every failure is an [`Error`] that names the file and key, with a stable [`Error::code`].
//!
//! Modules hidden from these docs (`pickle`, `zip`, `exec`, ...) are public only for the other crates of the distcp
//! workspace (the Node binding, the CUDA executor); they are not part of the supported API and may change.
//!
//! # Reading
//!
//! ```
//! use distcp_core::{plan::Region, Checkpoint, DType};
//!
//! # fn main() -> distcp_core::Result<()> {
//! let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/torch-2.15.0/seed-model/ckpt");
//! let ck = Checkpoint::open(dir, None)?;
//! assert!(ck.keys().any(|k| k == "model.0.weight"));
//!
//! let t = ck.tensor("model.0.weight")?;
//! assert_eq!((t.dtype(), t.size.as_slice()), (DType::Float32, &[8u64, 4][..]));
//!
//! // The whole tensor, in a new buffer: 8 × 4 float32.
//! let whole = ck.read_tensor("model.0.weight")?;
//! assert_eq!(whole.len(), 8 * 4 * 4);
//!
//! // Rows 2..4, columns 1..3 into a buffer of your own.
//! let region = Region { offsets: vec![2, 1], sizes: vec![2, 2] };
//! let mut buf = vec![0u8; 2 * 2 * 4];
//! ck.read_into("model.0.weight", &region, &mut buf)?;
//! let at = |r: usize, c: usize| &whole[(r * 4 + c) * 4..][..4];
//! assert_eq!(&buf[..8], [at(2, 1), at(2, 2)].concat());
//! assert_eq!(&buf[8..], [at(3, 1), at(3, 2)].concat());
//! # Ok(())
//! # }
//! ```
//!
//! # Saving
//!
//! A state dict `{"model": {"w": <2×3 float32>}, "step": 7}` saved the way `dcp.save` saves it (flat keys
//! `model.w` and `step`), then read back:
//!
//! ```
//! use distcp_core::write::{save, SaveOptions, SaveValue, TensorRef};
//! use distcp_core::{metadata::ItemMetadata, Checkpoint, DType};
//!
//! # fn main() -> distcp_core::Result<()> {
//! let values: Vec<f32> = vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
//! let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
//! let key = |k: &str| SaveValue::Str(k.to_owned());
//! let state = SaveValue::Dict(vec![
//!   (
//!     key("model"),
//!     SaveValue::Dict(vec![(
//!       key("w"),
//!       SaveValue::Tensor(TensorRef { dtype: DType::Float32, shape: vec![2, 3], data: &bytes }),
//!     )]),
//!   ),
//!   (key("step"), SaveValue::Int(7)),
//! ]);
//!
//! let dir = std::env::temp_dir().join(format!("distcp-core-doctest-{}", std::process::id()));
//! let summary = save(&dir, &state, &SaveOptions::default())?;
//! assert_eq!(summary.keys, ["model.w", "step"]);
//!
//! let ck = Checkpoint::open(&dir, None)?;
//! assert_eq!(ck.read_tensor("model.w")?, bytes);
//! assert!(matches!(ck.item("step")?, ItemMetadata::Bytes));
//! # drop(ck);
//! # std::fs::remove_dir_all(&dir).ok();
//! # Ok(())
//! # }
//! ```
#![deny(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::all)]

pub mod checkpoint;
#[doc(hidden)]
pub mod commit;
pub mod convert;
#[doc(hidden)]
pub mod copy;
pub mod dtype;
pub mod error;
#[doc(hidden)]
pub mod exec;
#[doc(hidden)]
pub mod layout;
pub mod limits;
pub mod metadata;
#[doc(hidden)]
pub mod pickle;
mod pio;
pub mod plan;
#[doc(hidden)]
pub mod retarget;
#[doc(hidden)]
pub mod safetensors;
#[doc(hidden)]
pub mod source;
pub mod staging;
pub mod threads;
#[doc(hidden)]
pub mod torch_save;
pub mod value;
pub mod write;
#[doc(hidden)]
pub mod zip;

pub use checkpoint::Checkpoint;
pub use dtype::DType;
pub use error::{Error, Result};
// Types the documented API hands out although their modules are internal: re-exported here so they are named,
// documented and part of the semver surface (`Checkpoint::read_object`, `SaveValue::BigInt`, `Checkpoint::layout`).
pub use layout::{Layout, LayoutKind, NemoRl};
pub use pickle::BigInt;
pub use torch_save::PyObject;

pub(crate) fn unpickle_error(e: pickle::UnpickleError, path: &std::path::Path) -> Error {
  match e {
    pickle::UnpickleError::Malformed { pos, reason } => {
      Error::Pickle { path: path.to_path_buf(), pos, reason }
    }
    pickle::UnpickleError::Forbidden { module, name } => {
      Error::ForbiddenGlobal { path: path.to_path_buf(), module, name }
    }
  }
}
