//! Work that runs behind a trainer (`saveAsync`'s write) gets a thread of its own at a lower CPU priority, so it
//! takes the CPU time the trainer leaves idle instead of competing with it. A thread of its own, not the libuv
//! pool thread the task runs on: Linux lets an unprivileged process lower a thread's priority but not raise it
//! back, and the pool's threads serve every other `fs` call of the process.

use std::panic::resume_unwind;
use std::sync::Mutex;

/// The nice value of background work (0 is normal, 19 the lowest): low enough that a busy trainer thread gets
/// ~90% of a contended core (CFS weights 1024 vs 110), and not so low that the write stalls on an idle machine.
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
pub const BACKGROUND_NICE: i32 = 10;

/// Runs `f` on a new thread at [`BACKGROUND_NICE`] and returns its result (a panic in `f` is re-raised here, for
/// the caller's `guarded`). When no thread can be started, `f` runs here at normal priority.
pub fn at_background_priority<T: Send>(f: impl FnOnce() -> T + Send) -> T {
  // whoever takes `f` out runs it: the new thread, or this one when the thread could not be started
  let cell = Mutex::new(Some(f));
  let take = || cell.lock().ok().and_then(|mut f| f.take());
  let ran = std::thread::scope(|s| {
    let thread = std::thread::Builder::new().name("distcp-background".into());
    thread
      .spawn_scoped(s, || {
        lower_this_threads_priority();
        take().map(|f| f())
      })
      .map(|handle| handle.join())
  });
  match ran {
    Ok(Ok(Some(out))) => out,
    Ok(Err(panic)) => resume_unwind(panic),
    _ => match take() {
      Some(f) => f(),
      None => panic!("background work was taken but not run"),
    },
  }
}

#[cfg(target_os = "linux")]
fn lower_this_threads_priority() {
  // SAFETY: gettid has no preconditions; get/setpriority with PRIO_PROCESS and a thread id read and change only
  // that thread on Linux, and a failure (e.g. a seccomp filter) leaves it as it was, which is still correct.
  unsafe {
    let tid = libc::gettid() as libc::id_t;
    // a process already running nicer than this stays as nice as it was
    let now = libc::getpriority(libc::PRIO_PROCESS, tid);
    libc::setpriority(libc::PRIO_PROCESS, tid, now.max(BACKGROUND_NICE));
  }
}

#[cfg(not(target_os = "linux"))]
fn lower_this_threads_priority() {}

#[cfg(all(test, target_os = "linux"))]
mod tests {
  use super::*;

  fn this_threads_nice() -> i32 {
    // SAFETY: as in lower_this_threads_priority; getpriority only reads.
    unsafe { libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t) }
  }

  #[test]
  fn runs_at_lower_priority_and_leaves_the_caller_alone() {
    let before = this_threads_nice();
    let inside = at_background_priority(this_threads_nice);
    assert_eq!(inside, before.max(BACKGROUND_NICE));
    assert_eq!(this_threads_nice(), before, "the calling (pool) thread keeps its priority");
  }

  #[test]
  fn a_panic_comes_back_to_the_caller() {
    let r = std::panic::catch_unwind(|| at_background_priority(|| -> u8 { panic!("boom") }));
    let payload = r.expect_err("the panic is re-raised");
    assert_eq!(payload.downcast_ref::<&str>(), Some(&"boom"));
  }
}
