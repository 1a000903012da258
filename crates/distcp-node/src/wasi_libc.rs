//! C functions that Rust 1.96's std calls on wasm32-wasip1 and that Debian 12's wasi-libc (2022-05, the one the WASM
//! build links) predates: the pthread entry points (newer wasi-libc ships stubs that fail on single-threaded
//! WASI) and `realpath` (`std::fs::canonicalize`). Left undefined they become imports of the module that no WASI
//! host provides, and it would not instantiate.
//!
//! Thread creation fails with ENOSYS, as in newer wasi-libc, so `std::thread::Builder::spawn` returns an error
//! and the callers run their work on the calling thread (the core asks `available_parallelism`, which is 1 here,
//! before it starts threads). `realpath` resolves symbolic links like the C library's: the core relies on it to
//! refuse data files that lead outside a checkpoint folder.

use std::ffi::{c_char, c_int, c_void, CStr, OsStr, OsString};
use std::os::wasi::ffi::{OsStrExt, OsStringExt};
use std::path::{Component, Path, PathBuf};

/// WASI's errno numbers (wasi-libc's `<errno.h>`).
const ENOSYS: c_int = 52;
const ENOENT: c_int = 44;
const ELOOP: c_int = 32;
const ENOMEM: c_int = 48;
const EINVAL: c_int = 28;

/// Symbolic links followed in one `realpath` before it gives up, as Linux's `MAXSYMLINKS`.
const MAX_SYMLINKS: usize = 40;

extern "C" {
  /// wasi-libc's `errno`: thread-local in C, a plain global in a module built without threads (as this one is).
  static mut errno: c_int;
  fn malloc(n: usize) -> *mut c_void;
}

fn set_errno(e: c_int) {
  // SAFETY: the module has one thread, and libc's errno is an aligned int that lives as long as the module.
  unsafe { errno = e };
}

#[no_mangle]
pub extern "C" fn pthread_create(
  _: *mut c_void,
  _: *const c_void,
  _: *const c_void,
  _: *mut c_void,
) -> c_int {
  ENOSYS
}

#[no_mangle]
pub extern "C" fn pthread_join(_: *mut c_void, _: *mut *mut c_void) -> c_int {
  ENOSYS
}

/// Referenced by std's scoped threads (a handle dropped unjoined); never called, as no thread is ever created here.
#[no_mangle]
pub extern "C" fn pthread_detach(_: *mut c_void) -> c_int {
  0
}

#[no_mangle]
pub extern "C" fn pthread_attr_init(_: *mut c_void) -> c_int {
  0
}

#[no_mangle]
pub extern "C" fn pthread_attr_destroy(_: *mut c_void) -> c_int {
  0
}

#[no_mangle]
pub extern "C" fn pthread_attr_setstacksize(_: *mut c_void, _: usize) -> c_int {
  0
}

/// The absolute path of `path` with `.`, `..` and every symbolic link resolved; the path must exist.
fn resolve(path: &Path) -> Result<PathBuf, c_int> {
  let start =
    if path.is_absolute() { PathBuf::new() } else { std::env::current_dir().map_err(|_| ENOENT)? };
  let mut todo: Vec<OsString> = Vec::new();
  let push_all = |todo: &mut Vec<OsString>, p: &Path| {
    // pushed in reverse, popped from the end: components come off in order
    let parts: Vec<OsString> = p
      .components()
      .filter_map(|c| match c {
        Component::Normal(s) => Some(s.to_os_string()),
        Component::ParentDir => Some(OsString::from("..")),
        Component::CurDir | Component::RootDir | Component::Prefix(_) => None,
      })
      .collect();
    todo.extend(parts.into_iter().rev());
  };
  push_all(&mut todo, path);
  let mut out = if start.as_os_str().is_empty() { PathBuf::from("/") } else { start };
  let mut links = 0usize;
  while let Some(part) = todo.pop() {
    if part == ".." {
      out.pop();
      continue;
    }
    let next = out.join(&part);
    let meta = std::fs::symlink_metadata(&next).map_err(|e| e.raw_os_error().unwrap_or(ENOENT))?;
    if meta.file_type().is_symlink() {
      links += 1;
      if links > MAX_SYMLINKS {
        return Err(ELOOP);
      }
      let target = std::fs::read_link(&next).map_err(|e| e.raw_os_error().unwrap_or(ENOENT))?;
      if target.is_absolute() {
        out = PathBuf::from("/");
      }
      push_all(&mut todo, &target);
    } else {
      out = next;
    }
  }
  Ok(out)
}

/// # Safety
/// `path` is a NUL-terminated string; `resolved` is null or points to at least PATH_MAX (4096) bytes.
#[no_mangle]
pub unsafe extern "C" fn realpath(path: *const c_char, resolved: *mut c_char) -> *mut c_char {
  if path.is_null() {
    set_errno(EINVAL);
    return std::ptr::null_mut();
  }
  // SAFETY: the caller passes a NUL-terminated string (realpath's contract).
  let path = Path::new(OsStr::from_bytes(unsafe { CStr::from_ptr(path) }.to_bytes()));
  let out = match resolve(path) {
    Ok(p) => p.into_os_string().into_vec(),
    Err(e) => {
      set_errno(e);
      return std::ptr::null_mut();
    }
  };
  const PATH_MAX: usize = 4096;
  let dst = if resolved.is_null() {
    // SAFETY: malloc has no preconditions; the caller frees the result with free() (std does).
    unsafe { malloc(out.len() + 1) as *mut c_char }
  } else if out.len() < PATH_MAX {
    resolved
  } else {
    set_errno(ENOENT);
    return std::ptr::null_mut();
  };
  if dst.is_null() {
    set_errno(ENOMEM);
    return dst;
  }
  // SAFETY: `dst` holds at least out.len() + 1 bytes (allocated so, or PATH_MAX > out.len()), and does not overlap
  // `out`, a fresh Vec.
  unsafe {
    std::ptr::copy_nonoverlapping(out.as_ptr(), dst as *mut u8, out.len());
    *dst.add(out.len()) = 0;
  }
  dst
}
