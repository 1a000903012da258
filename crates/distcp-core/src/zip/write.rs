//! The `torch.save` zip archive, byte for byte as PyTorch's `PyTorchStreamWriter` (miniz, `MZ_ZIP_FLAG_WRITE_ZIP64`)
//! writes it to a file-like target (spec §4.2–4.3), checked against torch 2.15 in `tests/torch_save_golden.rs`:
//!
//! * every entry is stored, named `archive/<record>`, and its data starts on a 64-byte boundary of the archive,
//!   padded with a private extra field `'F' 'B' <u16 len> 'Z'*len` that every local header carries (even when
//!   `len` is 0); version-needed, DOS time and date are 0; flags are `0x0808` (UTF-8 + data descriptor), or
//!   `0x0800` for an empty entry, which gets no descriptor;
//! * local headers carry CRC and sizes of 0; the real values follow the data in a descriptor (`PK\x07\x08`, CRC,
//!   sizes as u32, or as u64 when the entry needs ZIP64) and are repeated in the central directory;
//! * an entry needs ZIP64 when its size or its local-header offset is ≥ 0xFFFFFFFF: its local header then starts
//!   the extra field with a ZIP64 block (uncompressed size and a compressed size of 0, and/or the offset), the
//!   central record says 0xFFFFFFFF and carries the real values in the same kind of block (no FB field there);
//! * the archive ends with a ZIP64 end record (made by 0x031E, needs 0x002D), a ZIP64 locator and the classic end
//!   record, whatever the archive's size;
//! * [`ArchiveWriter::finish`] adds `version` ("3\n") and `byteorder` ("little") when missing, then
//!   `.data/serialization_id`: 20 digits of a combined hash of the record names (libstdc++'s `std::hash`,
//!   iterated in the order of PyTorch's `std::unordered_set`) and 20 digits of a combined hash of the CRCs of the
//!   entries that have descriptors. Deterministic, so the whole archive is.
//!
//! The caller's bytes go straight to the output (`Write::write_all` on the caller's slice, no copy here); the CRC
//! is computed on the way.

use std::io::{self, Write};

/// Where every record's data starts: a multiple of this, from the start of the archive (`kFieldAlignment`).
pub const ALIGNMENT: u64 = 64;
/// What torch.save writes as `version` (`kMinProducedFileFormatVersion`).
pub const FILE_FORMAT_VERSION: &[u8] = b"3\n";

use super::{CENTRAL_SIG, DESCRIPTOR_SIG, END_SIG, LOCAL_SIG, ZIP64_END_SIG, ZIP64_LOCATOR_SIG};
const U32_MAX: u64 = 0xffff_ffff;
const FLAG_UTF8: u16 = 0x0800;
const FLAG_DESCRIPTOR: u16 = 0x0008;

#[derive(Debug, Clone)]
struct Entry {
  name: Vec<u8>,
  crc: u32,
  size: u64,
  offset: u64,
}

/// Writes one `torch.save` archive into `out`, starting at archive offset 0 (DCP items are self-contained).
pub struct ArchiveWriter<W: Write> {
  out: W,
  prefix: String,
  pos: u64,
  entries: Vec<Entry>,
  /// Record names (without the prefix), in the order written.
  records: Vec<String>,
  combined_crc: u64,
}

impl<W: Write> ArchiveWriter<W> {
  /// An archive whose folder is `archive`, as torch names it for a file-like target.
  pub fn new(out: W) -> Self {
    Self::with_name(out, "archive")
  }

  /// An archive whose folder is `name` (torch uses the file stem when saving to a path).
  pub fn with_name(out: W, name: &str) -> Self {
    ArchiveWriter {
      out,
      prefix: format!("{name}/"),
      pos: 0,
      entries: Vec::new(),
      records: Vec::new(),
      combined_crc: 0,
    }
  }

  /// Bytes written so far.
  pub fn position(&self) -> u64 {
    self.pos
  }

  pub fn has_record(&self, name: &str) -> bool {
    self.records.iter().any(|r| r == name)
  }

  fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
    self.out.write_all(bytes)?;
    self.pos += bytes.len() as u64;
    Ok(())
  }

  /// Writes record `name` (e.g. `data.pkl`, `data/0`) holding `data`.
  pub fn write_record(&mut self, name: &str, data: &[u8]) -> io::Result<()> {
    if self.has_record(name) {
      return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("record `{name}` written twice")));
    }
    let full = format!("{}{name}", self.prefix);
    let name_len = u16::try_from(full.len())
      .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "record name too long"))?;
    let size = data.len() as u64;
    let offset = self.pos;
    let big_size = size >= U32_MAX;
    let big_offset = offset >= U32_MAX;

    let mut zip64 = Vec::new();
    if big_size || big_offset {
      let len = if big_size { 16u16 } else { 0 } + if big_offset { 8 } else { 0 };
      zip64.extend_from_slice(&1u16.to_le_bytes());
      zip64.extend_from_slice(&len.to_le_bytes());
      if big_size {
        // miniz writes the local header before it knows the compressed size: 0 here, the real one later
        zip64.extend_from_slice(&size.to_le_bytes());
        zip64.extend_from_slice(&0u64.to_le_bytes());
      }
      if big_offset {
        zip64.extend_from_slice(&offset.to_le_bytes());
      }
    }
    // detail::getPadding
    let start = offset + 30 + full.len() as u64 + 4 + zip64.len() as u64;
    let pad = (ALIGNMENT - start % ALIGNMENT) % ALIGNMENT;
    let flags = if size > 0 { FLAG_UTF8 | FLAG_DESCRIPTOR } else { FLAG_UTF8 };

    let mut header = Vec::with_capacity(30 + full.len() + zip64.len() + 4 + pad as usize);
    header.extend_from_slice(&LOCAL_SIG.to_le_bytes());
    header.extend_from_slice(&0u16.to_le_bytes()); // version needed
    header.extend_from_slice(&flags.to_le_bytes());
    header.extend_from_slice(&0u16.to_le_bytes()); // stored
    header.extend_from_slice(&[0; 4]); // DOS time, date
    header.extend_from_slice(&[0; 12]); // CRC, sizes: in the descriptor
    header.extend_from_slice(&name_len.to_le_bytes());
    header.extend_from_slice(&((zip64.len() as u64 + 4 + pad) as u16).to_le_bytes());
    header.extend_from_slice(full.as_bytes());
    header.extend_from_slice(&zip64);
    header.extend_from_slice(b"FB");
    header.extend_from_slice(&(pad as u16).to_le_bytes());
    header.resize(header.len() + pad as usize, b'Z');
    self.put(&header)?;
    debug_assert_eq!(self.pos % ALIGNMENT, 0);

    let crc = crc32fast::hash(data);
    self.put(data)?;
    if size > 0 {
      let mut d = Vec::with_capacity(24);
      d.extend_from_slice(&DESCRIPTOR_SIG.to_le_bytes());
      d.extend_from_slice(&crc.to_le_bytes());
      if big_size || big_offset {
        d.extend_from_slice(&size.to_le_bytes());
        d.extend_from_slice(&size.to_le_bytes());
      } else {
        d.extend_from_slice(&(size as u32).to_le_bytes());
        d.extend_from_slice(&(size as u32).to_le_bytes());
      }
      self.put(&d)?;
      // PyTorch folds the CRC of every descriptor it sees go by into the serialization id
      self.combined_crc = hash_combine(self.combined_crc, u64::from(crc));
    }
    self.entries.push(Entry { name: full.into_bytes(), crc, size, offset });
    self.records.push(name.to_owned());
    Ok(())
  }

  /// `PyTorchStreamWriter::writeEndOfFile`: missing `version`/`byteorder`, `.data/serialization_id`, central
  /// directory, ZIP64 end records, end record. Returns the output (not flushed) and the archive's length.
  pub fn finish(mut self) -> io::Result<(W, u64)> {
    if !self.has_record("version") && !self.has_record(".data/version") {
      self.write_record("version", FILE_FORMAT_VERSION)?;
    }
    if !self.has_record("byteorder") {
      self.write_record("byteorder", b"little")?;
    }
    let id = self.serialization_id();
    self.write_record(".data/serialization_id", id.as_bytes())?;

    let cd_offset = self.pos;
    let mut cd = Vec::new();
    for e in &self.entries {
      let big_size = e.size >= U32_MAX;
      let big_offset = e.offset >= U32_MAX;
      let mut extra = Vec::new();
      if big_size || big_offset {
        let len = if big_size { 16u16 } else { 0 } + if big_offset { 8 } else { 0 };
        extra.extend_from_slice(&1u16.to_le_bytes());
        extra.extend_from_slice(&len.to_le_bytes());
        if big_size {
          extra.extend_from_slice(&e.size.to_le_bytes());
          extra.extend_from_slice(&e.size.to_le_bytes());
        }
        if big_offset {
          extra.extend_from_slice(&e.offset.to_le_bytes());
        }
      }
      let flags = if e.size > 0 { FLAG_UTF8 | FLAG_DESCRIPTOR } else { FLAG_UTF8 };
      let size32 = e.size.min(U32_MAX) as u32;
      cd.extend_from_slice(&CENTRAL_SIG.to_le_bytes());
      cd.extend_from_slice(&0u16.to_le_bytes()); // version made by
      cd.extend_from_slice(&0u16.to_le_bytes()); // version needed
      cd.extend_from_slice(&flags.to_le_bytes());
      cd.extend_from_slice(&0u16.to_le_bytes()); // stored
      cd.extend_from_slice(&[0; 4]); // DOS time, date
      cd.extend_from_slice(&e.crc.to_le_bytes());
      cd.extend_from_slice(&size32.to_le_bytes());
      cd.extend_from_slice(&size32.to_le_bytes());
      cd.extend_from_slice(&(e.name.len() as u16).to_le_bytes());
      cd.extend_from_slice(&(extra.len() as u16).to_le_bytes());
      cd.extend_from_slice(&0u16.to_le_bytes()); // comment
      cd.extend_from_slice(&0u16.to_le_bytes()); // disk
      cd.extend_from_slice(&0u16.to_le_bytes()); // internal attributes
      cd.extend_from_slice(&0u32.to_le_bytes()); // external attributes
      cd.extend_from_slice(&(e.offset.min(U32_MAX) as u32).to_le_bytes());
      cd.extend_from_slice(&e.name);
      cd.extend_from_slice(&extra);
    }
    let cd_size = cd.len() as u64;
    let count = self.entries.len() as u64;
    let zip64_end_offset = cd_offset + cd_size;

    let mut tail = cd;
    tail.extend_from_slice(&ZIP64_END_SIG.to_le_bytes());
    tail.extend_from_slice(&44u64.to_le_bytes());
    tail.extend_from_slice(&0x031eu16.to_le_bytes());
    tail.extend_from_slice(&0x002du16.to_le_bytes());
    tail.extend_from_slice(&0u32.to_le_bytes());
    tail.extend_from_slice(&0u32.to_le_bytes());
    tail.extend_from_slice(&count.to_le_bytes());
    tail.extend_from_slice(&count.to_le_bytes());
    tail.extend_from_slice(&cd_size.to_le_bytes());
    tail.extend_from_slice(&cd_offset.to_le_bytes());

    tail.extend_from_slice(&ZIP64_LOCATOR_SIG.to_le_bytes());
    tail.extend_from_slice(&0u32.to_le_bytes());
    tail.extend_from_slice(&zip64_end_offset.to_le_bytes());
    tail.extend_from_slice(&1u32.to_le_bytes());

    tail.extend_from_slice(&END_SIG.to_le_bytes());
    tail.extend_from_slice(&0u16.to_le_bytes());
    tail.extend_from_slice(&0u16.to_le_bytes());
    tail.extend_from_slice(&(count.min(0xffff) as u16).to_le_bytes());
    tail.extend_from_slice(&(count.min(0xffff) as u16).to_le_bytes());
    tail.extend_from_slice(&(cd_size.min(U32_MAX) as u32).to_le_bytes());
    tail.extend_from_slice(&(cd_offset.min(U32_MAX) as u32).to_le_bytes());
    tail.extend_from_slice(&0u16.to_le_bytes());
    self.put(&tail)?;
    Ok((self.out, self.pos))
  }

  /// `PyTorchStreamWriter::writeSerializationId`.
  fn serialization_id(&self) -> String {
    let hashes: Vec<u64> = self.records.iter().map(|r| std_hash_bytes(r.as_bytes())).collect();
    let mut combined_names = 0u64;
    for i in unordered_set_order(&hashes) {
      combined_names = hash_combine(combined_names, hashes[i]);
    }
    format!("{combined_names:020}{:020}", self.combined_crc)
  }
}

/// `c10::hash_combine`.
fn hash_combine(seed: u64, value: u64) -> u64 {
  seed ^ value.wrapping_add(0x9e37_79b9).wrapping_add(seed << 6).wrapping_add(seed >> 2)
}

/// libstdc++'s `std::_Hash_bytes(ptr, len, 0xc70f6907)`, i.e. `std::hash<std::string>` on 64-bit Linux.
fn std_hash_bytes(buf: &[u8]) -> u64 {
  const MUL: u64 = 0xc6a4_a793_5bd1_e995;
  const SEED: u64 = 0xc70f_6907;
  let shift_mix = |v: u64| v ^ (v >> 47);
  let len = buf.len();
  let mut hash = SEED ^ (len as u64).wrapping_mul(MUL);
  let aligned = len & !7;
  for chunk in buf[..aligned].chunks_exact(8) {
    let mut w = [0u8; 8];
    w.copy_from_slice(chunk);
    let data = shift_mix(u64::from_le_bytes(w).wrapping_mul(MUL)).wrapping_mul(MUL);
    hash ^= data;
    hash = hash.wrapping_mul(MUL);
  }
  if len & 7 != 0 {
    let mut data = 0u64;
    for &b in buf[aligned..].iter().rev() {
      data = (data << 8) | u64::from(b);
    }
    hash ^= data;
    hash = hash.wrapping_mul(MUL);
  }
  hash = shift_mix(hash).wrapping_mul(MUL);
  shift_mix(hash)
}

/// Bucket counts a libstdc++ `unordered_set` grows through when filled one by one from empty (measured with
/// GCC 12: 1 → 13 at the first insert, then the next count once the size exceeds the current one).
const BUCKET_COUNTS: [u64; 18] = [
  13, 29, 59, 127, 257, 541, 1109, 2357, 5087, 10273, 20753, 42043, 85229, 172933, 351061, 712697, 1447153,
  2938679,
];

/// The iteration order of a libstdc++ `std::unordered_set` into which keys with these hash codes were inserted
/// in this order (all distinct). Emulates `_M_insert_unique_node` and `_M_rehash_aux`.
fn unordered_set_order(hashes: &[u64]) -> Vec<usize> {
  #[derive(Clone, Copy)]
  enum Before {
    Head,
    Node(usize),
  }
  struct Set<'a> {
    hashes: &'a [u64],
    next: Vec<Option<usize>>,
    head: Option<usize>,
    buckets: Vec<Option<Before>>,
  }
  impl Set<'_> {
    fn next_of(&self, b: Before) -> Option<usize> {
      match b {
        Before::Head => self.head,
        Before::Node(i) => self.next[i],
      }
    }
    fn set_next(&mut self, b: Before, v: Option<usize>) {
      match b {
        Before::Head => self.head = v,
        Before::Node(i) => self.next[i] = v,
      }
    }
    fn bucket(&self, node: usize, count: usize) -> usize {
      (self.hashes[node] % count as u64) as usize
    }
    /// `_M_insert_bucket_begin`: links `node` first in its bucket.
    fn link(&mut self, node: usize, buckets: &mut [Option<Before>]) {
      let bkt = self.bucket(node, buckets.len());
      match buckets[bkt] {
        Some(before) => {
          self.next[node] = self.next_of(before);
          self.set_next(before, Some(node));
        }
        None => {
          self.next[node] = self.head;
          self.head = Some(node);
          if let Some(n) = self.next[node] {
            let nb = self.bucket(n, buckets.len());
            buckets[nb] = Some(Before::Node(node));
          }
          buckets[bkt] = Some(Before::Head);
        }
      }
    }
  }
  let mut s = Set { hashes, next: vec![None; hashes.len()], head: None, buckets: vec![None; 1] };
  for node in 0..hashes.len() {
    let n = node as u64 + 1;
    let want =
      BUCKET_COUNTS.iter().copied().find(|&c| c >= n).unwrap_or(BUCKET_COUNTS[BUCKET_COUNTS.len() - 1])
        as usize;
    if want != s.buckets.len() {
      // _M_rehash_aux: walk the old list, re-link each node into fresh buckets
      let mut buckets = vec![None; want];
      let mut p = s.head;
      s.head = None;
      let mut bbegin = 0usize;
      while let Some(i) = p {
        let following = s.next[i];
        let bkt = s.bucket(i, want);
        match buckets[bkt] {
          None => {
            s.next[i] = s.head;
            s.head = Some(i);
            buckets[bkt] = Some(Before::Head);
            if s.next[i].is_some() {
              buckets[bbegin] = Some(Before::Node(i));
            }
            bbegin = bkt;
          }
          Some(before) => {
            s.next[i] = s.next_of(before);
            s.set_next(before, Some(i));
          }
        }
        p = following;
      }
      s.buckets = buckets;
    }
    let mut buckets = std::mem::take(&mut s.buckets);
    s.link(node, &mut buckets);
    s.buckets = buckets;
  }
  let mut order = Vec::with_capacity(hashes.len());
  let mut p = s.head;
  while let Some(i) = p {
    order.push(i);
    p = s.next[i];
  }
  order
}

#[cfg(test)]
mod tests {
  use super::*;
  use crate::zip;

  #[test]
  fn libstdcxx_hash_and_order() {
    // torch 2.15: torch.save(torch.arange(6.).reshape(2, 3), io.BytesIO()) has serialization id
    // 1572819951185464302603622430115872126654; its first half only depends on the record names
    let names = ["data.pkl", ".format_version", ".storage_alignment", "byteorder", "data/0", "version"];
    let hashes: Vec<u64> = names.iter().map(|n| std_hash_bytes(n.as_bytes())).collect();
    let order = unordered_set_order(&hashes);
    assert_eq!(order, vec![5, 4, 3, 2, 1, 0]);
    let combined = order.iter().fold(0, |c, &i| hash_combine(c, hashes[i]));
    assert_eq!(combined, 15728199511854643026);
  }

  #[test]
  fn order_survives_rehashing() {
    // every node appears exactly once, whatever the growth
    let hashes: Vec<u64> = (0..3000u64).map(|i| std_hash_bytes(format!("data/{i}").as_bytes())).collect();
    let mut order = unordered_set_order(&hashes);
    order.sort_unstable();
    assert_eq!(order, (0..3000).collect::<Vec<_>>());
  }

  #[test]
  fn entries_are_aligned_and_readable() {
    let mut w = ArchiveWriter::new(Vec::new());
    w.write_record("data.pkl", b"\x80\x02N.").unwrap();
    w.write_record("byteorder", b"little").unwrap();
    w.write_record("data/0", &[7u8; 100]).unwrap();
    w.write_record("data/1", &[]).unwrap();
    let (buf, len) = w.finish().unwrap();
    assert_eq!(len as usize, buf.len());
    let a = zip::parse(&buf).unwrap();
    assert_eq!(a.prefix, "archive");
    let names: Vec<&str> = a.entries.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["data.pkl", "byteorder", "data/0", "data/1", "version", ".data/serialization_id"]);
    for e in &a.entries {
      assert_eq!(e.data.start % 64, 0, "{}", e.name);
    }
    assert_eq!(&buf[a.get("data/0").unwrap().data.clone()], &[7u8; 100][..]);
    assert_eq!(&buf[a.get("version").unwrap().data.clone()], b"3\n");
    assert!(a.get("data/1").unwrap().data.is_empty());
    let id = &buf[a.get(".data/serialization_id").unwrap().data.clone()];
    assert_eq!(id.len(), 40);
    assert!(id.iter().all(u8::is_ascii_digit));
  }

  #[test]
  fn a_record_cannot_be_written_twice() {
    let mut w = ArchiveWriter::new(Vec::new());
    w.write_record("data.pkl", b"x").unwrap();
    assert!(w.write_record("data.pkl", b"y").is_err());
  }
}
