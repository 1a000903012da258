//! What the fuzz targets share: how one input is cut into the files of a folder.

/// The next part of a folder-shaped input: a u32 LE length (clamped to what is left), then that many bytes; with
/// fewer than 4 bytes left, the rest. The seed corpora are written in the same framing (`seed-corpus.sh`).
pub fn take<'a>(data: &mut &'a [u8]) -> &'a [u8] {
  if data.len() < 4 {
    return std::mem::take(data);
  }
  let n = (u32::from_le_bytes([data[0], data[1], data[2], data[3]]) as usize).min(data.len() - 4);
  let (part, rest) = data[4..].split_at(n);
  *data = rest;
  part
}
