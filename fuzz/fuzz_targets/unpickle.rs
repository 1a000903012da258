#![no_main]
use libfuzzer_sys::fuzz_target;

// Any bytes: the unpickler may refuse, never panic, loop or blow up memory.
fuzz_target!(|data: &[u8]| {
  let _ = distcp_core::pickle::unpickle(data, &|_: &str, _: &str| true);
});
