//! Every limit distcp applies to what it reads, in one place. Each size a file declares is checked against one of
//! these (and against what the files can actually hold) before anything is allocated or looped over.

/// Deepest nesting of values accepted anywhere: the unpickler, rebuilding `torch.save` values, and the writer (so
/// that whatever distcp saves, it can read back). Real checkpoints need fewer than 20 levels; each costs stack.
pub const MAX_NESTING: usize = 100;

/// Largest `.metadata` file read. Real ones reach hundreds of MB (millions of chunks); past this the file is
/// refused with a message naming the limit instead of being read into memory.
pub const MAX_METADATA_BYTES: u64 = 2 << 30;

/// Unpickling may use at most this many bytes of memory per byte of pickle, plus [`UNPICKLE_BASE_BYTES`]: the VM's
/// objects and the materialised value tree together. Measured peak heap (tests/unpickle_memory.rs, which also
/// counts the parsed `Metadata`): torch-written `.metadata` files 8-13 bytes per byte; one-opcode floods at most
/// 20 in the VM; a stream built to expand (memo references to big strings, containers gathered into one value) is
/// stopped here.
pub const UNPICKLE_BYTES_PER_INPUT_BYTE: usize = 32;

/// The fixed part of the unpickling memory budget (small pickles hold a few fixed-size objects).
pub const UNPICKLE_BASE_BYTES: usize = 1 << 20;

/// Memory one unpickling may use, for a pickle of `len` bytes.
pub fn unpickle_budget(len: usize) -> usize {
  len.saturating_mul(UNPICKLE_BYTES_PER_INPUT_BYTE).saturating_add(UNPICKLE_BASE_BYTES)
}

/// Largest Python int read (bytes of its two's complement, a pickle's `LONG4`). An int crosses to JavaScript as
/// decimal text, whose conversion takes time quadratic in its length: a 250,000-digit int took 15 s each way, and a
/// `LONG4` may declare gigabytes. (Python itself refuses int/str conversions past 4,300 digits.)
pub const MAX_INT_BYTES: usize = 8 << 10;

/// Most decimal digits of an int saved: every int of this many digits fits in [`MAX_INT_BYTES`] (10^d < 2^(3.33 d),
/// and 8 bits per byte × 0.3 digits per bit stays below), so whatever is saved reads back.
pub const MAX_INT_DIGITS: usize = MAX_INT_BYTES * 8 * 3 / 10 - 1;

/// Most dimensions a tensor may have (torch itself supports up to 64 in practice).
pub const MAX_DIMS: usize = 64;

/// Largest non-tensor item (after zstd decompression), and the most bytes of tensors materialised out of one
/// non-tensor value (an `expand`ed tensor stores one element but reads back as all of them).
pub const MAX_OBJECT_BYTES: u64 = 1 << 30;

/// Bytes a compressed tensor record may hold beyond its tensor's bytes: `data.pkl`, the zip headers and the
/// alignment padding torch adds. Decompression stops at tensor bytes + this.
pub const ARCHIVE_OVERHEAD_BYTES: u64 = 1 << 20;

/// Distinct `data.pkl`s of tensor records whose unpickled value an open checkpoint keeps, and the largest one
/// kept. Records of same-shaped tensors carry byte-identical `data.pkl`s (dtype, shape, strides: all that differs
/// between them is where the archive sits), so a checkpoint of thousands of experts unpickles a handful; the first
/// this many are kept, at most this many bytes each, and any others are unpickled every time.
pub const RECORD_PICKLE_MEMO_ENTRIES: usize = 256;
/// See [`RECORD_PICKLE_MEMO_ENTRIES`].
pub const RECORD_PICKLE_MEMO_BYTES: usize = 4096;

/// Largest decompressed item of any kind (a tensor chunk larger than this is refused when compressed).
pub const MAX_DECOMPRESSED_BYTES: u64 = 64 << 30;

/// Decompressed items kept in memory per open checkpoint (least recently resolved dropped first), so repeated
/// box reads of a compressed tensor decompress it once without a whole compressed checkpoint piling up.
pub const RESOLVED_MEMORY_CACHE_BYTES: u64 = 1 << 30;

/// Pairwise chunk comparisons spent checking that a tensor's chunks do not overlap; a `.metadata` needing more
/// (hundreds of thousands of mutually overlapping-in-dim-0 chunks) is refused.
pub const MAX_CHUNK_COMPARISONS: u64 = 1 << 28;

/// Scratch memory for reading a strided (e.g. transposed) chunk whose rows are visited out of file order: its
/// whole source extent is read at once, up to this size; beyond it, in row order with bounded windows.
pub const STRIDED_SCRATCH_BYTES: u64 = 1 << 30;

/// Largest safetensors JSON header read: the limit of the `safetensors` library itself (its `MAX_HEADER_SIZE`,
/// 100 MB), so that distcp refuses exactly the headers Python's `safe_open` refuses, before allocating.
pub const MAX_SAFETENSORS_HEADER_BYTES: u64 = 100_000_000;

/// Most `.safetensors` files one folder may contribute to a checkpoint (each is opened and its header read at
/// open).
pub const MAX_SAFETENSORS_FILES: usize = 100_000;

/// Largest list index a `planner_data` path may name when a state dict is rebuilt from flat keys: torch pads a list
/// with `None` up to each index, so one hostile index would otherwise allocate without bound. Real lists hold one
/// entry per stored item (or per empty dict, which stores none).
pub const MAX_UNFLATTEN_LIST_INDEX: u64 = 1 << 20;

/// A staging copy uses one more thread per this many bytes (below it, starting a thread costs more than it saves).
pub const STAGING_COPY_MIN_BYTES_PER_THREAD: u64 = 16 << 20;

/// Most threads a staging copy uses: past a handful, the copy is bound by memory bandwidth, not by cores.
pub const STAGING_COPY_THREADS_MAX: usize = 8;

/// Number of elements of `sizes`, or `None` when it overflows 64 bits.
pub fn checked_numel(sizes: &[u64]) -> Option<u64> {
  sizes.iter().try_fold(1u64, |acc, &s| acc.checked_mul(s))
}

/// Bytes of a tensor of `sizes` with `elem_size`-byte elements, or `None` when it overflows 64 bits.
pub fn checked_nbytes(sizes: &[u64], elem_size: usize) -> Option<u64> {
  checked_numel(sizes)?.checked_mul(elem_size as u64)
}

#[cfg(test)]
mod tests {
  use super::*;

  #[test]
  fn numel_overflow_is_caught() {
    // the wrapping product of these is 2
    assert_eq!(checked_numel(&[3, 6148914691236517206]), None);
    assert_eq!(3u64.wrapping_mul(6148914691236517206), 2);
    assert_eq!(checked_numel(&[]), Some(1));
    assert_eq!(checked_numel(&[4, 0, u64::MAX]), Some(0));
    assert_eq!(checked_nbytes(&[1 << 62], 4), None);
    assert_eq!(checked_nbytes(&[2, 3], 4), Some(24));
  }
}
