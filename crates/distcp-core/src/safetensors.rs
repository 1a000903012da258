//! The safetensors format, both ways: the header distcp writes (convert) and the headers it reads (HF folders,
//! torch's `HuggingFaceStorageWriter` shards, safetensors-serialized DCP blobs). One owner for its rules: the
//! 8-byte little-endian header length, the JSON header (validated by the `safetensors` crate: offsets contiguous
//! from 0, each tensor's byte range equal to its dtype × shape, no overflow), the 8-byte padding of the header,
//! the dtype names ([`DType::safetensors_name`]), the header size limit
//! ([`limits::MAX_SAFETENSORS_HEADER_BYTES`]) and torch's `__metadata__` keys.
//!
//! A tensor in a safetensors file is plain row-major little-endian bytes at a known byte range: reading one is a
//! [`crate::source::Source::File`] range with a row-major layout; nothing else is needed.

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::limits;
use crate::source::DataFile;
use std::collections::HashMap;
use std::path::Path;

/// Bytes of the little-endian header length that starts every safetensors file.
pub const HEADER_LEN_BYTES: u64 = 8;
/// The header is padded with spaces to a multiple of this, as the safetensors writer does.
pub const HEADER_ALIGN: usize = 8;
/// The header key that holds the file's string metadata rather than a tensor (safetensors' own rule).
pub const METADATA_KEY: &str = "__metadata__";
/// transformers' header metadata; older transformers fail on a file without `format`.
pub const FORMAT_PT: &str = "pt";
/// torch's `__metadata__` key holding `{fqn: {"saved_offsets": [...]}}` (`_hf_utils.CUSTOM_METADATA_KEY`).
pub const DCP_SHARDING_INFO: &str = "DCP_SHARDING_INFO";
/// torch's `__metadata__` key holding the HF-storage format version (`_hf_utils.DCP_VERSION_KEY`).
pub const DCP_VERSION: &str = "DCP_VERSION";
const SAVED_OFFSETS: &str = "saved_offsets";
/// File names torch's and transformers' safetensors readers pick up (`_hf_utils.SUFFIX`).
pub const SUFFIX: &str = ".safetensors";

/// One tensor of a safetensors header, with absolute byte positions in its file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderTensor {
  pub name: String,
  pub dtype: DType,
  pub shape: Vec<u64>,
  /// Absolute byte offset of the tensor's first byte in the file.
  pub start: u64,
  /// Bytes of the tensor (dtype × shape; checked by the `safetensors` crate).
  pub len: u64,
}

/// A parsed, validated safetensors header.
#[derive(Debug, Clone, Default)]
pub struct Header {
  /// Tensors in data order.
  pub tensors: Vec<HeaderTensor>,
  /// `__metadata__` (string to string).
  pub metadata: HashMap<String, String>,
  /// Absolute offset of the first data byte (after the length and the JSON).
  pub data_start: u64,
}

impl Header {
  pub fn tensor(&self, name: &str) -> Option<&HeaderTensor> {
    self.tensors.iter().find(|t| t.name == name)
  }

  /// torch's `DCP_SHARDING_INFO`: each FQN's offsets in the whole tensor, or `None` when the header has none.
  pub fn sharding_info(&self, path: &Path) -> Result<Option<HashMap<String, Vec<u64>>>> {
    let Some(text) = self.metadata.get(DCP_SHARDING_INFO) else {
      return Ok(None);
    };
    let bad = |reason: String| Error::SafetensorsHeader { path: path.to_path_buf(), reason };
    let v: serde_json::Value =
      serde_json::from_str(text).map_err(|e| bad(format!("{DCP_SHARDING_INFO} is not JSON: {e}")))?;
    let Some(map) = v.as_object() else {
      return Err(bad(format!("{DCP_SHARDING_INFO} is not a JSON object")));
    };
    let mut out = HashMap::with_capacity(map.len());
    for (fqn, entry) in map {
      let offsets = entry
        .get(SAVED_OFFSETS)
        .and_then(|o| o.as_array())
        .and_then(|a| a.iter().map(serde_json::Value::as_u64).collect::<Option<Vec<u64>>>())
        .ok_or_else(|| {
          bad(format!("{DCP_SHARDING_INFO}: `{fqn}` has no list of non-negative `{SAVED_OFFSETS}`"))
        })?;
      out.insert(fqn.clone(), offsets);
    }
    Ok(Some(out))
  }
}

/// Reads and validates the safetensors header at byte `base` of `file`, whose data must end exactly at `end`
/// (the end of the file for a `.safetensors` file; a DCP blob is written last, so the same holds there).
pub fn read_header(file: &DataFile, base: u64, end: u64) -> Result<Header> {
  let path = &file.path;
  let bad = |reason: String| Error::SafetensorsHeader { path: path.to_path_buf(), reason };
  let mut len_bytes = [0u8; HEADER_LEN_BYTES as usize];
  if base.checked_add(HEADER_LEN_BYTES).is_none_or(|e| e > end) {
    return Err(bad(format!("the file ends before the 8-byte header length at byte {base}")));
  }
  file.read_exact_at(&mut len_bytes, base).map_err(|f| f.into_error(path, ""))?;
  let n = u64::from_le_bytes(len_bytes);
  if n > limits::MAX_SAFETENSORS_HEADER_BYTES {
    return Err(Error::LimitExceeded {
      path: path.to_path_buf(),
      what: "the safetensors header".into(),
      value: n,
      limit: limits::MAX_SAFETENSORS_HEADER_BYTES,
      limit_name: "limits::MAX_SAFETENSORS_HEADER_BYTES",
    });
  }
  // base + 8 ≤ end was checked; n is at most the limit
  let data_start = base + HEADER_LEN_BYTES + n;
  if data_start > end {
    return Err(bad(format!(
      "the header claims {n} bytes, but only {} follow its length",
      end - base - HEADER_LEN_BYTES
    )));
  }
  let mut json = vec![0u8; n as usize];
  file.read_exact_at(&mut json, base + HEADER_LEN_BYTES).map_err(|f| f.into_error(path, ""))?;
  parse_header(&json, data_start, end).map_err(bad)
}

/// Parses header JSON `json` whose data starts at absolute `data_start` and must end at `end`.
pub fn parse_header(json: &[u8], data_start: u64, end: u64) -> std::result::Result<Header, String> {
  let text = std::str::from_utf8(json).map_err(|e| format!("the header is not UTF-8: {e}"))?;
  if !text.starts_with('{') {
    return Err("the header does not start with `{`".into());
  }
  // the crate's `Metadata` deserialiser checks offsets (contiguous from 0, in order), sizes against dtype × shape
  // and overflow: the same rules Python's safe_open applies
  let md: ::safetensors::tensor::Metadata =
    serde_json::from_str(text).map_err(|e| format!("the header is not a valid safetensors header: {e}"))?;
  let data_len = md.data_len() as u64;
  if data_start.checked_add(data_len) != Some(end) {
    return Err(format!(
      "the tensors' data ends at byte {} but the data holds {} bytes (a tensor's offsets lie past the end, or bytes are unaccounted for)",
      data_start.saturating_add(data_len),
      end.saturating_sub(data_start)
    ));
  }
  let infos = md.tensors();
  let mut tensors = Vec::with_capacity(infos.len());
  for (name, info) in infos {
    let st_name =
      serde_json::to_value(info.dtype).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default();
    let dtype = DType::from_safetensors_name(&st_name)
      .ok_or_else(|| format!("tensor `{name}`: dtype {st_name} is not one distcp reads"))?;
    let (s, e) = info.data_offsets;
    tensors.push(HeaderTensor {
      name,
      dtype,
      shape: info.shape.iter().map(|&d| d as u64).collect(),
      start: data_start + s as u64,
      len: (e - s) as u64,
    });
  }
  tensors.sort_by_key(|t| t.start);
  Ok(Header { tensors, metadata: md.metadata().clone().unwrap_or_default(), data_start })
}

/// Whether the bytes at `base` of `file` look like the start of a safetensors header (a length, then `{`), not
/// a `torch.save` zip record (`PK\x03\x04`). Read errors answer no: the read that needs the record reports them.
pub fn looks_like_header(file: &DataFile, base: u64) -> bool {
  let mut head = [0u8; 9];
  if base.checked_add(9).is_none_or(|e| e > file.len()) || file.read_exact_at(&mut head, base).is_err() {
    return false;
  }
  head[8] == b'{' && &head[..4] != b"PK\x03\x04"
}

/// One tensor entry of a header distcp writes.
pub struct WriteEntry<'a> {
  pub name: &'a str,
  pub dtype: DType,
  pub shape: &'a [u64],
  pub nbytes: u64,
}

/// The bytes of a safetensors header (length + JSON padded to [`HEADER_ALIGN`]) for `entries` laid out in the
/// order given, with `__metadata__` `{"format": "pt"}`. An error for a dtype safetensors cannot name, or a tensor
/// named `__metadata__`.
pub fn encode_header(entries: &[WriteEntry<'_>]) -> std::result::Result<Vec<u8>, String> {
  // Written directly rather than through a serde_json::Value tree (a map and three values per tensor: most of
  // the planning time of a 6,144-tensor MoE conversion), with the same bytes: keys in the byte order of
  // serde_json's sorted map, `__metadata__` among them, each tensor's fields as `data_offsets`, `dtype`,
  // `shape`, names escaped by serde_json itself.
  let mut rows: Vec<(&str, usize, u64)> = Vec::with_capacity(entries.len());
  let mut offset = 0u64;
  for (i, e) in entries.iter().enumerate() {
    if e.dtype.safetensors_name().is_none() {
      return Err(format!("safetensors has no {} dtype", e.dtype));
    }
    if e.name == METADATA_KEY {
      return Err(format!(
        "a tensor cannot be named `{METADATA_KEY}` in safetensors (the header's metadata key)"
      ));
    }
    rows.push((e.name, i, offset));
    offset = offset.checked_add(e.nbytes).ok_or("tensor data overflows 64 bits")?;
  }
  rows.sort_unstable_by(|a, b| a.0.cmp(b.0));
  let metadata_at = rows.partition_point(|r| r.0 < METADATA_KEY);
  let mut json: Vec<u8> = Vec::with_capacity(64 + entries.len() * 96);
  let name = |json: &mut Vec<u8>, n: &str| {
    serde_json::to_writer(&mut *json, n).map_err(|e| format!("cannot encode the safetensors header: {e}"))
  };
  json.push(b'{');
  for (k, &(n, i, start)) in rows.iter().enumerate() {
    if k == metadata_at {
      json.extend_from_slice(format!("\"{METADATA_KEY}\":{{\"format\":\"{FORMAT_PT}\"}},").as_bytes());
    }
    let e = &entries[i];
    name(&mut json, n)?;
    let dtype = e.dtype.safetensors_name().unwrap_or_default();
    let shape: Vec<String> = e.shape.iter().map(u64::to_string).collect();
    // start + nbytes was checked above
    let end = start + e.nbytes;
    json.extend_from_slice(
      format!(":{{\"data_offsets\":[{start},{end}],\"dtype\":\"{dtype}\",\"shape\":[{}]}},", shape.join(","))
        .as_bytes(),
    );
  }
  if metadata_at == rows.len() {
    json.extend_from_slice(format!("\"{METADATA_KEY}\":{{\"format\":\"{FORMAT_PT}\"}},").as_bytes());
  }
  // the last entry's comma closes the object
  if let Some(last) = json.last_mut() {
    *last = b'}';
  }
  while !json.len().is_multiple_of(HEADER_ALIGN) {
    json.push(b' ');
  }
  let mut bytes = Vec::with_capacity(json.len() + HEADER_LEN_BYTES as usize);
  bytes.extend_from_slice(&(json.len() as u64).to_le_bytes());
  bytes.extend_from_slice(&json);
  Ok(bytes)
}

#[cfg(test)]
mod tests {
  use super::*;

  fn parse(json: &str, data: u64) -> std::result::Result<Header, String> {
    parse_header(json.as_bytes(), 100, 100 + data)
  }

  #[test]
  fn valid_header_parses_with_absolute_offsets() {
    let h = parse(
      r#"{"__metadata__":{"format":"pt"},"b":{"dtype":"BF16","shape":[2],"data_offsets":[8,12]},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#,
      12,
    )
    .unwrap();
    assert_eq!(h.tensors.len(), 2);
    assert_eq!(
      h.tensors[0],
      HeaderTensor { name: "a".into(), dtype: DType::Float32, shape: vec![2], start: 100, len: 8 }
    );
    assert_eq!(h.tensors[1].start, 108);
    assert_eq!(h.tensors[1].dtype, DType::BFloat16);
    assert_eq!(h.metadata.get("format").map(String::as_str), Some("pt"));
  }

  #[test]
  fn lying_headers_are_refused() {
    // past the end
    assert!(parse(r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#, 8).is_err());
    // overlapping
    assert!(parse(
      r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
      12
    )
    .is_err());
    // dtype × shape ≠ byte range
    assert!(parse(r#"{"a":{"dtype":"F16","shape":[4],"data_offsets":[0,16]}}"#, 16).is_err());
    // a gap at the end
    assert!(parse(r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#, 12).is_err());
    // shape overflow
    assert!(
      parse(r#"{"a":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,8]}}"#, 8).is_err()
    );
    // unknown dtype
    assert!(parse(r#"{"a":{"dtype":"F4","shape":[2],"data_offsets":[0,1]}}"#, 1).is_err());
    assert!(parse("[]", 0).is_err());
  }

  /// The header as a serde_json tree gives it (what distcp wrote before, and what the byte-identity tests against
  /// the safetensors library pinned).
  fn header_via_tree(entries: &[WriteEntry<'_>]) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    header.insert(METADATA_KEY.into(), serde_json::json!({ "format": FORMAT_PT }));
    let mut offset = 0u64;
    for e in entries {
      let end = offset + e.nbytes;
      let dtype = e.dtype.safetensors_name().unwrap();
      header.insert(
        e.name.to_owned(),
        serde_json::json!({ "dtype": dtype, "shape": e.shape, "data_offsets": [offset, end] }),
      );
      offset = end;
    }
    let mut json = serde_json::to_vec(&serde_json::Value::Object(header)).unwrap();
    while !json.len().is_multiple_of(HEADER_ALIGN) {
      json.push(b' ');
    }
    let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(&json);
    bytes
  }

  proptest::proptest! {
    #[test]
    fn written_header_equals_the_serde_tree(
      tensors in proptest::collection::btree_map(
        "[a-z_.\"\\\\é\\u{1}-\\u{7f}]{0,12}",
        (proptest::collection::vec(0u64..5000, 0..4), 0usize..4),
        0..40,
      )
    ) {
      let dtypes = [DType::BFloat16, DType::Float32, DType::Int64, DType::Bool];
      let owned: Vec<(String, Vec<u64>, DType)> = tensors
        .into_iter()
        .filter(|(n, _)| n != METADATA_KEY)
        .map(|(n, (shape, d))| (n, shape, dtypes[d]))
        .collect();
      // in an order other than sorted, as a shard's tensors come
      let entries: Vec<WriteEntry<'_>> = owned
        .iter()
        .rev()
        .map(|(n, shape, d)| WriteEntry { name: n, dtype: *d, shape, nbytes: shape.iter().product::<u64>() * d.size() as u64 })
        .collect();
      proptest::prop_assert_eq!(encode_header(&entries).unwrap(), header_via_tree(&entries));
    }
  }

  #[test]
  fn a_tensor_named_like_the_metadata_key_is_refused() {
    let e = [WriteEntry { name: METADATA_KEY, dtype: DType::Float32, shape: &[1], nbytes: 4 }];
    assert!(encode_header(&e).unwrap_err().contains("__metadata__"));
  }

  #[test]
  fn encoded_header_parses_back() {
    let e = [
      WriteEntry { name: "w", dtype: DType::BFloat16, shape: &[2, 3], nbytes: 12 },
      WriteEntry { name: "b", dtype: DType::Int64, shape: &[1], nbytes: 8 },
    ];
    let bytes = encode_header(&e).unwrap();
    assert_eq!(bytes.len() % HEADER_ALIGN, 0);
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap());
    assert_eq!(n as usize, bytes.len() - 8);
    let h = parse_header(&bytes[8..], bytes.len() as u64, bytes.len() as u64 + 20).unwrap();
    assert_eq!(h.tensor("w").unwrap().shape, vec![2, 3]);
    assert_eq!(h.tensor("b").unwrap().start, bytes.len() as u64 + 12);
  }
}
