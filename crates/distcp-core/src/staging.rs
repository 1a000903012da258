//! The staging copy of a save: the caller's tensor bytes copied into distcp-owned memory, on several threads.
//!
//! An async save blocks the trainer only for this copy, so its speed is the trainer's wait. One thread's `memcpy`
//! runs at one core's share of the memory bandwidth (about 6 GB/s on the 2-core machine this was measured on, more
//! than 20 GB/s on a many-core host with several threads), so the copy is split into byte ranges of about equal
//! size — a large tensor across several threads, small tensors grouped — and each range is copied on its own
//! thread.

use crate::limits::{STAGING_COPY_MIN_BYTES_PER_THREAD, STAGING_COPY_THREADS_MAX};

/// One copy: `src` into `dst`, which have the same length.
pub type CopyPair<'a> = (&'a [u8], &'a mut [u8]);

/// How many threads a copy of `total` bytes uses when the machine has `cores`: one per
/// [`STAGING_COPY_MIN_BYTES_PER_THREAD`] (spawning costs more than copying less), at most `cores` and
/// [`STAGING_COPY_THREADS_MAX`].
pub fn copy_threads(total: u64, cores: usize) -> usize {
  let by_size = usize::try_from(total / STAGING_COPY_MIN_BYTES_PER_THREAD).unwrap_or(usize::MAX);
  by_size.min(cores).clamp(1, STAGING_COPY_THREADS_MAX)
}

/// Copies every pair's `src` into its `dst`, on up to [`copy_threads`] threads. Returns the number of threads that
/// copied. Where a thread cannot be started (a WASI build, a process at its thread limit) its share is copied on
/// the calling thread.
///
/// Panics if a pair's lengths differ (the caller made both sides from the same sizes).
pub fn copy_many(pairs: Vec<CopyPair<'_>>) -> usize {
  let total: u64 = pairs.iter().map(|(s, _)| s.len() as u64).sum();
  let cores = crate::threads::cores();
  let threads = copy_threads(total, cores);
  for (s, d) in &pairs {
    assert_eq!(s.len(), d.len(), "staging copy: source and destination lengths differ");
  }
  if threads <= 1 {
    for (s, d) in pairs {
      d.copy_from_slice(s);
    }
    return 1;
  }
  // each part sits in a slot that its thread takes it from; a part whose thread could not start is still in its
  // slot afterwards and is copied here
  let slots: Vec<std::sync::Mutex<Option<Vec<CopyPair<'_>>>>> = split(pairs, total.div_ceil(threads as u64))
    .into_iter()
    .map(|p| std::sync::Mutex::new(Some(p)))
    .collect();
  let mut spawned = 0;
  std::thread::scope(|scope| {
    // the calling thread copies the first part itself instead of waiting idle
    for slot in slots.iter().skip(1) {
      let b = std::thread::Builder::new().name("distcp-stage".into());
      if b.spawn_scoped(scope, move || copy_part(take(slot))).is_ok() {
        spawned += 1;
      }
    }
    if let Some(first) = slots.first() {
      copy_part(take(first));
    }
  });
  for slot in &slots {
    copy_part(take(slot));
  }
  spawned + 1
}

/// The part in `slot`, once (a poisoned slot counts as taken: its thread panicked mid-copy and the scope re-raises it).
fn take<'a>(slot: &std::sync::Mutex<Option<Vec<CopyPair<'a>>>>) -> Option<Vec<CopyPair<'a>>> {
  slot.lock().ok().and_then(|mut g| g.take())
}

fn copy_part(part: Option<Vec<CopyPair<'_>>>) {
  for (s, d) in part.into_iter().flatten() {
    d.copy_from_slice(s);
  }
}

/// Cuts the pairs into parts of about `per` bytes each, splitting a pair where a part is full.
fn split(pairs: Vec<CopyPair<'_>>, per: u64) -> Vec<Vec<CopyPair<'_>>> {
  let per = usize::try_from(per.max(1)).unwrap_or(usize::MAX);
  let mut parts = vec![Vec::new()];
  let mut room = per;
  for (mut s, mut d) in pairs {
    while !s.is_empty() {
      if room == 0 {
        parts.push(Vec::new());
        room = per;
      }
      let n = s.len().min(room);
      let (s0, s1) = s.split_at(n);
      let (d0, d1) = d.split_at_mut(n);
      if let Some(p) = parts.last_mut() {
        p.push((s0, d0));
      }
      room -= n;
      s = s1;
      d = d1;
    }
  }
  parts
}

#[cfg(test)]
mod tests {
  use super::*;

  #[test]
  fn thread_count_follows_size_and_cores() {
    let m = STAGING_COPY_MIN_BYTES_PER_THREAD;
    assert_eq!(copy_threads(0, 8), 1);
    assert_eq!(copy_threads(m - 1, 8), 1);
    assert_eq!(copy_threads(3 * m, 8), 3);
    assert_eq!(copy_threads(100 * m, 2), 2);
    assert_eq!(copy_threads(u64::MAX, 1024), STAGING_COPY_THREADS_MAX);
  }

  #[test]
  fn parts_cover_every_byte_once_in_order() {
    let srcs: Vec<Vec<u8>> =
      [0usize, 5, 1, 17, 3].iter().map(|&n| (0..n).map(|i| (n * 31 + i) as u8).collect()).collect();
    let mut dsts: Vec<Vec<u8>> = srcs.iter().map(|s| vec![0u8; s.len()]).collect();
    let pairs: Vec<CopyPair> =
      srcs.iter().zip(dsts.iter_mut()).map(|(s, d)| (s.as_slice(), d.as_mut_slice())).collect();
    let parts = split(pairs, 4);
    assert!(parts.iter().all(|p| p.iter().map(|(s, _)| s.len()).sum::<usize>() <= 4));
    assert_eq!(parts.iter().map(|p| p.iter().map(|(s, _)| s.len()).sum::<usize>()).sum::<usize>(), 26);
    for p in parts {
      copy_part(Some(p));
    }
    assert_eq!(srcs, dsts);
  }

  #[test]
  fn a_large_copy_uses_threads_and_copies_exactly() {
    let m = STAGING_COPY_MIN_BYTES_PER_THREAD as usize;
    let srcs: Vec<Vec<u8>> = vec![
      (0..m + 7).map(|i| (i * 7) as u8).collect(),
      (0..m / 3).map(|i| (i * 13 + 1) as u8).collect(),
      vec![9; 1],
    ];
    let mut dsts: Vec<Vec<u8>> = srcs.iter().map(|s| vec![0u8; s.len()]).collect();
    let pairs: Vec<CopyPair> =
      srcs.iter().zip(dsts.iter_mut()).map(|(s, d)| (s.as_slice(), d.as_mut_slice())).collect();
    let used = copy_many(pairs);
    assert!(used >= 1);
    assert_eq!(srcs, dsts);
  }
}
