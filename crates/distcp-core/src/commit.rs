//! The one owner of how distcp puts files on disk without losing what a user had: the folder lock, the names of
//! temporary files and folders, the journalled move of a staged output into place, recovery after a crash, and
//! the cleanup of leftovers of dead writers. `write::save` and conversion (`convert::commit_output`) both use it.
//!
//! **Lock.** Every writer holds an exclusive `flock` on `<folder>/.distcp.lock` for the whole save or
//! conversion; a second writer fails at once with `ERR_DISTCP_LOCKED` (naming the folder and the holder's pid,
//! which the holder writes into the file). The holder removes the lock file while it still holds the lock, and a
//! taker checks after `flock` that the file it locked is still the one at the path (else it retries), so removing
//! it is safe and a finished folder has no lock file. On a file system without `flock` (some network mounts) the
//! writer proceeds unlocked and leftovers are only removed when their name shows a dead writer. The ranks of a
//! rank-local save (`use_collectives=False`) hold the lock shared instead, each with an exclusive lock of its own
//! rank (`.distcp-rank-<r>.lock`): they write beside each other, and no exclusive writer runs while they do.
//!
//! **Leftovers.** Because every writer holds the lock, anything temporary found by the lock holder belongs to a
//! dead writer: it is finished (journal) or removed. Temporary folders are named
//! `.distcp-tmp-<pid>-<boot id>-<random>` (boot id: `/proc/sys/kernel/random/boot_id`), so that without a lock
//! a live writer's folder is still recognised.
//!
//! **Staged output** (conversion). Files are written into a temporary folder inside the output folder, then
//! [`Staged::commit`] writes a journal (`.distcp-journal`: which files move, which stale files go; written to a
//! temporary name, fsynced, renamed) and moves the files in with `rename`, the ones named last (index, config) at
//! the end, then removes the stale files, then the journal. What is atomic: each file is replaced by one
//! `rename`, so no reader sees a partial file; the set of files is crash-atomic — a kill before the journal is in
//! place leaves the old files untouched, a kill after it is rolled forward by the next writer to lock the folder.
//! A reader that lists the folder while the moves run (a few renames) can see some new and some old files.
//! Files that are not in the staged set and not named stale are never touched.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Component, Path, PathBuf};

/// The lock file every distcp writer holds for the whole write.
pub const LOCK_FILE: &str = ".distcp.lock";
/// The lock file one rank of a rank-local save holds exclusively (beside a shared hold of [`LOCK_FILE`]).
pub fn rank_lock_name(rank: usize) -> String {
  format!(".distcp-rank-{rank}.lock")
}
/// Prefix of the temporary folder a staged output is written into (inside the output folder).
pub const TMP_DIR_PREFIX: &str = ".distcp-tmp-";
/// The journal of a commit in progress.
pub const JOURNAL: &str = ".distcp-journal";
const JOURNAL_TMP: &str = ".distcp-journal.tmp";
/// The environment variable of the crash test hook (see [`crash_point`]).
pub const CRASH_ENV: &str = "DISTCP_TEST_CRASH_AT";
/// The environment variable of the pause test hook (see [`crash_point`]).
pub const PAUSE_ENV: &str = "DISTCP_TEST_PAUSE_AT";

/// The environment variable naming the file whose creation ends a pause of the test hook (see [`crash_point`]).
pub const PAUSE_RELEASE_ENV: &str = "DISTCP_TEST_PAUSE_RELEASE";

/// Test hooks at named points of a write (`save:<fail point>`, `convert:<point>`): when the environment variable
/// `DISTCP_TEST_CRASH_AT` equals `name`, the process kills itself with SIGKILL here (a `kill -9` at a known
/// point); when `DISTCP_TEST_PAUSE_AT` equals it, the process says so on stderr and waits there holding what it
/// holds (to race a second writer deterministically): until the file `DISTCP_TEST_PAUSE_RELEASE` exists, for at
/// most `DISTCP_TEST_PAUSE_MS` (default 2000). A test that releases the pause itself does not depend on how fast
/// a loaded machine starts its second writer; one that only sleeps did (CI saw such a race lost).
#[doc(hidden)]
pub fn crash_point(name: &str) {
  if std::env::var_os(PAUSE_ENV).is_some_and(|v| v == name) {
    let ms = std::env::var("DISTCP_TEST_PAUSE_MS").ok().and_then(|v| v.parse().ok()).unwrap_or(2000);
    let release = std::env::var_os(PAUSE_RELEASE_ENV).map(PathBuf::from);
    eprintln!("distcp: paused at {name}");
    let until = std::time::Instant::now() + std::time::Duration::from_millis(ms);
    match release {
      Some(file) => {
        while !file.exists() && std::time::Instant::now() < until {
          std::thread::sleep(std::time::Duration::from_millis(10));
        }
      }
      None => std::thread::sleep(std::time::Duration::from_millis(ms)),
    }
  }
  if std::env::var_os(CRASH_ENV).is_some_and(|v| v == name) {
    #[cfg(unix)]
    {
      // SAFETY: getpid and kill have no memory-safety preconditions; SIGKILL ends the process right here.
      unsafe {
        libc::kill(libc::getpid(), libc::SIGKILL);
      }
    }
    std::process::abort();
  }
}

/// This machine's boot id (the first 8 hex digits), or `0` where there is none.
pub fn boot_id() -> String {
  fs::read_to_string("/proc/sys/kernel/random/boot_id")
    .ok()
    .map(|s| s.chars().filter(|c| c.is_ascii_hexdigit()).take(8).collect::<String>())
    .filter(|s| !s.is_empty())
    .unwrap_or_else(|| "0".into())
}

/// This process's id. A WASI module has none (std's `process::id` panics there): the WASM fallback's loader passes
/// Node's `process.pid` as `DISTCP_NODE_PID`, and without it the id is 0, which [`writer_is_dead`] never judges dead.
pub fn process_id() -> u32 {
  #[cfg(not(target_os = "wasi"))]
  {
    std::process::id()
  }
  #[cfg(target_os = "wasi")]
  {
    std::env::var("DISTCP_NODE_PID").ok().and_then(|p| p.parse().ok()).unwrap_or(0)
  }
}

fn random_hex() -> String {
  let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
  let mut h = std::collections::hash_map::DefaultHasher::new();
  std::hash::Hash::hash(&(nanos, process_id(), std::thread::current().id()), &mut h);
  format!("{:08x}", std::hash::Hasher::finish(&h) as u32)
}

/// A unique temporary name with this writer's pid and boot id: `<prefix><pid>-<boot>-<random>`.
pub fn temp_name(prefix: &str) -> String {
  format!("{prefix}{}-{}-{}", process_id(), boot_id(), random_hex())
}

/// Whether the writer that named `name` (made by [`temp_name`] with `prefix`) is certainly gone: another boot, or
/// no such process. Unparsable names count as alive (never removed on a guess).
pub fn writer_is_dead(name: &str, prefix: &str) -> bool {
  let Some(rest) = name.strip_prefix(prefix) else { return false };
  let mut parts = rest.split('-');
  let (Some(pid), Some(boot)) = (parts.next().and_then(|p| p.parse::<i32>().ok()), parts.next()) else {
    return false;
  };
  boot != boot_id() || !pid_alive(pid)
}

fn pid_alive(pid: i32) -> bool {
  if pid <= 0 {
    return true;
  }
  #[cfg(unix)]
  {
    // SAFETY: kill with signal 0 only checks whether the process exists; no memory is involved.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
  }
  #[cfg(not(unix))]
  {
    true
  }
}

/// An advisory lock on a folder, held until dropped (see the module doc): exclusive, or shared (rank-local saves,
/// [`crate::write::ranks::RankLocalSave`]: the ranks of one job hold the folder lock together, and any exclusive
/// writer is refused while they do).
#[derive(Debug)]
pub struct DirLock {
  /// `None` where the file system has no `flock`: the write goes on unlocked.
  file: Option<File>,
  path: PathBuf,
  shared: bool,
}

/// How often a shared taker retries while the lock is held exclusively (1 ms apart) before it reports the folder
/// locked: a shared holder that lets go takes the lock exclusively for a moment (see `Drop`), which is no writer.
const SHARED_RETRIES: u32 = 200;

impl DirLock {
  /// Takes the lock of the existing folder `dir`, or fails with `ERR_DISTCP_LOCKED` if a writer holds it.
  pub fn acquire(dir: &Path) -> Result<DirLock> {
    DirLock::take(dir, LOCK_FILE, false)
  }

  /// Takes the folder lock of `dir` shared with other shared holders; fails with `ERR_DISTCP_LOCKED` while an
  /// exclusive writer holds it (and makes exclusive writers fail while it is held).
  pub fn acquire_shared(dir: &Path) -> Result<DirLock> {
    DirLock::take(dir, LOCK_FILE, true)
  }

  /// Takes the exclusive lock file `name` of `dir` (a lock on one part of the folder, e.g. one rank's files).
  pub fn acquire_named(dir: &Path, name: &str) -> Result<DirLock> {
    DirLock::take(dir, name, false)
  }

  fn take(dir: &Path, name: &str, shared: bool) -> Result<DirLock> {
    let path = dir.join(name);
    // no flock to take (a WASI module): the write goes on unlocked, and no lock file is left behind
    if cfg!(not(unix)) {
      fs::metadata(dir).map_err(|e| Error::io(dir, e))?;
      return Ok(DirLock { file: None, path, shared });
    }
    let (mut replaced, mut busy) = (0u32, 0u32);
    while replaced < 64 {
      let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| Error::io(&path, e))?;
      match try_flock(&file, shared) {
        Ok(true) => {}
        Ok(false) if shared && busy < SHARED_RETRIES => {
          busy += 1;
          std::thread::sleep(std::time::Duration::from_millis(1));
          continue;
        }
        Ok(false) => {
          let mut text = String::new();
          let _ = file.read_to_string(&mut text);
          return Err(Error::Locked { path: dir.to_path_buf(), pid: text.trim().parse().ok() });
        }
        Err(e) if lock_unsupported(&e) => return Ok(DirLock { file: None, path, shared }),
        Err(e) => return Err(Error::io(&path, e)),
      }
      // the previous holder may have removed the file between our open and our flock: lock the current one
      if !same_file(&file, &path) {
        replaced += 1;
        continue;
      }
      // shared holders leave the file as it is (an exclusive taker then names no pid)
      if !shared {
        file.set_len(0).map_err(|e| Error::io(&path, e))?;
        file.write_all(format!("{}\n", process_id()).as_bytes()).map_err(|e| Error::io(&path, e))?;
      }
      return Ok(DirLock { file: Some(file), path, shared });
    }
    Err(Error::io(&path, io::Error::other("the lock file keeps being replaced")))
  }

  /// Whether the lock is really held (false on a file system without `flock`).
  pub fn held(&self) -> bool {
    self.file.is_some()
  }
}

impl Drop for DirLock {
  fn drop(&mut self) {
    let Some(file) = &self.file else { return };
    // only the last shared holder removes the file: it alone can take the lock exclusively (a failed conversion
    // drops the shared lock, which is being let go anyway)
    if self.shared && !matches!(try_flock(file, false), Ok(true)) {
      return;
    }
    // removed while still locked: a waiter that opened it re-checks the path after its flock
    let _ = fs::remove_file(&self.path);
  }
}

#[cfg(unix)]
fn try_flock(file: &File, shared: bool) -> io::Result<bool> {
  use std::os::unix::io::AsRawFd;
  let mode = if shared { libc::LOCK_SH } else { libc::LOCK_EX };
  // SAFETY: the descriptor is owned by `file`, which outlives the call; flock touches no memory of ours.
  let r = unsafe { libc::flock(file.as_raw_fd(), mode | libc::LOCK_NB) };
  if r == 0 {
    return Ok(true);
  }
  let e = io::Error::last_os_error();
  if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
    Ok(false)
  } else {
    Err(e)
  }
}

#[cfg(not(unix))]
fn try_flock(_file: &File, _shared: bool) -> io::Result<bool> {
  Err(io::Error::from(io::ErrorKind::Unsupported))
}

fn lock_unsupported(e: &io::Error) -> bool {
  #[cfg(unix)]
  {
    matches!(e.raw_os_error(), Some(libc::ENOLCK) | Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS))
  }
  #[cfg(not(unix))]
  {
    e.kind() == io::ErrorKind::Unsupported
  }
}

#[cfg(unix)]
fn same_file(file: &File, path: &Path) -> bool {
  use std::os::unix::fs::MetadataExt;
  match (file.metadata(), fs::metadata(path)) {
    (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
    _ => false,
  }
}

#[cfg(not(unix))]
fn same_file(_file: &File, _path: &Path) -> bool {
  true
}

/// Asks the kernel to begin writing `len` bytes at `offset` of `f` to disk now, without waiting (Linux only;
/// advice): a writer that calls it as it goes keeps the disk busy from the start instead of leaving everything to
/// its final fsync.
pub fn start_writeback(f: &File, offset: u64, len: u64) {
  #[cfg(target_os = "linux")]
  {
    use std::os::fd::AsRawFd;
    if let (Ok(off), Ok(n)) = (libc::off64_t::try_from(offset), libc::off64_t::try_from(len)) {
      // SAFETY: plain syscall on a descriptor `f` owns; no memory is passed. Failure only loses the head start.
      unsafe { libc::sync_file_range(f.as_raw_fd(), off, n, libc::SYNC_FILE_RANGE_WRITE) };
    }
  }
  #[cfg(not(target_os = "linux"))]
  let _ = (f, offset, len);
}

/// fsyncs a folder (its entries: renames and removals in it become durable).
pub fn sync_dir(dir: &Path) -> Result<()> {
  #[cfg(unix)]
  {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| Error::io(dir, e))
  }
  #[cfg(not(unix))]
  {
    let _ = dir;
    Ok(())
  }
}

/// `path` made absolute with symlinks resolved as far as it exists (the rest appended as written).
fn real(path: &Path) -> PathBuf {
  let abs = if path.is_absolute() {
    path.to_path_buf()
  } else {
    std::env::current_dir().map(|c| c.join(path)).unwrap_or_else(|_| path.to_path_buf())
  };
  // `..` lexically first, as `path.resolve` does (a missing folder before `..` has no realpath)
  let mut abs_norm = PathBuf::new();
  for c in abs.components() {
    match c {
      Component::ParentDir => {
        abs_norm.pop();
      }
      Component::CurDir => {}
      c => abs_norm.push(c),
    }
  }
  let abs = abs_norm;
  let mut base = abs.clone();
  let mut rest: Vec<std::ffi::OsString> = Vec::new();
  loop {
    if let Ok(r) = fs::canonicalize(&base) {
      let mut out = r;
      for c in rest.iter().rev() {
        if c == ".." {
          out.pop();
        } else if c != "." {
          out.push(c);
        }
      }
      return out;
    }
    match (base.file_name().map(|n| n.to_os_string()), base.parent().map(Path::to_path_buf)) {
      (Some(name), Some(parent)) => {
        rest.push(name);
        base = parent;
      }
      _ => return abs,
    }
  }
}

/// Refuses an output folder that equals, contains or lies inside one of `inputs` (compared after realpath):
/// writing it could overwrite or delete the input.
pub fn check_output_path(out: &Path, inputs: &[PathBuf]) -> Result<()> {
  let o = real(out);
  for input in inputs {
    let i = real(input);
    let relation = if o == i {
      "is"
    } else if o.starts_with(&i) {
      "lies inside"
    } else if i.starts_with(&o) {
      "contains"
    } else {
      continue;
    };
    return Err(Error::OutputOverlapsInput { output: out.to_path_buf(), input: input.clone(), relation });
  }
  Ok(())
}

/// A relative path of plain components only (no `..`, no root): safe to join under a folder.
pub fn is_safe_relative(rel: &str) -> bool {
  !rel.is_empty() && Path::new(rel).components().all(|c| matches!(c, Component::Normal(_)))
}

#[derive(Debug, Serialize, Deserialize)]
struct Journal {
  /// The temporary folder (a name inside the output folder).
  tmp: String,
  /// Files to move from `tmp` into the folder, in order.
  moves: Vec<String>,
  /// Stale files (distcp's earlier output) to remove once the moves are done.
  delete: Vec<String>,
}

/// An output being written: a temporary folder inside the locked output folder.
#[derive(Debug)]
pub struct Staged {
  out: PathBuf,
  tmp_name: String,
  /// The output folder did not exist before: removed again (if empty) when the write is abandoned.
  created_out: bool,
  lock: Option<DirLock>,
  done: bool,
}

/// Prepares writing into the folder `out`: refuses an output that overlaps an input or is not a folder, creates
/// it if needed, takes its lock, finishes an interrupted commit, removes dead writers' leftovers, and makes a
/// fresh temporary folder. Files already in `out` are not touched.
pub fn stage_output(out: &Path, inputs: &[PathBuf]) -> Result<Staged> {
  check_output_path(out, inputs)?;
  let created_out = match fs::symlink_metadata(out) {
    Ok(_) if out.is_dir() => false,
    Ok(_) => return Err(Error::NotADirectory { path: out.to_path_buf() }),
    Err(e) if e.kind() == io::ErrorKind::NotFound => {
      restore_legacy_old(out);
      if out.is_dir() {
        false
      } else {
        fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
        true
      }
    }
    Err(e) => return Err(Error::io(out, e)),
  };
  let lock = match DirLock::acquire(out) {
    Ok(l) => l,
    Err(e) => {
      if created_out {
        let _ = fs::remove_dir(out);
      }
      return Err(e);
    }
  };
  let mut staged =
    Staged { out: out.to_path_buf(), tmp_name: String::new(), created_out, lock: None, done: false };
  let held = lock.held();
  staged.lock = Some(lock);
  recover(out, held)?;
  clean_legacy_siblings(out);
  staged.tmp_name = temp_name(TMP_DIR_PREFIX);
  let tmp = out.join(&staged.tmp_name);
  fs::create_dir(&tmp).map_err(|e| Error::io(&tmp, e))?;
  crash_point("convert:staged");
  Ok(staged)
}

/// Under the lock of `out`: rolls an interrupted commit forward and removes dead writers' temporary folders.
/// Returns how many leftovers were removed or finished.
pub fn recover(out: &Path, lock_held: bool) -> Result<usize> {
  let mut cleaned = 0;
  let journal_path = out.join(JOURNAL);
  if journal_path.is_file() {
    let bytes = fs::read(&journal_path).map_err(|e| Error::io(&journal_path, e))?;
    let journal: Journal = serde_json::from_slice(&bytes).map_err(|e| Error::Metadata {
      path: journal_path.clone(),
      reason: format!("unreadable commit journal ({e}); move it away to continue"),
    })?;
    finish(out, &journal, false)?;
    cleaned += 1;
  }
  let _ = fs::remove_file(out.join(JOURNAL_TMP));
  if let Ok(entries) = fs::read_dir(out) {
    for e in entries.flatten() {
      let name = e.file_name().to_string_lossy().into_owned();
      if name.starts_with(TMP_DIR_PREFIX)
        && (lock_held || writer_is_dead(&name, TMP_DIR_PREFIX))
        && e.file_type().is_ok_and(|t| t.is_dir())
      {
        let _ = fs::remove_dir_all(e.path());
        cleaned += 1;
      }
    }
  }
  Ok(cleaned)
}

/// Moves the journal's files in, removes its stale files, the temporary folder and the journal.
fn finish(out: &Path, j: &Journal, crash_points: bool) -> Result<()> {
  let tmp = out.join(&j.tmp);
  let safe = |rel: &String| is_safe_relative(rel);
  if !is_safe_relative(&j.tmp) || !j.moves.iter().all(safe) || !j.delete.iter().all(safe) {
    return Err(Error::Metadata {
      path: out.join(JOURNAL),
      reason: "commit journal names a path outside the folder".into(),
    });
  }
  let mut dirs = std::collections::BTreeSet::new();
  for (i, rel) in j.moves.iter().enumerate() {
    let from = tmp.join(rel);
    let to = out.join(rel);
    if fs::symlink_metadata(&from).is_err() {
      continue; // moved before the crash
    }
    if let Some(parent) = to.parent() {
      if parent != out {
        fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        dirs.insert(parent.to_path_buf());
      }
    }
    fs::rename(&from, &to).map_err(|e| Error::io(&to, e))?;
    if crash_points && i == 0 {
      crash_point("convert:afterFirstMove");
    }
  }
  for rel in &j.delete {
    let path = out.join(rel);
    if fs::symlink_metadata(&path).is_ok_and(|m| m.is_file()) {
      fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
    }
  }
  for d in &dirs {
    sync_dir(d)?;
  }
  sync_dir(out)?;
  if crash_points {
    crash_point("convert:beforeCleanup");
  }
  if tmp.exists() {
    fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
  }
  fs::remove_file(out.join(JOURNAL)).map_err(|e| Error::io(out.join(JOURNAL), e))?;
  sync_dir(out)
}

impl Staged {
  /// The temporary folder to write the new files into.
  pub fn tmp_dir(&self) -> PathBuf {
    self.out.join(&self.tmp_name)
  }

  pub fn out(&self) -> &Path {
    &self.out
  }

  /// Every file in the temporary folder, as relative paths (`/`-separated), sorted.
  pub fn staged_files(&self) -> Result<Vec<String>> {
    let mut files = Vec::new();
    let mut stack = vec![(self.tmp_dir(), String::new())];
    while let Some((dir, prefix)) = stack.pop() {
      for e in fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))? {
        let e = e.map_err(|e| Error::io(&dir, e))?;
        let name = e.file_name().to_string_lossy().into_owned();
        let rel = if prefix.is_empty() { name } else { format!("{prefix}/{name}") };
        if e.file_type().map_err(|err| Error::io(e.path(), err))?.is_dir() {
          stack.push((e.path(), rel));
        } else {
          files.push(rel);
        }
      }
    }
    files.sort();
    Ok(files)
  }

  /// Moves every staged file into the output folder (those in `last` after all others, in that order), then
  /// removes `stale` (files of an earlier output, regular files only), crash-safely through the journal.
  pub fn commit(mut self, last: &[&str], stale: &[String]) -> Result<()> {
    let files = self.staged_files()?;
    let mut moves: Vec<String> = files.iter().filter(|f| !last.contains(&f.as_str())).cloned().collect();
    moves.extend(last.iter().filter(|l| files.iter().any(|f| f == *l)).map(|l| (*l).to_owned()));
    for rel in &moves {
      let to = self.out.join(rel);
      if fs::symlink_metadata(&to).is_ok_and(|m| m.is_dir()) {
        return Err(Error::io(
          to,
          io::Error::other("a folder is in the way of an output file; nothing was replaced"),
        ));
      }
    }
    let stale: Vec<String> = stale.iter().filter(|s| !moves.contains(s)).cloned().collect();
    let journal = Journal { tmp: self.tmp_name.clone(), moves, delete: stale };
    let bytes = serde_json::to_vec(&journal).map_err(|e| Error::io(&self.out, io::Error::other(e)))?;
    let jtmp = self.out.join(JOURNAL_TMP);
    let mut f = File::create(&jtmp).map_err(|e| Error::io(&jtmp, e))?;
    f.write_all(&bytes).and_then(|_| f.sync_all()).map_err(|e| Error::io(&jtmp, e))?;
    drop(f);
    crash_point("convert:beforeJournal");
    fs::rename(&jtmp, self.out.join(JOURNAL)).map_err(|e| Error::io(self.out.join(JOURNAL), e))?;
    sync_dir(&self.out)?;
    crash_point("convert:afterJournal");
    // from here on the new output is decided: a failure leaves the journal for the next writer to finish
    self.done = true;
    finish(&self.out, &journal, true)?;
    crash_point("convert:afterCommit");
    self.lock = None;
    Ok(())
  }

  /// Abandons the write: removes the temporary folder, and the output folder if this write created it and it is
  /// empty again. Nothing else is touched.
  pub fn abort(&mut self) {
    if self.done {
      return;
    }
    self.done = true;
    if !self.tmp_name.is_empty() {
      let _ = fs::remove_dir_all(self.tmp_dir());
    }
    self.lock = None;
    if self.created_out {
      let _ = fs::remove_dir(&self.out);
    }
  }
}

impl Drop for Staged {
  fn drop(&mut self) {
    self.abort();
  }
}

/// Legacy layout (distcp before the journal): `.X.distcp-old-<pid>-<hex>` beside `X` is the previous output,
/// moved aside by a run killed before its new output took its place. With `X` absent it is moved back.
fn restore_legacy_old(out: &Path) {
  for (name, path) in legacy_siblings(out, "old") {
    if legacy_writer_is_dead(&name, &legacy_prefix(out, "old")) && fs::rename(&path, out).is_ok() {
      return;
    }
  }
}

/// Legacy names carry `<pid>-<random>` (no boot id): dead when no such process runs.
fn legacy_writer_is_dead(name: &str, prefix: &str) -> bool {
  name
    .strip_prefix(prefix)
    .and_then(|r| r.split('-').next())
    .and_then(|p| p.parse::<i32>().ok())
    .is_some_and(|pid| !pid_alive(pid))
}

fn legacy_prefix(out: &Path, kind: &str) -> String {
  let base = out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
  format!(".{base}.distcp-{kind}-")
}

fn legacy_siblings(out: &Path, kind: &str) -> Vec<(String, PathBuf)> {
  let prefix = legacy_prefix(out, kind);
  let Some(parent) = out.parent().map(|p| if p.as_os_str().is_empty() { Path::new(".") } else { p }) else {
    return vec![];
  };
  let Ok(entries) = fs::read_dir(parent) else { return vec![] };
  entries
    .flatten()
    .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
    .filter(|(n, _)| n.starts_with(&prefix))
    .collect()
}

/// Legacy leftovers of dead runs beside a present output: a temporary folder (an unfinished output) and an old
/// folder whose run had already put its new output in place (that run was about to remove it).
fn clean_legacy_siblings(out: &Path) {
  for kind in ["tmp", "old"] {
    let prefix = legacy_prefix(out, kind);
    for (name, path) in legacy_siblings(out, kind) {
      if legacy_writer_is_dead(&name, &prefix) && path.is_dir() {
        let _ = fs::remove_dir_all(&path);
      }
    }
  }
}

#[cfg(test)]
mod tests {
  use super::*;

  fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("distcp-commit-{name}-{}", random_hex()));
    let _ = fs::remove_dir_all(&d);
    fs::create_dir_all(&d).unwrap();
    d
  }

  fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
      fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
  }

  #[test]
  fn a_second_lock_fails_with_the_holders_pid_and_the_file_goes_with_the_lock() {
    let d = tmpdir("lock");
    let a = DirLock::acquire(&d).unwrap();
    assert!(a.held());
    let e = DirLock::acquire(&d).unwrap_err();
    assert_eq!(e.code(), "ERR_DISTCP_LOCKED");
    assert!(e.to_string().contains(&format!("pid {}", std::process::id())), "{e}");
    assert!(e.to_string().contains(&d.display().to_string()), "{e}");
    drop(a);
    assert_eq!(listing(&d), Vec::<String>::new());
    let b = DirLock::acquire(&d).unwrap();
    drop(b);
    fs::remove_dir_all(&d).unwrap();
  }

  #[test]
  fn shared_holders_exclude_exclusive_writers_and_the_last_one_removes_the_file() {
    let d = tmpdir("shared");
    let a = DirLock::acquire_shared(&d).unwrap();
    let b = DirLock::acquire_shared(&d).unwrap();
    assert_eq!(DirLock::acquire(&d).unwrap_err().code(), "ERR_DISTCP_LOCKED");
    drop(a);
    assert_eq!(listing(&d), [LOCK_FILE], "b still holds it");
    assert_eq!(DirLock::acquire(&d).unwrap_err().code(), "ERR_DISTCP_LOCKED");
    drop(b);
    assert_eq!(listing(&d), Vec::<String>::new());
    let x = DirLock::acquire(&d).unwrap();
    assert_eq!(DirLock::acquire_shared(&d).unwrap_err().code(), "ERR_DISTCP_LOCKED");
    drop(x);
    let r = DirLock::acquire_named(&d, ".distcp-rank-1.lock").unwrap();
    assert_eq!(DirLock::acquire_named(&d, ".distcp-rank-1.lock").unwrap_err().code(), "ERR_DISTCP_LOCKED");
    let s = DirLock::acquire_shared(&d).unwrap();
    drop((r, s));
    assert_eq!(listing(&d), Vec::<String>::new());
    fs::remove_dir_all(&d).unwrap();
  }

  #[test]
  fn overlapping_outputs_are_refused() {
    let d = tmpdir("overlap");
    let input = d.join("x").join("dcp");
    fs::create_dir_all(&input).unwrap();
    for (out, rel) in [(d.join("x"), "contains"), (input.clone(), "is"), (input.join("a/b"), "lies inside")] {
      let e = check_output_path(&out, std::slice::from_ref(&input)).unwrap_err();
      assert_eq!(e.code(), "ERR_DISTCP_OUTPUT_OVERLAPS_INPUT");
      assert!(e.to_string().contains(rel), "{e}");
    }
    // through a symlink and `..` too
    std::os::unix::fs::symlink(d.join("x"), d.join("link")).unwrap();
    assert!(check_output_path(&d.join("link"), std::slice::from_ref(&input)).is_err());
    assert!(check_output_path(&d.join("y/../x/dcp/z"), std::slice::from_ref(&input)).is_err());
    check_output_path(&d.join("x/hf"), &[input]).unwrap();
    fs::remove_dir_all(&d).unwrap();
  }

  fn stage_with(out: &Path, files: &[(&str, &str)]) -> Staged {
    let s = stage_output(out, &[]).unwrap();
    for (rel, body) in files {
      let p = s.tmp_dir().join(rel);
      fs::create_dir_all(p.parent().unwrap()).unwrap();
      fs::write(p, body).unwrap();
    }
    s
  }

  #[test]
  fn a_commit_replaces_only_its_files_and_keeps_the_users() {
    let d = tmpdir("keep");
    let out = d.join("hf");
    fs::create_dir_all(out.join("data")).unwrap();
    fs::write(out.join("thesis.tex"), "mine").unwrap();
    fs::write(out.join("data/x.csv"), "1,2").unwrap();
    fs::write(out.join("old-shard"), "old").unwrap();
    fs::write(out.join("config.json"), "old").unwrap();
    let s = stage_with(&out, &[("config.json", "new"), ("w", "W"), ("tok/a", "A")]);
    s.commit(&["config.json"], &["old-shard".into(), "thesis-missing".into()]).unwrap();
    assert_eq!(listing(&out), ["config.json", "data", "thesis.tex", "tok", "w"]);
    assert_eq!(fs::read_to_string(out.join("thesis.tex")).unwrap(), "mine");
    assert_eq!(fs::read_to_string(out.join("data/x.csv")).unwrap(), "1,2");
    assert_eq!(fs::read_to_string(out.join("config.json")).unwrap(), "new");
    assert_eq!(fs::read_to_string(out.join("tok/a")).unwrap(), "A");
    fs::remove_dir_all(&d).unwrap();
  }

  #[test]
  fn an_abandoned_write_leaves_nothing_and_a_file_is_refused() {
    let d = tmpdir("abandon");
    let out = d.join("hf");
    let mut s = stage_with(&out, &[("w", "W")]);
    s.abort();
    assert_eq!(listing(&d), Vec::<String>::new());
    fs::write(&out, "a file").unwrap();
    assert_eq!(stage_output(&out, &[]).unwrap_err().code(), "ERR_DISTCP_NOT_A_DIRECTORY");
    assert_eq!(fs::read_to_string(&out).unwrap(), "a file");
    fs::remove_dir_all(&d).unwrap();
  }

  #[test]
  fn an_interrupted_commit_is_rolled_forward_and_dead_leftovers_go() {
    let d = tmpdir("recover");
    let out = d.join("hf");
    fs::create_dir_all(&out).unwrap();
    fs::write(out.join("mine"), "mine").unwrap();
    fs::write(out.join("stale"), "old").unwrap();
    fs::write(out.join("w"), "old w").unwrap();
    // a crash after the journal and the first move: half the files are in, the journal says what is left
    let s = stage_with(&out, &[("w", "W"), ("z", "Z")]);
    let tmp = s.tmp_dir();
    let name = tmp.file_name().unwrap().to_string_lossy().into_owned();
    let j = Journal { tmp: name, moves: vec!["w".into(), "z".into()], delete: vec!["stale".into()] };
    fs::write(out.join(JOURNAL), serde_json::to_vec(&j).unwrap()).unwrap();
    fs::rename(tmp.join("w"), out.join("w")).unwrap();
    std::mem::forget(s); // the writer "dies": no abort, no unlock-by-drop
    fs::remove_file(out.join(LOCK_FILE)).unwrap();
    // a dead writer's temporary folder (another boot) too
    fs::create_dir(out.join(format!("{TMP_DIR_PREFIX}1-ffffffff-00"))).unwrap();
    let held = DirLock::acquire(&out).unwrap();
    assert_eq!(recover(&out, true).unwrap(), 2);
    drop(held);
    assert_eq!(listing(&out), ["mine", "w", "z"]);
    assert_eq!(fs::read_to_string(out.join("w")).unwrap(), "W");
    assert_eq!(fs::read_to_string(out.join("z")).unwrap(), "Z");
    fs::remove_dir_all(&d).unwrap();
  }

  #[test]
  fn dead_and_live_writers_are_told_apart() {
    let me = temp_name(TMP_DIR_PREFIX);
    assert!(!writer_is_dead(&me, TMP_DIR_PREFIX));
    assert!(writer_is_dead(&format!("{TMP_DIR_PREFIX}{}-00000000-ab", std::process::id()), TMP_DIR_PREFIX));
    assert!(!writer_is_dead(".distcp-tmp-garbage", TMP_DIR_PREFIX));
  }

  #[test]
  fn a_legacy_old_folder_is_restored_when_the_output_is_missing() {
    let d = tmpdir("legacy");
    let out = d.join("hf");
    let old = d.join(".hf.distcp-old-999999999-ab12");
    fs::create_dir_all(&old).unwrap();
    fs::write(old.join("model.safetensors"), "old").unwrap();
    let s = stage_output(&out, &[]).unwrap();
    drop(s);
    assert_eq!(listing(&d), ["hf"]);
    assert_eq!(fs::read_to_string(out.join("model.safetensors")).unwrap(), "old");
    fs::remove_dir_all(&d).unwrap();
  }
}
