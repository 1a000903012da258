//! One error type for the whole core. Every variant says which file (and, where there is one, which key) the
//! problem was found in, because a user facing a multi-GB checkpoint needs to know where to look.

use std::path::PathBuf;

/// `Result` with this crate's [`Error`] as the default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in distcp-core; [`Error::code`] gives a stable name per variant.
///
/// Fields are named for what they hold (`path`, `checkpoint`, `key`, `reason`, byte counts) and all appear in the
/// `Display` message, so they carry no docs of their own.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)]
pub enum Error {
  /// An operating-system I/O error on a file or folder of the checkpoint.
  #[error("{path}: {source}")]
  Io {
    path: PathBuf,
    #[source]
    source: std::io::Error,
  },

  /// The folder has no `.metadata`, so it is not a DCP checkpoint.
  #[error("{path}: no DCP checkpoint here (looked for .metadata{rank_hint})")]
  NoCheckpoint { path: PathBuf, rank_hint: String },

  /// `.metadata` or a stored object is not a pickle the restricted unpickler can read.
  #[error("{path}: not a valid pickle: {reason} (at byte {pos})")]
  Pickle { path: PathBuf, pos: usize, reason: String },

  /// A pickle names a class outside the allow-list; distcp never runs code from a checkpoint.
  #[error("{path}: refusing to unpickle global `{module}.{name}`: it is not one of the classes a DCP checkpoint uses, and distcp never runs code from a checkpoint")]
  ForbiddenGlobal { path: PathBuf, module: String, name: String },

  /// `.metadata` unpickled but does not have the shape torch writes.
  #[error("{path}: unexpected content in .metadata: {reason}")]
  Metadata { path: PathBuf, reason: String },

  /// A stored `torch.save` item does not have the shape torch writes.
  #[error("{path}: key `{key}`: {reason}")]
  Record { path: PathBuf, key: String, reason: String },

  /// An item's byte range in its data file lies past the end of the file.
  #[error("{path}: key `{key}`: bytes {offset}..{end} lie past the end of the file ({file_len} bytes)")]
  OutOfBounds { path: PathBuf, key: String, offset: u64, end: u64, file_len: u64 },

  /// A `torch.save` zip entry is compressed, which torch never does for DCP items.
  #[error("{path}: key `{key}`: zip entry `{entry}` is compressed (method {method}); torch.save records must be stored")]
  CompressedEntry { path: PathBuf, key: String, entry: String, method: u16 },

  /// A data file path in `.metadata` points outside the checkpoint folder.
  #[error("{checkpoint}: key `{key}`: relative_path `{relative_path}` escapes the checkpoint folder")]
  UnsafePath { checkpoint: PathBuf, key: String, relative_path: String },

  /// A data file named in `.metadata` does not exist.
  #[error("{checkpoint}: key `{key}`: data file `{relative_path}` is missing")]
  MissingDataFile { checkpoint: PathBuf, key: String, relative_path: String },

  /// The requested key is not in the checkpoint.
  #[error("{checkpoint}: no key `{key}` in the checkpoint")]
  NoSuchKey { checkpoint: PathBuf, key: String },

  /// A read request does not fit the tensor (box out of range, buffer of the wrong size, wrong kind of item).
  #[error("{checkpoint}: key `{key}`: {reason}")]
  BadRequest { checkpoint: PathBuf, key: String, reason: String },

  /// The caller stopped the operation (for example through a convert job's abort flag).
  #[error("stopped: {what} was aborted")]
  Aborted { what: String },

  /// The checkpoint uses a feature distcp does not implement for this operation.
  #[error("{checkpoint}: key `{key}`: {reason}")]
  Unsupported { checkpoint: PathBuf, key: String, reason: String },

  /// A value that cannot be saved (bad tensor, unsupported key, duplicate flat key, ...).
  #[error("{checkpoint}: cannot save key `{key}`: {reason}")]
  InvalidInput { checkpoint: PathBuf, key: String, reason: String },

  /// The save or convert target exists and is not a folder.
  #[error("{path}: exists and is not a directory (a checkpoint is a folder)")]
  NotADirectory { path: PathBuf },

  /// Another process holds the folder's lock (`.distcp.lock`): it is saving or converting into it right now.
  #[error("{path}: another distcp process is writing into this folder{}; nothing was written (try again when it is done)", holder(.pid))]
  Locked { path: PathBuf, pid: Option<u32> },

  /// An output folder that is, contains, or lies inside the input: writing it could destroy the input.
  #[error(
    "{output}: the output {relation} the input {input}; choose a folder outside it (nothing was written)"
  )]
  OutputOverlapsInput { output: PathBuf, input: PathBuf, relation: &'static str },

  // --- read layer: sizes, limits, files (keep together; appended after the variants above) ---
  /// A size computed from input (elements, bytes, offsets) does not fit in 64 bits.
  #[error("{path}: key `{key}`: {what} overflows 64 bits")]
  SizeOverflow { path: PathBuf, key: String, what: String },

  /// Input asks for more than one of the named limits in `limits.rs` allows.
  #[error("{path}: {what} is {value} bytes, over distcp's limit of {limit} ({limit_name})")]
  LimitExceeded { path: PathBuf, what: String, value: u64, limit: u64, limit_name: &'static str },

  /// A FIFO, device, socket or folder where a regular file must be.
  #[error("{path}: is a {kind}, not a regular file")]
  NotARegularFile { path: PathBuf, kind: &'static str },

  /// The file ended before the bytes `.metadata` promised: it was truncated or rewritten while open.
  #[error("{path}: key `{key}`: expected {expected} bytes at offset {offset}, the file ended after {got} (was it changed while open?)")]
  ShortRead { path: PathBuf, key: String, offset: u64, expected: u64, got: u64 },

  /// A zstd-compressed item decompresses to more than `.metadata` implies, or is not valid zstd.
  #[error("{path}: key `{key}`: {reason}")]
  Decompress { path: PathBuf, key: String, reason: String },

  /// `.metadata` describes chunks that are outside their tensor, overlap, or leave a gap.
  #[error("{path}: key `{key}`: {reason}")]
  ChunkLayout { path: PathBuf, key: String, reason: String },

  /// Memory for a result could not be reserved.
  #[error("{path}: key `{key}`: cannot allocate {bytes} bytes")]
  OutOfMemory { path: PathBuf, key: String, bytes: u64 },

  // --- layouts (safetensors-based checkpoints; appended) ---
  /// A safetensors header that is not what the format allows or what the rest of the checkpoint says.
  #[error("{path}: bad safetensors header: {reason}")]
  SafetensorsHeader { path: PathBuf, reason: String },

  // --- multi-rank (appended) ---
  /// A rank-local save (torch's `use_collectives=False`) into a folder holding a global `.metadata`: readers take
  /// `.metadata` first, so the rank-local files would never be loaded.
  #[error("{path}: holds a checkpoint saved with collectives (.metadata), which readers load instead of rank-local __{{rank}}.metadata files: save without collectives into another folder, or with collectives (nothing was written)")]
  GlobalMetadataPresent { path: PathBuf },
}

fn holder(pid: &Option<u32>) -> String {
  pid.map_or_else(String::new, |p| format!(" (pid {p})"))
}

impl Error {
  /// An [`Error::Io`] for `path`, for `map_err` on `std::io` calls.
  pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
    Error::Io { path: path.into(), source }
  }

  /// A short, stable name for the kind of error, used as the `code` of the JS error.
  pub fn code(&self) -> &'static str {
    match self {
      Error::Io { .. } => "ERR_DISTCP_IO",
      Error::NoCheckpoint { .. } => "ERR_DISTCP_NO_CHECKPOINT",
      Error::Pickle { .. } => "ERR_DISTCP_PICKLE",
      Error::ForbiddenGlobal { .. } => "ERR_DISTCP_FORBIDDEN_GLOBAL",
      Error::Metadata { .. } => "ERR_DISTCP_METADATA",
      Error::Record { .. } => "ERR_DISTCP_RECORD",
      Error::OutOfBounds { .. } => "ERR_DISTCP_OUT_OF_BOUNDS",
      Error::CompressedEntry { .. } => "ERR_DISTCP_COMPRESSED_ENTRY",
      Error::UnsafePath { .. } => "ERR_DISTCP_UNSAFE_PATH",
      Error::MissingDataFile { .. } => "ERR_DISTCP_MISSING_DATA_FILE",
      Error::NoSuchKey { .. } => "ERR_DISTCP_NO_SUCH_KEY",
      Error::BadRequest { .. } => "ERR_DISTCP_BAD_REQUEST",
      Error::Unsupported { .. } => "ERR_DISTCP_UNSUPPORTED",
      Error::InvalidInput { .. } => "ERR_DISTCP_INVALID_INPUT",
      Error::NotADirectory { .. } => "ERR_DISTCP_NOT_A_DIRECTORY",
      Error::Aborted { .. } => "ERR_DISTCP_ABORTED",
      Error::Locked { .. } => "ERR_DISTCP_LOCKED",
      Error::OutputOverlapsInput { .. } => "ERR_DISTCP_OUTPUT_OVERLAPS_INPUT",
      Error::SizeOverflow { .. } => "ERR_DISTCP_SIZE_OVERFLOW",
      Error::LimitExceeded { .. } => "ERR_DISTCP_LIMIT_EXCEEDED",
      Error::NotARegularFile { .. } => "ERR_DISTCP_NOT_A_FILE",
      Error::ShortRead { .. } => "ERR_DISTCP_SHORT_READ",
      Error::Decompress { .. } => "ERR_DISTCP_DECOMPRESS",
      Error::ChunkLayout { .. } => "ERR_DISTCP_CHUNK_LAYOUT",
      Error::OutOfMemory { .. } => "ERR_DISTCP_OUT_OF_MEMORY",
      Error::SafetensorsHeader { .. } => "ERR_DISTCP_SAFETENSORS_HEADER",
      Error::GlobalMetadataPresent { .. } => "ERR_DISTCP_GLOBAL_METADATA",
    }
  }
}
