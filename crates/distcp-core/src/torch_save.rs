//! One `torch.save` archive, as DCP stores every item: `data.pkl` rebuilt into a [`PyObject`] whose tensors are
//! [`TensorRecord`]s pointing at their bytes inside the archive. Nothing is copied here.

use crate::dtype::DType;
use crate::limits::{
  checked_numel, MAX_DIMS, MAX_NESTING, MAX_OBJECT_BYTES, RECORD_PICKLE_MEMO_BYTES,
  RECORD_PICKLE_MEMO_ENTRIES,
};
use crate::metadata::torch_value_global;
use crate::pickle::{self, Object, Value};
use crate::source::ReadAt;
use crate::value::PyValue;
use crate::zip::{self, Archive, Entry, ZipError};
use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};

/// A tensor as `data.pkl` describes it.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorRecord {
  pub dtype: DType,
  pub shape: Vec<u64>,
  /// Element strides, as torch reports them (a transposed tensor keeps its permuted strides).
  pub stride: Vec<u64>,
  /// Element offset into the storage.
  pub storage_offset: u64,
  /// The storage's bytes, relative to the start of the archive.
  pub storage: Range<usize>,
  pub big_endian: bool,
  /// Lazily conjugated complex tensor: the stored imaginary parts must be negated.
  pub conj: bool,
  /// Lazily negated tensor: the stored values must be negated.
  pub neg: bool,
}

impl TensorRecord {
  /// Elements of the view; `parse` refused records where this overflows.
  pub fn numel(&self) -> u64 {
    checked_numel(&self.shape).unwrap_or(u64::MAX)
  }

  /// How the view's elements sit in the storage, for [`crate::exec::lower`].
  pub fn layout(&self) -> crate::exec::StoredLayout {
    crate::exec::StoredLayout {
      stride: self.stride.clone(),
      storage_offset: self.storage_offset,
      elem_size: self.dtype.size() as u64,
    }
  }

  /// The fixup copied bytes need, if any.
  pub fn fixup(&self) -> Option<crate::source::Fixup> {
    crate::source::Fixup::new(self.dtype, self.big_endian, self.conj, self.neg)
  }

  pub fn is_row_major(&self) -> bool {
    let mut expected = 1u64;
    for (&size, &stride) in self.shape.iter().zip(&self.stride).rev() {
      if size != 1 && stride != expected {
        return false;
      }
      expected = expected.saturating_mul(size);
    }
    true
  }

  /// Stored bytes can be handed out as they are: row-major, no offset, our byte order, no lazy flags.
  pub fn is_plain(&self) -> bool {
    self.is_row_major() && self.storage_offset == 0 && !self.big_endian && !self.conj && !self.neg
  }
}

/// A Python value from a BYTE_IO item (or a tensor item's root): the one value model ([`crate::value::PyValue`])
/// owning its bytes. [`parse`] leaves tensors as [`PyValue::Record`]s.
pub type PyObject = PyValue<Vec<u8>>;

#[derive(Debug, PartialEq)]
pub enum RecordError {
  Zip(ZipError),
  Forbidden { module: String, name: String },
  Invalid(String),
}

fn invalid<T>(reason: impl Into<String>) -> Result<T, RecordError> {
  Err(RecordError::Invalid(reason.into()))
}

/// Globals a `torch.save` of tensors and plain Python values can reference (what `weights_only=True` permits).
pub fn record_allows(module: &str, name: &str) -> bool {
  match module {
    "torch._utils" => matches!(name, "_rebuild_tensor_v2" | "_rebuild_tensor_v3" | "_rebuild_parameter"),
    "torch" => torch_value_global(name) || DType::from_legacy_storage_class(name).is_some(),
    "torch.storage" => name == "UntypedStorage",
    "collections" => name == "OrderedDict",
    "builtins" | "__builtin__" => matches!(name, "set" | "frozenset" | "complex" | "bytes"),
    "_codecs" => name == "encode",
    _ => false,
  }
}

fn entry_bytes<R: ReadAt + ?Sized>(r: &R, e: &Entry, limit: u64) -> Result<Vec<u8>, RecordError> {
  let len = e.data.len() as u64;
  if len > limit {
    return invalid(format!("record {} is {len} bytes, over the limit of {limit}", e.name));
  }
  let mut buf = Vec::new();
  if buf.try_reserve_exact(e.data.len()).is_err() {
    return invalid(format!("cannot allocate {len} bytes for record {}", e.name));
  }
  buf.resize(e.data.len(), 0);
  r.read_at(e.data.start as u64, &mut buf).map_err(|err| {
    RecordError::Zip(ZipError::Read {
      offset: e.data.start as u64,
      len,
      kind: err.kind(),
      message: err.to_string(),
    })
  })?;
  Ok(buf)
}

/// Bytes at either end of an archive read at once: torch writes `data.pkl`, `byteorder` and the local headers
/// first and the central directory last, so two reads serve every structure [`parse`] needs, instead of one read
/// per structure (a record of a small tensor is read once, whole). Other reads go to the archive itself.
struct Windowed<'r, R: ?Sized> {
  r: &'r R,
  head: std::cell::OnceCell<Option<Vec<u8>>>,
  tail: std::cell::OnceCell<Option<Vec<u8>>>,
}

/// Bytes of each end of an archive that [`Windowed`] reads at once: torch's structures before and after a tensor's
/// bytes take under 1 KiB each (a 64×64 bf16 record: 704 bytes before its data, 857 after).
const ARCHIVE_WINDOW_BYTES: u64 = 2048;

impl<R: ReadAt + ?Sized> Windowed<'_, R> {
  /// The window `start..start + len` of the archive (None when reading it failed: reads then go to the archive,
  /// which reports the error for the bytes actually wanted).
  fn window<'s>(
    &'s self,
    cell: &'s std::cell::OnceCell<Option<Vec<u8>>>,
    start: u64,
    len: u64,
  ) -> Option<&'s [u8]> {
    cell
      .get_or_init(|| {
        let mut buf = vec![0u8; usize::try_from(len).ok()?];
        self.r.read_at(start, &mut buf).ok().map(|()| buf)
      })
      .as_deref()
  }
}

impl<R: ReadAt + ?Sized> ReadAt for Windowed<'_, R> {
  fn size(&self) -> u64 {
    self.r.size()
  }

  fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
    let total = self.r.size();
    // a small archive is one window
    let (head_len, tail_start) = if total <= 2 * ARCHIVE_WINDOW_BYTES {
      (total, total)
    } else {
      (ARCHIVE_WINDOW_BYTES, total - ARCHIVE_WINDOW_BYTES)
    };
    let end = offset.saturating_add(buf.len() as u64);
    let from = if end <= head_len {
      self.window(&self.head, 0, head_len).map(|w| (w, offset))
    } else if offset >= tail_start && end <= total {
      self.window(&self.tail, tail_start, total - tail_start).map(|w| (w, offset - tail_start))
    } else {
      None
    };
    match from {
      // inside the window: offset and length were checked against it above
      Some((w, at)) => {
        let at = at as usize;
        buf.copy_from_slice(&w[at..at + buf.len()]);
        Ok(())
      }
      None => self.r.read_at(offset, buf),
    }
  }
}

/// Unpickled `data.pkl`s, by their bytes, shared by the records of one checkpoint ([`parse_with`]): unpickling
/// is a pure function of the bytes (and the fixed allow-list), so a record whose `data.pkl` was seen before skips
/// it. Bounded by [`RECORD_PICKLE_MEMO_ENTRIES`] × [`RECORD_PICKLE_MEMO_BYTES`]; safe from any thread.
#[derive(Debug, Default)]
pub struct PickleMemo {
  values: Mutex<HashMap<Box<[u8]>, Arc<Value>>>,
}

impl PickleMemo {
  /// How many distinct `data.pkl`s are kept.
  pub fn len(&self) -> usize {
    self.values.lock().unwrap_or_else(|p| p.into_inner()).len()
  }

  /// Whether none is kept.
  pub fn is_empty(&self) -> bool {
    self.len() == 0
  }

  fn unpickle(&self, pkl: &[u8]) -> Result<Arc<Value>, RecordError> {
    if let Some(v) = self.values.lock().unwrap_or_else(|p| p.into_inner()).get(pkl) {
      return Ok(v.clone());
    }
    let v = Arc::new(unpickle_record(pkl)?);
    if pkl.len() <= RECORD_PICKLE_MEMO_BYTES {
      let mut values = self.values.lock().unwrap_or_else(|p| p.into_inner());
      if values.len() < RECORD_PICKLE_MEMO_ENTRIES {
        values.insert(pkl.into(), v.clone());
      }
    }
    Ok(v)
  }
}

fn unpickle_record(pkl: &[u8]) -> Result<Value, RecordError> {
  pickle::unpickle(pkl, &record_allows).map_err(|e| match e {
    pickle::UnpickleError::Forbidden { module, name } => RecordError::Forbidden { module, name },
    pickle::UnpickleError::Malformed { pos, reason } => {
      RecordError::Invalid(format!("data.pkl is not a valid pickle: {reason} (at byte {pos})"))
    }
  })
}

/// Parses the archive `r` holds and rebuilds its root object, reading only the zip structures, `byteorder` and
/// `data.pkl` (tensor bytes stay where they are).
pub fn parse<R: ReadAt + ?Sized>(r: &R) -> Result<PyObject, RecordError> {
  parse_with(r, None)
}

/// [`parse`], looking `data.pkl` up in `memo` first (and keeping it there).
pub fn parse_with<R: ReadAt + ?Sized>(r: &R, memo: Option<&PickleMemo>) -> Result<PyObject, RecordError> {
  let windowed = Windowed { r, head: std::cell::OnceCell::new(), tail: std::cell::OnceCell::new() };
  let r = &windowed;
  let archive = zip::parse(r).map_err(RecordError::Zip)?;
  let Some(pkl) = archive.get("data.pkl") else {
    return invalid("the archive has no data.pkl");
  };
  let big_endian = match archive.get("byteorder") {
    Some(e) => match &entry_bytes(r, e, 16)?[..] {
      b"little" => false,
      b"big" => true,
      other => return invalid(format!("unknown byteorder {:?}", String::from_utf8_lossy(other))),
    },
    // archives from torch ≤ 2.0 have no byteorder record: they are little-endian
    None => false,
  };
  let pkl = entry_bytes(r, pkl, MAX_OBJECT_BYTES)?;
  let root = match memo {
    Some(m) => m.unpickle(&pkl)?,
    None => Arc::new(unpickle_record(&pkl)?),
  };
  let cx = Rebuild { archive: &archive, big_endian };
  cx.convert(&root, 0)
}

struct Rebuild<'a> {
  archive: &'a Archive,
  big_endian: bool,
}

fn int(v: &Value, what: &str) -> Result<u64, RecordError> {
  match v {
    Value::Int(i) if *i >= 0 => Ok(*i as u64),
    _ => invalid(format!("{what} is not a non-negative int")),
  }
}

fn ints(v: &Value, what: &str) -> Result<Vec<u64>, RecordError> {
  let v = match v {
    Value::Object(o) if o.class.is("torch", "Size") && o.args.len() == 1 => &o.args[0],
    other => other,
  };
  match v.as_seq() {
    Some(items) => items.iter().map(|i| int(i, what)).collect(),
    None => invalid(format!("{what} is not a tuple of ints")),
  }
}

impl Rebuild<'_> {
  fn convert(&self, v: &Value, depth: usize) -> Result<PyObject, RecordError> {
    if depth > MAX_NESTING {
      return invalid("value nested too deeply");
    }
    let many = |items: &[Value]| -> Result<Vec<PyObject>, RecordError> {
      items.iter().map(|i| self.convert(i, depth + 1)).collect()
    };
    Ok(match v {
      Value::None => PyObject::None,
      Value::Bool(b) => PyObject::Bool(*b),
      Value::Int(i) => PyObject::Int(*i),
      Value::BigInt(b) => PyObject::BigInt(b.clone()),
      Value::Float(f) => PyObject::Float(*f),
      Value::Str(s) => PyObject::Str(s.clone()),
      Value::Bytes(b) => PyObject::Bytes(b.clone()),
      Value::List(items) | Value::Set(items) => PyObject::List(many(items)?),
      Value::Tuple(items) => PyObject::Tuple(many(items)?),
      Value::Dict(pairs) => {
        let mut out = Vec::with_capacity(pairs.len());
        for (k, v) in pairs {
          out.push((self.convert(k, depth + 1)?, self.convert(v, depth + 1)?));
        }
        PyObject::Dict(out)
      }
      // a bare dtype/layout value, e.g. a dtype stored in a config dict
      Value::Global(g) => PyObject::Str(g.to_string()),
      Value::Object(o) => self.object(o, depth)?,
      Value::PersistentId(_) => return invalid("a storage outside of a tensor"),
    })
  }

  fn object(&self, o: &Object, depth: usize) -> Result<PyObject, RecordError> {
    let c = &o.class;
    if c.is("torch._utils", "_rebuild_tensor_v2") || c.is("torch._utils", "_rebuild_tensor_v3") {
      return self.tensor(o).map(PyObject::Record);
    }
    if c.is("torch._utils", "_rebuild_parameter") {
      return match o.args.first() {
        Some(data) => self.convert(data, depth + 1),
        None => invalid("_rebuild_parameter without data"),
      };
    }
    if c.is("torch", "Size") {
      return Ok(PyObject::Tuple(
        ints(&Value::Object(Box::new(o.clone())), "torch.Size")?
          .into_iter()
          .map(|i| PyObject::Int(i as i64))
          .collect(),
      ));
    }
    if c.name == "complex" {
      return invalid("Python complex values are not supported");
    }
    invalid(format!("cannot rebuild an instance of {c}"))
  }

  fn tensor(&self, o: &Object) -> Result<TensorRecord, RecordError> {
    let v3 = o.class.name == "_rebuild_tensor_v3";
    let a = &o.args;
    if a.len() < 6 {
      return invalid(format!("{} with {} arguments", o.class.name, a.len()));
    }
    let Value::PersistentId(pid) = &a[0] else {
      return invalid("tensor storage is not a persistent id");
    };
    let Some(pid) = pid.as_seq() else {
      return invalid("tensor storage id is not a tuple");
    };
    if pid.len() < 5 || pid[0].as_str() != Some("storage") {
      return invalid("tensor storage id is not ('storage', type, key, location, numel)");
    }
    let Value::Global(storage_type) = &pid[1] else {
      return invalid("tensor storage type is not a class");
    };
    let Some(key) = pid[2].as_str() else {
      return invalid("tensor storage key is not a str");
    };
    let storage_numel = int(&pid[4], "storage numel")?;
    let (dtype, storage_bytes) = if v3 {
      let Some(Value::Global(g)) = a.get(6) else {
        return invalid("_rebuild_tensor_v3 without a dtype");
      };
      let Some(dtype) = DType::from_name(&g.name) else {
        return invalid(format!("unknown dtype {g}"));
      };
      (dtype, storage_numel)
    } else {
      let Some(dtype) = DType::from_legacy_storage_class(&storage_type.name) else {
        return invalid(format!("unknown storage class {storage_type}"));
      };
      (dtype, storage_numel.saturating_mul(dtype.size() as u64))
    };
    let Some(entry) = self.archive.get(&format!("data/{key}")) else {
      return invalid(format!("the archive has no record data/{key}"));
    };
    let record_len = entry.data.len() as u64;
    if record_len != storage_bytes {
      return invalid(format!(
        "record data/{key} holds {record_len} bytes, but its {dtype} storage declares {storage_bytes}"
      ));
    }
    let storage_offset = int(&a[1], "storage offset")?;
    let shape = ints(&a[2], "size")?;
    let stride = ints(&a[3], "stride")?;
    if shape.len() != stride.len() {
      return invalid(format!("size {shape:?} and stride {stride:?} have different lengths"));
    }
    if shape.len() > MAX_DIMS {
      return invalid(format!("a tensor with {} dimensions (distcp reads up to {MAX_DIMS})", shape.len()));
    }
    let Some(numel) = checked_numel(&shape) else {
      return invalid(format!("the element count of shape {shape:?} overflows 64 bits"));
    };
    let meta_arg = if v3 { a.get(7) } else { a.get(6) };
    let flag =
      |name: &str| meta_arg.and_then(|m| m.get(name)).is_some_and(|v| matches!(v, Value::Bool(true)));
    let rec = TensorRecord {
      dtype,
      shape,
      stride,
      storage_offset,
      storage: entry.data.clone(),
      big_endian: self.big_endian,
      conj: flag("conj"),
      neg: flag("neg"),
    };
    // every element the view can address must lie inside the storage
    if numel > 0 {
      // at most MAX_DIMS terms below 2^128 each: the sum fits in u128 unless a term is huge, checked anyway
      let mut last = Some(u128::from(rec.storage_offset));
      for (&s, &st) in rec.shape.iter().zip(&rec.stride) {
        last = last.and_then(|l| l.checked_add(u128::from(s - 1) * u128::from(st)));
      }
      let need = last.and_then(|l| (l + 1).checked_mul(dtype.size() as u128)).unwrap_or(u128::MAX);
      if need > u128::from(record_len) {
        return invalid(format!(
          "a {dtype} tensor of shape {:?} (stride {:?}, offset {}) needs {need} bytes, its record data/{key} has {record_len}",
          rec.shape, rec.stride, rec.storage_offset
        ));
      }
    }
    Ok(rec)
  }
}

#[cfg(test)]
mod tests {
  use super::*;

  /// Every read through the windows returns the archive's own bytes, at either end, across the window edges,
  /// for archives smaller than, equal to and larger than two windows; reads past the end fail as the archive does.
  #[test]
  fn windowed_reads_are_the_archive_bytes() {
    let w = ARCHIVE_WINDOW_BYTES as usize;
    for total in [0usize, 1, 100, 2 * w - 1, 2 * w, 2 * w + 1, 3 * w + 17, 10 * w] {
      let bytes: Vec<u8> = (0..total).map(|i| (i * 31 + i / 251) as u8).collect();
      let r =
        Windowed { r: bytes.as_slice(), head: std::cell::OnceCell::new(), tail: std::cell::OnceCell::new() };
      let mut cuts: Vec<usize> = vec![0, 1, 29, w - 1, w, w + 1, total / 2];
      cuts.extend([total.saturating_sub(w + 1), total.saturating_sub(w), total.saturating_sub(22), total]);
      for &from in &cuts {
        for len in [0usize, 1, 4, 22, 30, w, w + 5] {
          let mut got = vec![0u8; len];
          let want = bytes.get(from..from + len);
          match (r.read_at(from as u64, &mut got), want) {
            (Ok(()), Some(want)) => assert_eq!(got, want, "total {total}, {len} bytes at {from}"),
            (Err(_), None) => {}
            (res, want) => panic!("total {total}, {len} bytes at {from}: {res:?} vs {}", want.is_some()),
          }
        }
      }
    }
  }
}
