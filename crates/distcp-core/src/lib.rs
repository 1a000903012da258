//! distcp-core: read PyTorch Distributed Checkpoints (DCP) exactly as `torch.distributed.checkpoint` writes them.
//!
//! Layers: [`pickle`] (restricted unpickler and the pickler, `pickle::{read, write}`) → [`metadata`] (typed `.metadata`) and [`torch_save`] (one stored
//! item) → [`plan`] (which chunk bytes land where; pure data) → [`copy`] (executes a plan) → [`checkpoint`].
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
pub mod plan;
#[doc(hidden)]
pub mod retarget;
#[doc(hidden)]
pub mod safetensors;
#[doc(hidden)]
pub mod source;
#[doc(hidden)]
pub mod torch_save;
pub mod write;
#[doc(hidden)]
pub mod zip;

pub use checkpoint::Checkpoint;
pub use dtype::DType;
pub use error::{Error, Result};

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
