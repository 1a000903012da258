//! The CUDA layer's errors. Every variant maps to a stable `ERR_DISTCP_*` code, like the core's.

/// Why a CUDA read, allocation or probe failed.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
  /// No usable CUDA: no driver library, `cuInit` failed, no device, or the device index is out of range.
  #[error("no CUDA: {reason}")]
  NoCuda {
    /// What is missing, in words.
    reason: String,
  },

  /// A driver call returned an error.
  #[error("CUDA driver call {call} failed with {name} ({code}){context}")]
  Driver {
    /// The driver function.
    call: &'static str,
    /// Its `CUresult`.
    code: i32,
    /// The driver's name for it (`CUDA_ERROR_OUT_OF_MEMORY`, …).
    name: String,
    /// What distcp was doing, or empty.
    context: String,
  },

  /// An error of the core (file, key and reason).
  #[error(transparent)]
  Core(#[from] distcp_core::Error),

  /// A request that cannot be served (wrong destination size, disposed tensor, …).
  #[error("{0}")]
  BadRequest(String),

  /// A device tensor was used after `dispose()`.
  #[error("the device tensor was disposed")]
  Disposed,

  /// A panic inside the CUDA layer, caught before it could unwind further.
  #[error("internal error in the CUDA layer (a bug in distcp): {0}")]
  Panic(String),
}

impl CudaError {
  /// A short, stable name for the kind of error (the `code` of the JS error).
  pub fn code(&self) -> &'static str {
    match self {
      CudaError::NoCuda { .. } => "ERR_DISTCP_NO_CUDA",
      CudaError::Driver { .. } => "ERR_DISTCP_CUDA",
      CudaError::Core(e) => e.code(),
      CudaError::BadRequest(_) => "ERR_DISTCP_BAD_REQUEST",
      CudaError::Disposed => "ERR_DISTCP_DISPOSED",
      CudaError::Panic(_) => "ERR_DISTCP_INTERNAL",
    }
  }
}

pub type Result<T, E = CudaError> = std::result::Result<T, E>;
