//! Where a chunk's bytes come from, for the staged pipeline. The ONE place that asks the checkpoint about a
//! chunk's storage: the core's resolved chunks (`Checkpoint::resolve_chunk`), resolved once per open checkpoint.

use crate::error::Result;
use distcp_core::exec::StoredLayout;
use distcp_core::source::{DataFile, ResolvedChunk, Source};
use distcp_core::Checkpoint;
use std::sync::Arc;

/// A stored chunk, as the pipeline reads it.
pub enum ChunkSource {
  /// Bytes that need no fixup, straight from a data file: read with `pread` into staging, placed by 2-D copies.
  File {
    file: Arc<DataFile>,
    /// File offset of storage byte 0.
    base: u64,
    /// Bytes of storage (reads past it are refused).
    storage_len: u64,
    layout: StoredLayout,
  },
  /// Anything else (zstd-decoded, byte-swapped, lazily negated or conjugated): copied by the host executor
  /// (`copy_resolved`, which applies the fixups) into staging.
  Host { chunk: Arc<ResolvedChunk> },
}

/// The source of chunk `chunk` of tensor `key`.
pub fn chunk_source(ck: &Checkpoint, key: &str, chunk: usize) -> Result<ChunkSource> {
  let resolved = ck.resolve_chunk(key, chunk)?;
  match &resolved.source {
    Source::File { file, offset, len } if resolved.fixup.is_none() => Ok(ChunkSource::File {
      file: file.clone(),
      base: *offset,
      storage_len: *len,
      layout: resolved.layout.clone(),
    }),
    _ => Ok(ChunkSource::Host { chunk: resolved }),
  }
}
