//! Core errors become JS errors whose message starts with `[CODE]`; the TypeScript layer turns that into a
//! `DistcpError` with `.code`. Panics are caught and reported the same way, never unwound into Node.

use napi::{Error, Status};
use std::panic::{catch_unwind, AssertUnwindSafe};

pub fn to_js(e: distcp_core::Error) -> Error {
  Error::new(Status::GenericFailure, format!("[{}] {}", e.code(), e))
}

pub fn invalid_arg(msg: impl std::fmt::Display) -> Error {
  Error::new(Status::InvalidArg, format!("[ERR_DISTCP_BAD_REQUEST] {msg}"))
}

/// Runs worker-thread code so that a panic turns into an error (libuv threads would otherwise abort the process).
pub fn guarded<T>(f: impl FnOnce() -> napi::Result<T>) -> napi::Result<T> {
  match catch_unwind(AssertUnwindSafe(f)) {
    Ok(r) => r,
    Err(payload) => {
      let what = payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into());
      Err(Error::new(
        Status::GenericFailure,
        format!("[ERR_DISTCP_INTERNAL] internal error (a bug in distcp): {what}"),
      ))
    }
  }
}

pub struct PanicTask;

impl napi::Task for PanicTask {
  type Output = ();
  type JsValue = ();

  fn compute(&mut self) -> napi::Result<()> {
    guarded(|| panic!("deliberate panic on a worker thread"))
  }

  fn resolve(&mut self, _env: napi::Env, _output: ()) -> napi::Result<()> {
    Ok(())
  }
}
