//! CUDA in the WebAssembly build: there is no driver to load from a WASI module, so `cudaInfo()` says so and the
//! device reads are absent (the TypeScript layer asks `cudaInfo()` before any device work).

use napi_derive::napi;

pub use crate::cuda_info::{NativeCudaDevice, NativeCudaInfo};

/// CUDA is never available to the WASM fallback (a WASI module cannot load libcuda).
#[napi]
pub fn cuda_info() -> NativeCudaInfo {
  NativeCudaInfo {
    available: false,
    reason: Some(
      "distcp runs as WebAssembly here (the WASM fallback), which cannot load the CUDA driver".into(),
    ),
    driver_version: None,
    devices: Vec::new(),
  }
}
