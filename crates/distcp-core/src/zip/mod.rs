//! The zip container of `torch.save` archives: the reader (stored entries only, ZIP64, central directory checked
//! against local headers) and the writer (byte-identical to PyTorch's `PyTorchStreamWriter`) side by side, with
//! the format's constants in one place.

mod read;
pub mod write;

pub use read::*;

/// Record signatures (little-endian `PK` + two bytes).
pub(crate) const LOCAL_SIG: u32 = 0x0403_4b50;
pub(crate) const CENTRAL_SIG: u32 = 0x0201_4b50;
pub(crate) const DESCRIPTOR_SIG: u32 = 0x0807_4b50;
pub(crate) const ZIP64_END_SIG: u32 = 0x0606_4b50;
pub(crate) const ZIP64_LOCATOR_SIG: u32 = 0x0706_4b50;
pub(crate) const END_SIG: u32 = 0x0605_4b50;
