//! Reading the `torch.save` zip archive: the central directory says where each stored entry's bytes are. Nothing
//! is decompressed: torch stores every record, so an entry is just a byte range of the archive, which is read
//! through [`ReadAt`] (positional reads of a file, or memory) so that only the structures are read.
//!
//! Sizes come from the central directory, never from local headers (miniz writes zeros there and uses data
//! descriptors). CRCs are not checked: torch can be configured to write none.

use crate::source::ReadAt;
use std::ops::Range;

#[derive(Debug, PartialEq)]
pub enum ZipError {
  Malformed(String),
  Compressed {
    entry: String,
    method: u16,
  },
  /// Reading the archive's bytes failed (e.g. the file shrank under us).
  Read {
    offset: u64,
    len: u64,
    kind: std::io::ErrorKind,
    message: String,
  },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
  /// The name without the archive folder (`data.pkl`, `data/0`, `byteorder`, ...).
  pub name: String,
  /// Where the stored bytes are, relative to the start of the archive.
  pub data: Range<usize>,
}

#[derive(Debug, Clone)]
pub struct Archive {
  /// The top-level folder every entry sits in (`archive` for DCP blobs).
  pub prefix: String,
  pub entries: Vec<Entry>,
}

impl Archive {
  pub fn get(&self, name: &str) -> Option<&Entry> {
    self.entries.iter().find(|e| e.name == name)
  }
}

use super::{
  CENTRAL_SIG as CDIR_SIG, END_SIG as EOCD_SIG, LOCAL_SIG, ZIP64_END_SIG as ZIP64_EOCD_SIG, ZIP64_LOCATOR_SIG,
};

fn bad<T>(reason: impl Into<String>) -> Result<T, ZipError> {
  Err(ZipError::Malformed(reason.into()))
}

struct Cursor<'a> {
  buf: &'a [u8],
  pos: usize,
}

impl<'a> Cursor<'a> {
  fn at(buf: &'a [u8], pos: usize) -> Self {
    Cursor { buf, pos }
  }
  fn bytes(&mut self, n: usize) -> Result<&'a [u8], ZipError> {
    match self.pos.checked_add(n) {
      Some(end) if end <= self.buf.len() => {
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
      }
      _ => bad("truncated zip structure"),
    }
  }
  fn u16(&mut self) -> Result<u16, ZipError> {
    let b = self.bytes(2)?;
    Ok(u16::from_le_bytes([b[0], b[1]]))
  }
  fn u32(&mut self) -> Result<u32, ZipError> {
    let b = self.bytes(4)?;
    Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
  }
  fn u64(&mut self) -> Result<u64, ZipError> {
    let b = self.bytes(8)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(b);
    Ok(u64::from_le_bytes(a))
  }
}

fn to_usize(v: u64, what: &str) -> Result<usize, ZipError> {
  usize::try_from(v).or_else(|_| bad(format!("{what} does not fit in memory")))
}

fn read<R: ReadAt + ?Sized>(r: &R, offset: u64, len: u64) -> Result<Vec<u8>, ZipError> {
  let end = offset.checked_add(len);
  if end.is_none_or(|e| e > r.size()) {
    return bad("truncated zip structure");
  }
  let n = to_usize(len, "zip structure")?;
  let mut buf = Vec::new();
  buf.try_reserve_exact(n).or_else(|_| bad(format!("cannot allocate {n} bytes for a zip structure")))?;
  buf.resize(n, 0);
  r.read_at(offset, &mut buf).map_err(|e| ZipError::Read {
    offset,
    len,
    kind: e.kind(),
    message: e.to_string(),
  })?;
  Ok(buf)
}

/// Parses the archive that occupies exactly `r` (DCP records are self-contained archives), reading only its
/// first bytes, the end records, the central directory and each entry's local header.
pub fn parse<R: ReadAt + ?Sized>(r: &R) -> Result<Archive, ZipError> {
  let total = r.size();
  if total < 22 {
    return bad(format!("{total} bytes is too short for a zip archive"));
  }
  if read(r, 0, 4)?[..] != LOCAL_SIG.to_le_bytes() {
    return bad("does not start with a zip local header (PK\\x03\\x04)");
  }
  // The end-of-central-directory record; torch writes no comment, but allow one. The tail read also covers the
  // zip64 locator just before it. Without a comment (torch's case) the record ends the archive: a small read finds
  // it, where the search for a comment would read up to 64 KiB (a small record whole, a second time).
  let short = read(r, total - total.min(22 + 20), total.min(22 + 20))?;
  let tail = if short[short.len() - 22..short.len() - 18] == EOCD_SIG.to_le_bytes() {
    short
  } else {
    let tail_len = total.min(22 + 0xffff + 20);
    read(r, total - tail_len, tail_len)?
  };
  let search_from = tail.len().saturating_sub(22 + 0xffff);
  let Some(eocd) = (search_from..=tail.len() - 22).rev().find(|&i| tail[i..i + 4] == EOCD_SIG.to_le_bytes())
  else {
    return bad("no end-of-central-directory record (truncated?)");
  };
  let mut c = Cursor::at(&tail, eocd + 4);
  let _disk = c.u16()?;
  let _cd_disk = c.u16()?;
  let _n_here = c.u16()?;
  let mut count = u64::from(c.u16()?);
  let mut cd_size = u64::from(c.u32()?);
  let mut cd_offset = u64::from(c.u32()?);

  if eocd >= 20 && tail[eocd - 20..eocd - 16] == ZIP64_LOCATOR_SIG.to_le_bytes() {
    let mut l = Cursor::at(&tail, eocd - 16);
    let _disk = l.u32()?;
    let z64 = l.u64()?;
    let rec = read(r, z64, 56)?;
    let mut z = Cursor::at(&rec, 0);
    if z.u32()? != ZIP64_EOCD_SIG {
      return bad("zip64 locator points to no zip64 end record");
    }
    let _size = z.u64()?;
    let _made = z.u16()?;
    let _need = z.u16()?;
    let _disk = z.u32()?;
    let _cd_disk = z.u32()?;
    let _n_here = z.u64()?;
    count = z.u64()?;
    cd_size = z.u64()?;
    cd_offset = z.u64()?;
  }

  if cd_offset.checked_add(cd_size).is_none_or(|e| e > total) {
    return bad("central directory lies outside the archive");
  }
  // each central record is at least 46 bytes: a bigger count is a lie, don't allocate for it
  if count > cd_size / 46 + 1 {
    return bad("central directory entry count is inconsistent with its size");
  }
  let cd = read(r, cd_offset, cd_size)?;

  let mut entries = Vec::with_capacity(count as usize);
  let mut prefix: Option<String> = None;
  let mut c = Cursor::at(&cd, 0);
  for _ in 0..count {
    if c.u32()? != CDIR_SIG {
      return bad("corrupt central directory entry");
    }
    let _made = c.u16()?;
    let _need = c.u16()?;
    let _flags = c.u16()?;
    let method = c.u16()?;
    let _time = c.u16()?;
    let _date = c.u16()?;
    let _crc = c.u32()?;
    let mut csize = u64::from(c.u32()?);
    let mut usize_ = u64::from(c.u32()?);
    let name_len = usize::from(c.u16()?);
    let extra_len = usize::from(c.u16()?);
    let comment_len = usize::from(c.u16()?);
    let _disk = c.u16()?;
    let _iattr = c.u16()?;
    let _eattr = c.u32()?;
    let mut local = u64::from(c.u32()?);
    let raw_name = c.bytes(name_len)?;
    let Ok(full_name) = std::str::from_utf8(raw_name) else {
      return bad("entry name is not UTF-8");
    };
    let extra = c.bytes(extra_len)?;
    c.bytes(comment_len)?;

    // ZIP64 extra: only the fields that were 0xFFFFFFFF, in this order
    let mut e = Cursor::at(extra, 0);
    while e.pos + 4 <= extra.len() {
      let id = e.u16()?;
      let len = usize::from(e.u16()?);
      let body = e.bytes(len)?;
      if id == 0x0001 {
        let mut z = Cursor::at(body, 0);
        if usize_ == 0xffff_ffff {
          usize_ = z.u64()?;
        }
        if csize == 0xffff_ffff {
          csize = z.u64()?;
        }
        if local == 0xffff_ffff {
          local = z.u64()?;
        }
      }
    }

    let Some((dir, name)) = full_name.split_once('/') else {
      return bad(format!("entry `{full_name}` is not inside an archive folder"));
    };
    let p = prefix.get_or_insert_with(|| dir.to_owned());
    if p != dir {
      // torch names records by the first entry's folder; a foreign entry is simply not addressable
      continue;
    }
    if method != 0 {
      return Err(ZipError::Compressed { entry: full_name.to_owned(), method });
    }
    if csize != usize_ {
      return bad(format!("stored entry `{full_name}` has different compressed and uncompressed sizes"));
    }

    let lh = match read(r, local, 30) {
      Ok(lh) => lh,
      Err(ZipError::Malformed(_)) => {
        return bad(format!("entry `{full_name}`: no local header at offset {local}"))
      }
      Err(e) => return Err(e),
    };
    let mut l = Cursor::at(&lh, 0);
    if l.u32()? != LOCAL_SIG {
      return bad(format!("entry `{full_name}`: no local header at offset {local}"));
    }
    let mut lf = Cursor::at(&lh, 26);
    let lname = u64::from(lf.u16()?);
    let lextra = u64::from(lf.u16()?);
    let start = local + 30 + lname + lextra;
    let end = start.checked_add(csize);
    match end {
      Some(end) if end <= total => {
        let data = to_usize(start, "entry offset")?..to_usize(end, "entry end")?;
        entries.push(Entry { name: name.to_owned(), data })
      }
      _ => return bad(format!("entry `{full_name}` runs past the end of the archive")),
    }
  }
  let Some(prefix) = prefix else {
    return bad("the archive has no entries");
  };
  Ok(Archive { prefix, entries })
}
