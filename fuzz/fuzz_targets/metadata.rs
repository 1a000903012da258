#![no_main]
use libfuzzer_sys::fuzz_target;

// Any bytes as a .metadata file: a typed Metadata or an error.
fuzz_target!(|data: &[u8]| {
  let _ = distcp_core::metadata::Metadata::parse(data, std::path::Path::new("fuzz.metadata"));
});
