//! How many threads the core may use: the one place that decides it. `available_parallelism` fails where there is
//! no parallelism to ask for (wasm32-wasip1, where starting a thread panics), and every threaded path of the core
//! (parallel reads, staging copies, casts, the conversion's helper and writer threads) falls back to the calling
//! thread there.

/// Cores the process may use, 1 where none can be asked for.
pub fn cores() -> usize {
  std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Whether this process can start threads at all (false on wasm32-wasip1).
pub fn can_spawn() -> bool {
  std::thread::available_parallelism().is_ok()
}
