#![no_main]
use libfuzzer_sys::fuzz_target;

// Any bytes as one .distcp record: the zip reader and record rebuild must stay inside the buffer. When a tensor
// record parses, its storage range and view must be readable without panicking.
fuzz_target!(|data: &[u8]| {
  if let Ok(distcp_core::torch_save::PyObject::Record(rec)) = distcp_core::torch_save::parse(data) {
    let storage = &data[rec.storage.clone()];
    let n: u64 = rec.shape.iter().product();
    if n > 0 && n < 1 << 20 {
      let mut dst = vec![0u8; n as usize * rec.dtype.size()];
      let read = distcp_core::plan::ChunkRead {
        chunk: 0,
        src_start: vec![0; rec.shape.len()],
        dst_start: vec![0; rec.shape.len()],
        lengths: rec.shape.clone(),
      };
      let _ = distcp_core::copy::copy_chunk(
        storage,
        &rec.layout(),
        rec.fixup().as_ref(),
        &read,
        &mut dst,
        &rec.shape,
      );
    }
  }
});
