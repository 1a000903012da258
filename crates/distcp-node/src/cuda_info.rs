//! What `cudaInfo()` returns, native and WASM builds alike (`cuda.rs` fills it from the driver, `cuda_wasm.rs` says
//! there is none).

use napi_derive::napi;

#[napi(object)]
pub struct NativeCudaDevice {
  pub index: u32,
  pub name: String,
  pub total_memory: f64,
  pub pci_bus_id: String,
}

#[napi(object)]
pub struct NativeCudaInfo {
  pub available: bool,
  pub reason: Option<String>,
  pub driver_version: Option<String>,
  pub devices: Vec<NativeCudaDevice>,
}
