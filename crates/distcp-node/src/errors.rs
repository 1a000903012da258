//! Errors cross into JS with their `ERR_DISTCP_*` code as the error's `code` property, set natively: napi-rs makes
//! the status string of a `napi::Error<S>` the `code` of the JS error it throws. Synchronous calls return
//! [`Result`] and napi throws it as it is; worker-thread jobs implement [`Work`] and run as [`Job`]s, which build
//! the coded JS error on the JS thread (napi's `Task` only carries napi's own statuses across threads). Panics are
//! caught and reported as `ERR_DISTCP_INTERNAL`, never unwound into Node.

use napi::bindgen_prelude::{ToNapiValue, TypeName};
use napi::{Env, JsError, ScopedTask};
use std::panic::{catch_unwind, AssertUnwindSafe};

/// A JS error whose `code` is an `ERR_DISTCP_*` code.
pub type Error = napi::Error<&'static str>;

/// What every binding function returns.
pub type Result<T> = std::result::Result<T, Error>;

/// The binding's own codes: arguments the core never sees, handles used after they were released, and bugs.
/// Every other code is the core's (`distcp_core::Error::code`) or the CUDA crate's.
const BAD_REQUEST: &str = "ERR_DISTCP_BAD_REQUEST";
const INVALID_INPUT: &str = "ERR_DISTCP_INVALID_INPUT";
const CLOSED: &str = "ERR_DISTCP_CLOSED";
const INTERNAL: &str = "ERR_DISTCP_INTERNAL";

pub fn to_js(e: distcp_core::Error) -> Error {
  Error::new(e.code(), e.to_string())
}

#[cfg(not(target_family = "wasm"))]
pub fn cuda_js(e: distcp_cuda::CudaError) -> Error {
  Error::new(e.code(), e.to_string())
}

/// An argument the TypeScript layer passed that the binding refuses before any work (a bad box, a closed handle).
pub fn invalid_arg(msg: impl std::fmt::Display) -> Error {
  Error::new(BAD_REQUEST, msg.to_string())
}

/// A state dict or plan the binding cannot decode (what `save` was given).
pub fn invalid_input(msg: impl std::fmt::Display) -> Error {
  Error::new(INVALID_INPUT, msg.to_string())
}

/// A handle used after it was released.
pub fn closed(msg: impl std::fmt::Display) -> Error {
  Error::new(CLOSED, msg.to_string())
}

/// A failure of napi itself (creating a buffer or an object): a bug or an exhausted JS heap, not bad input.
pub fn internal(e: napi::Error) -> Error {
  Error::new(INTERNAL, format!("internal error in the Node binding: {}", e.reason))
}

/// Runs worker-thread code so that a panic turns into an error (libuv threads would otherwise abort the process).
pub fn guarded<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
  match catch_unwind(AssertUnwindSafe(f)) {
    Ok(r) => r,
    Err(payload) => {
      let what = payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into());
      Err(Error::new(INTERNAL, format!("internal error (a bug in distcp): {what}")))
    }
  }
}

/// Work for a libuv thread: `compute` there, `resolve` back on the JS thread. Like napi's `ScopedTask`, with
/// coded errors.
pub trait Work<'env>: Send + Sized {
  type Output: Send + 'static;
  type JsValue: ToNapiValue + TypeName;

  fn compute(&mut self) -> Result<Self::Output>;

  fn resolve(&mut self, env: &'env Env, output: Self::Output) -> Result<Self::JsValue>;
}

/// A [`Work`] as napi's task: the outcome (value or coded error) crosses threads as the task's output, and a
/// failure becomes a JS error with its code on the JS thread, which rejects the promise as it is.
pub struct Job<W>(W);

/// The promise-returning task that runs `work`.
pub fn job<W: for<'env> Work<'env>>(work: W) -> napi::bindgen_prelude::AsyncTask<Job<W>> {
  napi::bindgen_prelude::AsyncTask::new(Job(work))
}

/// The coded JS error, held by reference so that napi rejects with this object (with its `code`) rather than
/// building a fresh one from a status.
fn rejection(env: &Env, e: Error) -> napi::Error {
  let value = JsError::from(e).into_unknown(Env::from_raw(env.raw()));
  // napi's `From<Unknown>` keeps no reference to the object on wasm (the code would be lost for GenericFailure)
  #[cfg(target_family = "wasm")]
  return napi::Error::from_unknown_without_coercion(value);
  #[cfg(not(target_family = "wasm"))]
  napi::Error::from(value)
}

impl<'env, W: Work<'env>> ScopedTask<'env> for Job<W> {
  type Output = Result<W::Output>;
  type JsValue = W::JsValue;

  fn compute(&mut self) -> napi::Result<Self::Output> {
    Ok(guarded(|| self.0.compute()))
  }

  fn resolve(&mut self, env: &'env Env, output: Self::Output) -> napi::Result<W::JsValue> {
    output.and_then(|v| self.0.resolve(env, v)).map_err(|e| rejection(env, e))
  }
}

pub struct PanicTask;

impl Work<'_> for PanicTask {
  type Output = ();
  type JsValue = ();

  fn compute(&mut self) -> Result<()> {
    panic!("deliberate panic on a worker thread")
  }

  fn resolve(&mut self, _env: &Env, _output: ()) -> Result<()> {
    Ok(())
  }
}
