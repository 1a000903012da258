#![no_main]
use distcp_fuzz::take;
use libfuzzer_sys::fuzz_target;
use std::path::PathBuf;

// A whole checkpoint folder from one input: `[u32 LE m][m bytes of .metadata][u32 LE n][n bytes of __0_0.distcp]
// [the rest: __1_0.distcp]`. Opening it and reading every key (tensors whole and as a box, values) must end in Ok
// or a coded error: no panic, no overflow, no allocation beyond what the files can hold (libFuzzer's
// -rss_limit_mb catches that), no hang.

fuzz_target!(|input: &[u8]| {
  let dir =
    PathBuf::from(std::env::temp_dir()).join(format!("distcp-fuzz-checkpoint-{}", std::process::id()));
  let _ = std::fs::create_dir_all(&dir);
  let mut data = input;
  let metadata = take(&mut data);
  let rank0 = take(&mut data);
  for (name, bytes) in [(".metadata", metadata), ("__0_0.distcp", rank0), ("__1_0.distcp", data)] {
    if std::fs::write(dir.join(name), bytes).is_err() {
      return;
    }
  }
  let Ok(ck) = distcp_core::Checkpoint::open(&dir, None) else { return };
  let keys: Vec<String> = ck.keys().map(str::to_owned).collect();
  for key in keys {
    if let Ok(t) = ck.tensor(&key) {
      let _ = ck.read_tensor(&key);
      // a box: the first element of every dimension
      if !t.size.iter().any(|&d| d == 0) {
        let region =
          distcp_core::plan::Region { offsets: vec![0; t.size.len()], sizes: vec![1; t.size.len()] };
        let mut one = vec![0u8; t.dtype().size()];
        let _ = ck.read_into(&key, &region, &mut one);
      }
    } else {
      let _ = ck.read_object(&key);
    }
  }
});
