//! Node bindings for distcp-core. Thin on purpose: argument conversion, worker-thread tasks, zero-copy buffers
//! and error mapping; every format rule lives in the core.
#![deny(clippy::all)]
#![deny(unsafe_op_in_unsafe_fn)]

mod background;
mod checkpoint;
mod convert;
mod cuda_info;
// a WASI module cannot load libcuda: the WASM fallback reports CUDA as unavailable
#[cfg(not(target_family = "wasm"))]
mod cuda;
#[cfg(target_family = "wasm")]
#[path = "cuda_wasm.rs"]
mod cuda;
mod enums;
mod errors;
mod ranks;
mod save;
mod state_dict;
mod tagged;
#[cfg(target_os = "wasi")]
mod wasi_libc;

pub use checkpoint::*;
pub use convert::*;
pub use cuda::*;
pub use enums::*;
pub use ranks::*;
pub use save::*;
pub use state_dict::*;

/// Throws from Rust code that panics, on the JS thread (sync) or on a worker (async). Used by the tests to prove
/// that a panic becomes a JS error instead of aborting Node.
#[napi_derive::napi(catch_unwind, ts_return_type = "Promise<void> | null")]
pub fn panic_for_test(
  where_: String,
) -> errors::Result<Option<napi::bindgen_prelude::AsyncTask<errors::Job<errors::PanicTask>>>> {
  if where_ == "sync" {
    panic!("deliberate panic for the no-panic-crosses-into-Node test");
  }
  Ok(Some(errors::job(errors::PanicTask)))
}
