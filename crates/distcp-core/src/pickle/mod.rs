//! Just enough pickle to read what PyTorch writes: a restricted unpickler that builds a [`Value`] tree and never
//! runs anything. Globals are not imported; each one must be on the caller's allow-list or loading stops with an
//! error naming it.

mod read;
mod value;
pub mod write;

pub use read::{
  unpickle, unpickle_view, unpickle_with_budget, AllowList, Items, ObjectView, UnpickleError, Unpickled, View,
};
pub use value::{BigInt, Global, Object, Value};
