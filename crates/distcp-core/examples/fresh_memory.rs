//! What it costs to read a file from the page cache into memory the process has not touched yet, for each way of
//! getting that memory (issue 15 §3; `bench/read` measures the whole `read`). Every variant reads the same file
//! with positional reads on `threads` threads; best of `reps`, the variants' order rotated each round because
//! memory one variant frees is what the next one gets.
//!
//! ```text
//! cargo run --release -p distcp-core --example fresh_memory -- <file> [reps] [threads]
//! ```

#[cfg(target_os = "linux")]
fn main() -> std::process::ExitCode {
  linux::main()
}

#[cfg(not(target_os = "linux"))]
fn main() {
  eprintln!("fresh_memory: Linux only (mmap/madvise variants)");
}

#[cfg(target_os = "linux")]
mod linux {
  use std::fs::File;
  use std::os::fd::AsRawFd;
  use std::os::unix::fs::FileExt;
  use std::process::ExitCode;
  use std::time::Instant;

  const HUGE: usize = 2 << 20;

  /// An anonymous or file mapping, unmapped on drop.
  struct Map {
    ptr: *mut u8,
    len: usize,
  }

  impl Map {
    fn anon(len: usize, flags: libc::c_int) -> std::io::Result<Map> {
      // SAFETY: a fresh private anonymous mapping; no existing memory is affected.
      let p = unsafe {
        libc::mmap(
          std::ptr::null_mut(),
          len,
          libc::PROT_READ | libc::PROT_WRITE,
          libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | flags,
          -1,
          0,
        )
      };
      if p == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
      }
      Ok(Map { ptr: p.cast(), len })
    }

    fn file(f: &File, len: usize) -> std::io::Result<Map> {
      // SAFETY: a fresh private mapping of a file we opened; writes would go to private copies.
      let p = unsafe {
        libc::mmap(
          std::ptr::null_mut(),
          len,
          libc::PROT_READ | libc::PROT_WRITE,
          libc::MAP_PRIVATE,
          f.as_raw_fd(),
          0,
        )
      };
      if p == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
      }
      Ok(Map { ptr: p.cast(), len })
    }

    /// `madvise` on the 2 MiB-aligned middle (huge pages) or on all of it.
    fn advise(&self, advice: libc::c_int, aligned: bool) -> std::io::Result<()> {
      let (mut start, mut end) = (self.ptr as usize, self.ptr as usize + self.len);
      if aligned {
        (start, end) = (start.next_multiple_of(HUGE), end & !(HUGE - 1));
      }
      if end <= start {
        return Ok(());
      }
      // SAFETY: the range lies inside this mapping; these advices never change its contents.
      if unsafe { libc::madvise(start as *mut libc::c_void, end - start, advice) } != 0 {
        return Err(std::io::Error::last_os_error());
      }
      Ok(())
    }

    fn bytes(&mut self) -> &mut [u8] {
      // SAFETY: the mapping is readable and writable, `len` bytes, and only borrowed through `&mut self`.
      unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
  }

  impl Drop for Map {
    fn drop(&mut self) {
      // SAFETY: unmaps exactly what `mmap` returned; nothing borrows it any more.
      unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
  }

  fn pread_all(f: &File, dst: &mut [u8], threads: usize) -> std::io::Result<()> {
    let per = dst.len().div_ceil(threads.max(1)).max(1);
    std::thread::scope(|s| {
      let handles: Vec<_> = dst
        .chunks_mut(per)
        .enumerate()
        .map(|(i, part)| s.spawn(move || f.read_exact_at(part, (i * per) as u64)))
        .collect();
      handles
        .into_iter()
        .try_for_each(|h| h.join().unwrap_or_else(|_| Err(std::io::Error::other("panicked"))))
    })
  }

  const VARIANTS: [&str; 9] = [
    "cat-like: 1 MiB buffer reused",
    "memory already written (read into)",
    "MAP_POPULATE, then pread (distcp's alloc_host)",
    "plain mapping, faulted by pread",
    "MADV_HUGEPAGE, faulted by pread",
    "MADV_HUGEPAGE + MADV_POPULATE_WRITE, then pread",
    "MADV_POPULATE_WRITE on 2 threads, then pread",
    "file mapping + MADV_POPULATE_READ (zero-copy)",
    "file mapping + MADV_POPULATE_WRITE (kernel copies)",
  ];

  /// Seconds for variant `v`; `written` is the memory variant 1 reads into.
  fn run(v: usize, f: &File, len: usize, threads: usize, written: &mut Map) -> std::io::Result<f64> {
    let t0 = Instant::now();
    match v {
      0 => {
        let mut b = vec![0u8; 1 << 20];
        let mut at = 0;
        while at < len {
          let n = f.read_at(&mut b, at as u64)?;
          if n == 0 {
            break;
          }
          at += n;
        }
      }
      1 => pread_all(f, written.bytes(), threads)?,
      2 => pread_all(f, Map::anon(len, libc::MAP_POPULATE)?.bytes(), threads)?,
      3 => pread_all(f, Map::anon(len, 0)?.bytes(), threads)?,
      4 | 5 => {
        let mut m = Map::anon(len, 0)?;
        m.advise(libc::MADV_HUGEPAGE, true)?;
        if v == 5 {
          m.advise(libc::MADV_POPULATE_WRITE, false)?;
        }
        pread_all(f, m.bytes(), threads)?;
      }
      6 => {
        let mut m = Map::anon(len, 0)?;
        let half = (len / 2) & !4095;
        let (lo, hi) = m.bytes().split_at_mut(half);
        std::thread::scope(|s| {
          for part in [lo, hi] {
            // SAFETY: the range is one half of the mapping, which this thread alone touches.
            s.spawn(move || unsafe {
              libc::madvise(part.as_mut_ptr().cast(), part.len(), libc::MADV_POPULATE_WRITE)
            });
          }
        });
        pread_all(f, m.bytes(), threads)?;
      }
      7 => {
        let m = Map::file(f, len)?;
        m.advise(libc::MADV_POPULATE_READ, false)?;
      }
      _ => {
        let m = Map::file(f, len)?;
        m.advise(libc::MADV_POPULATE_WRITE, false)?;
      }
    }
    Ok(t0.elapsed().as_secs_f64())
  }

  pub fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(path) = args.first() else {
      eprintln!("usage: fresh_memory <file> [reps] [threads]");
      return ExitCode::FAILURE;
    };
    let reps: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(5);
    let threads: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(2);
    match measure(path, reps, threads) {
      Ok(()) => ExitCode::SUCCESS,
      Err(e) => {
        eprintln!("fresh_memory: {path}: {e}");
        ExitCode::FAILURE
      }
    }
  }

  fn measure(path: &str, reps: usize, threads: usize) -> std::io::Result<()> {
    let f = File::open(path)?;
    let len = usize::try_from(f.metadata()?.len()).map_err(std::io::Error::other)? & !4095;
    let mut written = Map::anon(len, libc::MAP_POPULATE)?;
    pread_all(&f, written.bytes(), threads)?; // also warms the page cache
    let mut times = vec![Vec::with_capacity(reps); VARIANTS.len()];
    for r in 0..reps {
      for i in 0..VARIANTS.len() {
        let v = (i + r) % VARIANTS.len();
        times[v].push(run(v, &f, len, threads, &mut written)?);
      }
    }
    for t in &mut times {
      t.sort_by(f64::total_cmp);
    }
    // the spread matters as much as the best: fresh huge pages cost anything from nothing to seconds
    let (best, median) = (|v: usize| times[v][0], |v: usize| times[v][times[v].len() / 2]);
    println!(
      "{path}: {:.2} GB, {reps} rounds, {threads} threads; seconds best / median / worst",
      len as f64 / 1e9
    );
    for (v, name) in VARIANTS.iter().enumerate() {
      let worst = times[v].last().copied().unwrap_or(f64::NAN);
      println!(
        "{name:<50} {:>6.3} / {:>6.3} / {worst:>6.3} s  {:>5.2}× cat-like (best)  {:>5.2}× (median)",
        best(v),
        median(v),
        best(0) / best(v),
        median(0) / median(v)
      );
    }
    Ok(())
  }
}
