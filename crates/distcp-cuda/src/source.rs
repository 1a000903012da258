//! Where a chunk's bytes come from, for the staged pipeline. The ONE place that asks the checkpoint about a
//! chunk's storage (today `Checkpoint::chunk_record`; later the core's resolved chunks), so switching the source of
//! truth touches nothing else.

use crate::error::Result;
use distcp_core::checkpoint::Blob;
use distcp_core::exec::StoredLayout;
use distcp_core::torch_save::TensorRecord;
use distcp_core::Checkpoint;
use std::path::PathBuf;

/// A stored chunk, as the pipeline reads it.
pub enum ChunkSource {
  /// Row-major bytes that need no fixup, straight from a file: read with `pread` into staging.
  File {
    path: PathBuf,
    /// File offset of storage byte 0.
    base: u64,
    /// Bytes of storage (reads past it are refused).
    storage_len: u64,
    layout: StoredLayout,
  },
  /// Anything else (zstd-decoded, byte-swapped, lazily negated or conjugated, permuted): copied by the host
  /// executor (`copy_chunk`, which applies the fixups) into staging.
  Host { blob: Blob, rec: TensorRecord },
}

/// The source of chunk `chunk` of tensor `key`.
pub fn chunk_source(ck: &Checkpoint, key: &str, chunk: usize) -> Result<ChunkSource> {
  let (blob, rec) = ck.chunk_record(key, chunk)?;
  let plain = rec.is_row_major() && !rec.big_endian && !rec.conj && !rec.neg;
  match &blob {
    Blob::Mapped { file, range } if plain => Ok(ChunkSource::File {
      path: file.path.clone(),
      base: (range.start + rec.storage.start) as u64,
      storage_len: rec.storage.len() as u64,
      layout: StoredLayout {
        stride: rec.stride.clone(),
        storage_offset: rec.storage_offset,
        elem_size: rec.dtype.size() as u64,
      },
    }),
    _ => Ok(ChunkSource::Host { blob, rec }),
  }
}
