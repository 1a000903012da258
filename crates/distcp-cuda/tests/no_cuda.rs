//! Without CUDA (CI machines) every entry point reports why, with a code; a panic in the CUDA layer comes back as a
//! coded error. One test function: the panic hook is process-wide.

use distcp_core::plan::Region;
use distcp_core::Checkpoint;
use distcp_cuda::{
  cuda_info, inject_panic_for_test, read_into_device, read_to_device, CudaReader, ReaderOptions,
};
use std::path::Path;

#[test]
fn no_cuda_is_a_coded_error_and_panics_are_caught() {
  let ck =
    Checkpoint::open(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/tiny-llama/dcp"), None)
      .unwrap();
  let key = "model.model.embed_tokens.weight";
  let whole = Region::whole(&ck.tensor(key).unwrap().size);
  let info = cuda_info();
  if !info.available {
    let reason = info.reason.clone().unwrap();
    assert!(reason.starts_with("no CUDA: "), "{reason}");
    for e in [
      CudaReader::new(0, ReaderOptions::default()).err().unwrap(),
      read_to_device(&ck, key, &whole, 0, None).err().unwrap(),
      read_into_device(&ck, key, &whole, 0, 1 << 40, 64 * 320 * 4, None).unwrap_err(),
    ] {
      assert_eq!(e.code(), "ERR_DISTCP_NO_CUDA", "{e}");
      assert_eq!(e.to_string(), reason);
    }
  }
  // a bad box is reported as such, before any device work
  let bad = Region { offsets: vec![0, 0], sizes: vec![9999, 1] };
  assert_eq!(read_to_device(&ck, key, &bad, 0, None).err().unwrap().code(), "ERR_DISTCP_BAD_REQUEST");

  inject_panic_for_test(true);
  let e = read_to_device(&ck, key, &whole, 0, None).err().unwrap();
  let during = cuda_info();
  inject_panic_for_test(false);
  assert_eq!(e.code(), "ERR_DISTCP_INTERNAL", "{e}");
  assert!(e.to_string().contains("panic injected by the test hook"), "{e}");
  assert!(!during.available);
  assert!(during.reason.unwrap().contains("panic injected"));
  assert_eq!(cuda_info().available, info.available);
}
