//! One DCP item as `torch.save` writes it: a tensor (`_rebuild_tensor_v2` with its legacy storage class, or
//! `_rebuild_tensor_v3` + `torch.storage.UntypedStorage` + dtype for the dtypes torch saves that way) or a plain
//! Python value (whose tensors, e.g. inside a tuple, become further storages of the same archive).
//!
//! Archive records in torch ≥ 2.7's order: `data.pkl`, `.format_version` ("1"), `.storage_alignment` ("64"),
//! `byteorder` ("little"), `data/0`, `data/1`, … (numeric order), `version` ("3\n"), `.data/serialization_id`.
//! Every torch since 2.0 reads these (older ones ignore the records they do not know). Storage bytes are written
//! straight from the caller's slices.

use crate::write::pickler::Pickler;
use crate::write::value::{SaveValue, TensorRef, MAX_DEPTH};
use crate::write::zip_writer::{ArchiveWriter, ALIGNMENT};
use std::io::{self, Write};

/// `data.pkl` of `value` and the storages it references, in key order (`data/0`, `data/1`, …).
#[derive(Debug)]
pub struct Pickled<'a> {
  pub data_pkl: Vec<u8>,
  pub storages: Vec<&'a [u8]>,
}

/// Pickles `value` as `torch.save` does (protocol 2). Errors describe a value that cannot be saved.
pub fn pickle_value<'a>(value: &SaveValue<'a>) -> Result<Pickled<'a>, String> {
  let mut p = Pickler::new();
  let mut storages = Vec::new();
  emit(&mut p, value, &mut storages, 0)?;
  Ok(Pickled { data_pkl: p.finish(), storages })
}

fn emit<'a>(
  p: &mut Pickler,
  v: &SaveValue<'a>,
  storages: &mut Vec<&'a [u8]>,
  depth: usize,
) -> Result<(), String> {
  if depth > MAX_DEPTH {
    return Err(format!("nested more than {MAX_DEPTH} levels deep"));
  }
  match v {
    SaveValue::None => p.none(),
    SaveValue::Bool(b) => p.bool(*b),
    SaveValue::Int(i) => p.int(*i),
    SaveValue::BigInt(b) => p.big_int(b),
    SaveValue::Float(f) => p.float(*f),
    SaveValue::Str(s) => p.str(s),
    SaveValue::Bytes(b) => p.bytes_value(b),
    SaveValue::List(items) => p.list(items.len(), |p, i| emit(p, &items[i], storages, depth + 1))?,
    SaveValue::Tuple(items) => p.tuple::<String>(items.len(), |p| {
      for x in items {
        emit(p, x, storages, depth + 1)?;
      }
      Ok(())
    })?,
    SaveValue::Dict(pairs) => p.dict(pairs.len(), |p, i| {
      emit(p, &pairs[i].0, storages, depth + 1)?;
      emit(p, &pairs[i].1, storages, depth + 1)
    })?,
    SaveValue::Tensor(t) => {
      t.check()?;
      let key = storages.len().to_string();
      storages.push(t.data);
      emit_tensor(p, t, &key);
    }
    // only the reader makes records; a caller that built one has no bytes to save
    SaveValue::Record(_) => return Err("an unread tensor record cannot be saved (read it first)".into()),
  }
  Ok(())
}

/// `Tensor.__reduce_ex__(2)` of a contiguous CPU tensor whose storage is persistent id `key`.
fn emit_tensor(p: &mut Pickler, t: &TensorRef, key: &str) {
  let legacy = t.dtype.legacy_storage_class();
  p.global("torch._utils", if legacy.is_some() { "_rebuild_tensor_v2" } else { "_rebuild_tensor_v3" });
  let nargs = if legacy.is_some() { 6 } else { 7 };
  let numel = t.numel().unwrap_or(0);
  let _ = p.tuple::<()>(nargs, |p| {
    // persistent id ('storage', storage type, key, location, numel): elements for typed storages, bytes for v3
    p.tuple::<()>(5, |p| {
      p.str_const("storage");
      match legacy {
        Some(class) => {
          p.global("torch", class);
          p.str_fresh(key);
          p.str_const("cpu");
          p.uint(numel);
        }
        None => {
          p.global("torch.storage", "UntypedStorage");
          p.str_fresh(key);
          p.str_const("cpu");
          p.uint(numel.saturating_mul(t.dtype.size() as u64));
        }
      }
      Ok(())
    })?;
    p.persistent_id();
    p.int(0); // storage offset
    p.int_tuple(&t.shape);
    p.int_tuple(&t.contiguous_strides());
    p.bool(false); // requires_grad
    p.global("collections", "OrderedDict"); // backward hooks: OrderedDict()
    p.tuple::<()>(0, |_| Ok(()))?;
    p.reduce();
    if legacy.is_none() {
      p.global("torch", t.dtype.name());
    }
    Ok(())
  });
  p.reduce();
}

/// `data.pkl` of a `{name: tensor}` dict whose i-th tensor is storage `data/i`, as `torch.save(state_dict)` writes
/// it; the storage bytes are written separately (see [`crate::convert`]'s `pytorch_model.bin`).
pub fn pickle_tensor_dict(tensors: &[(String, crate::dtype::DType, Vec<u64>)]) -> Vec<u8> {
  let mut p = Pickler::new();
  let _ = p.dict::<()>(tensors.len(), |p, i| {
    let (name, dtype, shape) = &tensors[i];
    p.str(name);
    emit_tensor(p, &TensorRef { dtype: *dtype, shape: shape.clone(), data: &[] }, &i.to_string());
    Ok(())
  });
  p.finish()
}

/// Writes the `torch.save` archive of an already pickled value; returns the output and the archive's length.
pub fn write_archive<W: Write>(out: W, pickled: &Pickled) -> io::Result<(W, u64)> {
  let mut a = ArchiveWriter::new(out);
  a.write_record("data.pkl", &pickled.data_pkl)?;
  a.write_record(".format_version", b"1")?;
  a.write_record(".storage_alignment", ALIGNMENT.to_string().as_bytes())?;
  a.write_record("byteorder", b"little")?;
  for (i, s) in pickled.storages.iter().enumerate() {
    a.write_record(&format!("data/{i}"), s)?;
  }
  a.finish()
}

/// `torch.save(value, out)`; returns the output and the number of bytes written.
pub fn write_value<W: Write>(out: W, value: &SaveValue) -> io::Result<(W, u64)> {
  let pickled = pickle_value(value).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
  write_archive(out, &pickled)
}

#[cfg(test)]
mod tests {
  use super::*;
  use crate::dtype::DType;
  use crate::torch_save::{self, PyObject};

  #[test]
  fn tensor_record_reads_back() {
    let data: Vec<u8> = (0..6u32).flat_map(|i| (i as f32).to_le_bytes()).collect();
    let t = SaveValue::Tensor(TensorRef { dtype: DType::Float32, shape: vec![2, 3], data: &data });
    let (buf, len) = write_value(Vec::new(), &t).unwrap();
    assert_eq!(len as usize, buf.len());
    let PyObject::Record(rec) = torch_save::parse(&buf).unwrap() else { panic!() };
    assert_eq!(rec.dtype, DType::Float32);
    assert_eq!(rec.shape, vec![2, 3]);
    assert_eq!(rec.stride, vec![3, 1]);
    assert_eq!(&buf[rec.storage.clone()], &data[..]);
    assert_eq!(rec.storage.start % 64, 0);
  }

  /// Records of same-shaped tensors share their unpickled `data.pkl` through a memo, and read back exactly as
  /// without it; the memo stops growing at its bound and records past it still parse.
  #[test]
  fn pickle_memo_shares_identical_data_pkl() {
    use crate::limits::RECORD_PICKLE_MEMO_ENTRIES;
    let memo = torch_save::PickleMemo::default();
    let record = |shape: Vec<u64>, fill: u8| {
      let data = vec![fill; shape.iter().product::<u64>() as usize * 4];
      let t = SaveValue::Tensor(TensorRef { dtype: DType::Float32, shape, data: &data });
      write_value(Vec::new(), &t).unwrap().0
    };
    let check = |buf: &Vec<u8>| {
      let with = torch_save::parse_with(buf, Some(&memo)).unwrap();
      assert_eq!(with, torch_save::parse(buf).unwrap());
      with
    };
    // same shape, other bytes: one memo entry, each record pointing at its own storage
    let (a, b) = (record(vec![64, 64], 1), record(vec![64, 64], 2));
    check(&a);
    let PyObject::Record(rb) = check(&b) else { panic!() };
    assert_eq!(memo.len(), 1);
    assert!(b[rb.storage].iter().all(|&x| x == 2));
    // another shape: another entry
    check(&record(vec![64, 32], 1));
    assert_eq!(memo.len(), 2);
    // past the bound: no more entries, and the records still read back
    for n in 0..RECORD_PICKLE_MEMO_ENTRIES as u64 + 10 {
      let PyObject::Record(r) = check(&record(vec![n + 1], 3)) else { panic!() };
      assert_eq!(r.shape, vec![n + 1]);
    }
    assert_eq!(memo.len(), RECORD_PICKLE_MEMO_ENTRIES);
  }

  #[test]
  fn v3_dtypes_and_zero_dims() {
    for (dtype, shape) in [
      (DType::Float8E4M3Fn, vec![3]),
      (DType::UInt16, vec![2, 0, 2]),
      (DType::BFloat16, vec![]),
      (DType::Complex32, vec![1, 1]),
    ] {
      let n: u64 = shape.iter().product();
      let data = vec![0x11u8; n as usize * dtype.size()];
      let t = SaveValue::Tensor(TensorRef { dtype, shape: shape.clone(), data: &data });
      let (buf, _) = write_value(Vec::new(), &t).unwrap();
      let PyObject::Record(rec) = torch_save::parse(&buf).unwrap() else { panic!() };
      assert_eq!((rec.dtype, rec.shape), (dtype, shape));
      assert_eq!(&buf[rec.storage.clone()], &data[..]);
    }
  }

  #[test]
  fn values_read_back() {
    let v = SaveValue::Dict(vec![
      (SaveValue::Str("lr".into()), SaveValue::Float(0.1)),
      (
        SaveValue::Str("betas".into()),
        SaveValue::Tuple(vec![SaveValue::Float(0.9), SaveValue::Float(0.999)]),
      ),
      (SaveValue::Str("n".into()), SaveValue::List(vec![SaveValue::Int(-7), SaveValue::None])),
    ]);
    let (buf, _) = write_value(Vec::new(), &v).unwrap();
    let got = torch_save::parse(&buf).unwrap();
    assert_eq!(
      got,
      PyObject::Dict(vec![
        (PyObject::Str("lr".into()), PyObject::Float(0.1)),
        (PyObject::Str("betas".into()), PyObject::Tuple(vec![PyObject::Float(0.9), PyObject::Float(0.999)])),
        (PyObject::Str("n".into()), PyObject::List(vec![PyObject::Int(-7), PyObject::None])),
      ])
    );
  }

  #[test]
  fn short_tensor_data_is_an_error() {
    let t = SaveValue::Tensor(TensorRef { dtype: DType::Float64, shape: vec![2], data: &[0; 15] });
    let e = pickle_value(&t).unwrap_err();
    assert!(e.contains("needs 16 bytes, its data has 15"), "{e}");
  }
}
