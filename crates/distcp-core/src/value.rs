//! The one value model: a Python value as a state dict holds it and as a checkpoint gives it back
//! ([`PyValue`]; [`SaveValue`] borrows the caller's bytes, [`crate::torch_save::PyObject`] owns what was read),
//! Python's `str(key)` for dict keys, and the tagged JSON that carries such a tree across a language boundary (the
//! Node binding), in both directions.

use crate::dtype::DType;
use crate::pickle::BigInt;
use crate::torch_save::TensorRecord;
use crate::write::pickler::bigint_from_decimal;
use serde_json::{json, Value as Json};

/// Deepest nesting accepted for a value, read or written (each level costs stack in the traversal and the pickler).
/// One limit for reading and writing, so whatever is saved reads back.
pub const MAX_DEPTH: usize = crate::limits::MAX_NESTING;

/// A dense, row-major, little-endian tensor whose bytes are a `B`: borrowed from the caller when saving
/// ([`TensorRef`], never copied by the writer), owned when read from a checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor<B> {
  /// Element type.
  pub dtype: DType,
  /// Shape; `[]` for a scalar.
  pub shape: Vec<u64>,
  /// Exactly `numel × dtype.size()` bytes, row-major, little-endian.
  pub data: B,
}

/// A tensor to save, over the caller's bytes.
pub type TensorRef<'a> = Tensor<&'a [u8]>;

impl<B: AsRef<[u8]>> Tensor<B> {
  /// Number of elements, or `None` on overflow.
  pub fn numel(&self) -> Option<u64> {
    self.shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d))
  }

  /// Bytes the shape and dtype call for, or `None` on overflow.
  pub fn expected_len(&self) -> Option<u64> {
    self.numel()?.checked_mul(self.dtype.size() as u64)
  }

  /// Checks that `data` holds exactly shape × element size bytes.
  pub fn check(&self) -> Result<(), String> {
    // what the reader refuses is never written: a checkpoint distcp could not open again
    if self.shape.len() > crate::limits::MAX_DIMS {
      return Err(format!(
        "a tensor with {} dimensions (distcp reads up to {})",
        self.shape.len(),
        crate::limits::MAX_DIMS
      ));
    }
    let len = self.data.as_ref().len();
    match self.expected_len() {
      Some(n) if n == len as u64 => Ok(()),
      Some(n) => {
        Err(format!("a {} tensor of shape {:?} needs {n} bytes, its data has {len}", self.dtype, self.shape))
      }
      None => Err(format!("shape {:?} is too large", self.shape)),
    }
  }

  /// Row-major element strides, as torch computes them for a contiguous tensor (a 0 in the shape counts as 1).
  pub fn contiguous_strides(&self) -> Vec<u64> {
    let mut strides = vec![1u64; self.shape.len()];
    for i in (0..self.shape.len().saturating_sub(1)).rev() {
      strides[i] = strides[i + 1].saturating_mul(self.shape[i + 1].max(1));
    }
    strides
  }
}

/// A Python value as distcp exchanges it: what a state dict holds when it is saved ([`SaveValue`], bytes borrowed
/// from the caller) and what a checkpoint's item gives back ([`crate::torch_save::PyObject`], bytes owned). One
/// type, one tagged-JSON codec for both directions ([`to_tagged_json`], [`from_tagged_json`]); the unpickler's
/// own vocabulary ([`crate::pickle::Value`]) stays separate.
#[derive(Debug, Clone, PartialEq)]
pub enum PyValue<B> {
  /// Python `None`.
  None,
  /// Python `bool`.
  Bool(bool),
  /// Python `int` that fits in 64 bits.
  Int(i64),
  /// Python `int` beyond 64 bits.
  BigInt(BigInt),
  /// Python `float` (exact bits: NaN payloads, ±0 and ±∞ kept).
  Float(f64),
  /// Python `str`.
  Str(String),
  /// Python `bytes`.
  Bytes(B),
  /// Python `list`: recursed into by torch's flattening when it holds tensors (see [`crate::write::Layout`]).
  List(Vec<PyValue<B>>),
  /// Python `tuple`: always one leaf, saved as a pickled object.
  Tuple(Vec<PyValue<B>>),
  /// Keys in insertion order (Python's iteration order, hence the order of the flat keys).
  Dict(Vec<(PyValue<B>, PyValue<B>)>),
  /// A tensor with its bytes (saved as one chunk covering the whole tensor).
  Tensor(Tensor<B>),
  /// A tensor inside a `torch.save` archive, not read yet (only [`crate::torch_save::parse`] makes these;
  /// [`crate::Checkpoint::read_object`] reads each into a [`PyValue::Tensor`]).
  Record(TensorRecord),
}

/// A value to save: what a state dict holds, its tensors and bytes borrowed from the caller.
pub type SaveValue<'a> = PyValue<&'a [u8]>;

impl<B: AsRef<[u8]>> PyValue<B> {
  /// The same value over borrowed bytes: a value read from a checkpoint, ready to be saved.
  pub fn borrowed(&self) -> SaveValue<'_> {
    fn many<B: AsRef<[u8]>>(v: &[PyValue<B>]) -> Vec<SaveValue<'_>> {
      v.iter().map(PyValue::borrowed).collect()
    }
    match self {
      PyValue::None => PyValue::None,
      PyValue::Bool(b) => PyValue::Bool(*b),
      PyValue::Int(i) => PyValue::Int(*i),
      PyValue::BigInt(b) => PyValue::BigInt(b.clone()),
      PyValue::Float(f) => PyValue::Float(*f),
      PyValue::Str(s) => PyValue::Str(s.clone()),
      PyValue::Bytes(b) => PyValue::Bytes(b.as_ref()),
      PyValue::List(v) => PyValue::List(many(v)),
      PyValue::Tuple(v) => PyValue::Tuple(many(v)),
      PyValue::Dict(pairs) => {
        PyValue::Dict(pairs.iter().map(|(k, v)| (k.borrowed(), v.borrowed())).collect())
      }
      PyValue::Tensor(t) => {
        PyValue::Tensor(Tensor { dtype: t.dtype, shape: t.shape.clone(), data: t.data.as_ref() })
      }
      PyValue::Record(r) => PyValue::Record(r.clone()),
    }
  }
}

impl<B> PyValue<B> {
  /// The Python type name of the value, for error messages.
  pub fn type_name(&self) -> &'static str {
    match self {
      PyValue::None => "None",
      PyValue::Bool(_) => "bool",
      PyValue::Int(_) | PyValue::BigInt(_) => "int",
      PyValue::Float(_) => "float",
      PyValue::Str(_) => "str",
      PyValue::Bytes(_) => "bytes",
      PyValue::List(_) => "list",
      PyValue::Tuple(_) => "tuple",
      PyValue::Dict(_) => "dict",
      PyValue::Tensor(_) => "tensor",
      PyValue::Record(_) => "unread tensor record",
    }
  }

  /// `str(key)` in Python, for the dict keys the flattening turns into path elements (and that a value read in
  /// plain mode names its keys by).
  pub fn key_string(&self) -> Result<String, String> {
    Ok(match self {
      PyValue::Str(s) => s.clone(),
      PyValue::Int(i) => i.to_string(),
      PyValue::BigInt(b) => b.to_decimal(),
      PyValue::Bool(true) => "True".into(),
      PyValue::Bool(false) => "False".into(),
      PyValue::None => "None".into(),
      PyValue::Float(f) => python_float_repr(*f),
      other => return Err(format!("a {} cannot be a key of a dict that is flattened", other.type_name())),
    })
  }
}

/// Python's `repr(float)`: shortest round-trip digits, exponent form below 1e-4 and from 1e16 on.
pub fn python_float_repr(f: f64) -> String {
  if f.is_nan() {
    return "nan".into();
  }
  if f.is_infinite() {
    return if f > 0.0 { "inf" } else { "-inf" }.into();
  }
  if f == 0.0 {
    return if f.is_sign_negative() { "-0.0" } else { "0.0" }.into();
  }
  // Rust's `{:e}` gives the same shortest digits: "d.ddde<exp>"
  let sci = format!("{:e}", f.abs());
  let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
  let exp: i32 = exp.parse().unwrap_or(0);
  let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
  let decpt = exp + 1;
  let sign = if f < 0.0 { "-" } else { "" };
  let n = digits.len() as i32;
  if !(-3..=16).contains(&decpt) {
    let rest = &digits[1..];
    let dot = if rest.is_empty() { String::new() } else { format!(".{rest}") };
    let esign = if exp < 0 { '-' } else { '+' };
    return format!("{sign}{}{dot}e{esign}{:02}", &digits[..1], exp.abs());
  }
  if decpt <= 0 {
    format!("{sign}0.{}{digits}", "0".repeat((-decpt) as usize))
  } else if decpt >= n {
    format!("{sign}{digits}{}.0", "0".repeat((decpt - n) as usize))
  } else {
    format!("{sign}{}.{}", &digits[..decpt as usize], &digits[decpt as usize..])
  }
}

/// Decodes the tagged JSON the Node binding sends (what [`to_tagged_json`] writes):
/// `null`, booleans, integer numbers (ints), strings, arrays (lists), `{"$f": "<16 hex digits of the IEEE bits>"}`
/// (float), `{"$i": "<decimal>"}` (int of any size), `{"$t": [...]}` (tuple), `{"$d": [[key, value], ...]}`
/// (dict, in order), `{"$b": n}` (bytes: `buffers[n]`), `{"$tensor": n, "dtype": "float32", "shape": [...]}`
/// (tensor over `buffers[n]`). Errors name the place in the tree.
pub fn from_tagged_json<'a>(v: &Json, buffers: &[&'a [u8]]) -> Result<SaveValue<'a>, String> {
  decode(v, buffers, "", 0)
}

/// Largest integer a JSON number carries exactly (a JS number); beyond it ints are tagged `$i`.
const MAX_SAFE_INTEGER: i64 = (1 << 53) - 1;

/// Encodes `v` as the tagged JSON [`from_tagged_json`] reads (the other direction of the same codec), moving each
/// bytes and tensor buffer into `buffers`. A dict entry whose key is not a `str` carries Python's `str(key)` as a
/// third element, so a reader that wants plain-object keys gets torch's names without re-deriving the rule. An
/// unread tensor record (a bug in the caller: [`crate::Checkpoint::read_object`] reads them all) becomes
/// `{"$error": …}`.
pub fn to_tagged_json<B>(v: PyValue<B>, buffers: &mut Vec<B>) -> Json {
  match v {
    PyValue::None => Json::Null,
    PyValue::Bool(b) => Json::Bool(b),
    PyValue::Int(i) if (-MAX_SAFE_INTEGER..=MAX_SAFE_INTEGER).contains(&i) => json!(i),
    PyValue::Int(i) => json!({ "$i": i.to_string() }),
    PyValue::BigInt(b) => json!({ "$i": b.to_decimal() }),
    PyValue::Float(f) => json!({ "$f": format!("{:016x}", f.to_bits()) }),
    PyValue::Str(s) => Json::String(s),
    PyValue::Bytes(b) => {
      buffers.push(b);
      json!({ "$b": buffers.len() - 1 })
    }
    PyValue::List(items) => Json::Array(items.into_iter().map(|o| to_tagged_json(o, buffers)).collect()),
    PyValue::Tuple(items) => {
      json!({ "$t": items.into_iter().map(|o| to_tagged_json(o, buffers)).collect::<Vec<_>>() })
    }
    PyValue::Dict(pairs) => json!({
      "$d": pairs
        .into_iter()
        .map(|(k, v)| {
          let name = match &k {
            PyValue::Str(_) => None,
            other => other.key_string().ok(),
          };
          let (k, v) = (to_tagged_json(k, buffers), to_tagged_json(v, buffers));
          match name {
            None => json!([k, v]),
            Some(s) => json!([k, v, s]),
          }
        })
        .collect::<Vec<_>>()
    }),
    PyValue::Tensor(t) => {
      buffers.push(t.data);
      json!({ "$tensor": buffers.len() - 1, "dtype": t.dtype.name(), "shape": t.shape })
    }
    PyValue::Record(_) => json!({ "$error": "unread tensor" }),
  }
}

fn at(path: &str) -> String {
  if path.is_empty() {
    "at the root".into()
  } else {
    format!("at {path}")
  }
}

fn decode<'a>(v: &Json, buffers: &[&'a [u8]], path: &str, depth: usize) -> Result<SaveValue<'a>, String> {
  use serde_json::Value as J;
  if depth > MAX_DEPTH {
    return Err(format!("{}: nested more than {MAX_DEPTH} levels deep", at(path)));
  }
  let buffer = |n: &J, what: &str| -> Result<&'a [u8], String> {
    n.as_u64()
      .and_then(|i| buffers.get(i as usize).copied())
      .ok_or_else(|| format!("{}: {what} refers to a missing buffer {n}", at(path)))
  };
  Ok(match v {
    J::Null => SaveValue::None,
    J::Bool(b) => SaveValue::Bool(*b),
    J::Number(n) => match n.as_i64() {
      Some(i) => SaveValue::Int(i),
      None => match n.as_u64() {
        Some(u) => SaveValue::BigInt(bigint_from_decimal(&u.to_string()).unwrap_or(BigInt(Vec::new()))),
        None => {
          return Err(format!("{}: untagged non-integer number {n} (floats are {{\"$f\": hex}})", at(path)))
        }
      },
    },
    J::String(s) => SaveValue::Str(s.clone()),
    J::Array(items) => SaveValue::List(
      items
        .iter()
        .enumerate()
        .map(|(i, x)| decode(x, buffers, &format!("{path}[{i}]"), depth + 1))
        .collect::<Result<_, _>>()?,
    ),
    J::Object(o) => {
      if let Some(h) = o.get("$f") {
        let bits = h.as_str().and_then(|s| u64::from_str_radix(s, 16).ok());
        match bits {
          Some(b) => SaveValue::Float(f64::from_bits(b)),
          None => return Err(format!("{}: bad float encoding {h}", at(path))),
        }
      } else if let Some(d) = o.get("$i") {
        let digits = d.as_str().map_or(0, |s| s.trim_start_matches('-').len());
        if digits > crate::limits::MAX_INT_DIGITS {
          return Err(format!(
            "{}: an int of {digits} digits (distcp saves ints up to {} digits)",
            at(path),
            crate::limits::MAX_INT_DIGITS
          ));
        }
        let Some(b) = d.as_str().and_then(bigint_from_decimal) else {
          return Err(format!("{}: bad int encoding {d}", at(path)));
        };
        match b.0.len() {
          0..=8 => {
            let negative = b.is_negative();
            let mut w = [if negative { 0xff } else { 0 }; 8];
            w[..b.0.len()].copy_from_slice(&b.0);
            SaveValue::Int(i64::from_le_bytes(w))
          }
          _ => SaveValue::BigInt(b),
        }
      } else if let Some(t) = o.get("$t") {
        let Some(items) = t.as_array() else {
          return Err(format!("{}: a tuple must be an array", at(path)));
        };
        SaveValue::Tuple(
          items
            .iter()
            .enumerate()
            .map(|(i, x)| decode(x, buffers, &format!("{path}[{i}]"), depth + 1))
            .collect::<Result<_, _>>()?,
        )
      } else if let Some(d) = o.get("$d") {
        let Some(pairs) = d.as_array() else {
          return Err(format!("{}: a dict must be an array of pairs", at(path)));
        };
        let mut out = Vec::with_capacity(pairs.len());
        for p in pairs {
          // a third element is the key's str() that `to_tagged_json` adds for readers: derived, so not read
          let (k, x) = match p.as_array().map(Vec::as_slice) {
            Some([k, x]) | Some([k, x, J::String(_)]) => (k, x),
            _ => return Err(format!("{}: a dict entry must be a [key, value] pair", at(path))),
          };
          let key = decode(k, buffers, path, depth + 1)?;
          let label = match &key {
            SaveValue::Str(s) => s.clone(),
            other => other.key_string().unwrap_or_else(|_| "?".into()),
          };
          let child = if path.is_empty() { label } else { format!("{path}.{label}") };
          let value = decode(x, buffers, &child, depth + 1)?;
          out.push((key, value));
        }
        SaveValue::Dict(out)
      } else if let Some(b) = o.get("$b") {
        SaveValue::Bytes(buffer(b, "bytes")?)
      } else if let Some(n) = o.get("$tensor") {
        let data = buffer(n, "tensor")?;
        let dtype_name = o.get("dtype").and_then(|d| d.as_str()).unwrap_or("");
        let Some(dtype) = DType::from_name(dtype_name).filter(|d| d.name() == dtype_name) else {
          return Err(format!("{}: unknown dtype `{dtype_name}`", at(path)));
        };
        let Some(shape) = o.get("shape").and_then(|s| s.as_array()) else {
          return Err(format!("{}: tensor without a shape", at(path)));
        };
        let shape = shape
          .iter()
          .map(|d| {
            d.as_u64().ok_or_else(|| format!("{}: shape entries must be non-negative integers", at(path)))
          })
          .collect::<Result<Vec<u64>, String>>()?;
        SaveValue::Tensor(TensorRef { dtype, shape, data })
      } else {
        return Err(format!("{}: unknown tagged value {v}", at(path)));
      }
    }
  })
}

#[cfg(test)]
mod tests {
  use super::*;

  #[test]
  fn a_tensor_with_more_dimensions_than_the_reader_takes_is_refused() {
    let at = |dims: usize| TensorRef { dtype: DType::Float32, shape: vec![1; dims], data: &[0u8; 4] }.check();
    assert_eq!(at(crate::limits::MAX_DIMS), Ok(()));
    assert_eq!(
      at(crate::limits::MAX_DIMS + 1),
      Err("a tensor with 65 dimensions (distcp reads up to 64)".to_owned())
    );
  }

  #[test]
  fn float_repr_matches_python() {
    // repr() of each, from CPython 3.11
    let cases = [
      (1.0, "1.0"),
      (0.1, "0.1"),
      (1e-5, "1e-05"),
      (1e16, "1e+16"),
      (1.5e17, "1.5e+17"),
      (123456789012345678.0, "1.2345678901234568e+17"),
      (0.0001, "0.0001"),
      (-0.0, "-0.0"),
      (f64::INFINITY, "inf"),
      (f64::NAN, "nan"),
      (5e-324, "5e-324"),
      (f64::MAX, "1.7976931348623157e+308"),
      (2.5, "2.5"),
      (100.0, "100.0"),
      (1e15, "1000000000000000.0"),
      (9999999999999998.0, "9999999999999998.0"),
      (-0.001, "-0.001"),
    ];
    for (f, want) in cases {
      assert_eq!(python_float_repr(f), want);
    }
  }

  #[test]
  fn strides_treat_empty_dims_as_one() {
    let t = |shape: &[u64]| {
      TensorRef { dtype: DType::Float32, shape: shape.to_vec(), data: &[] }.contiguous_strides()
    };
    assert_eq!(t(&[2, 0, 3]), vec![3, 3, 1]);
    assert_eq!(t(&[3, 0]), vec![1, 1]);
    assert_eq!(t(&[2, 3]), vec![3, 1]);
    assert_eq!(t(&[]), Vec::<u64>::new());
  }

  #[test]
  fn tagged_json_decodes() {
    let buf: &[u8] = &[1, 2, 3, 4];
    let v: serde_json::Value = serde_json::from_str(
      r#"{"$d": [["a", 1], ["b", {"$f": "3ff0000000000000"}], ["c", {"$t": [null, true]}],
                 ["d", {"$i": "-1180591620717411303424"}], ["e", {"$b": 0}], ["n", {"$i": "5"}],
                 ["t", {"$tensor": 0, "dtype": "float32", "shape": [1]}]]}"#,
    )
    .unwrap();
    let d = from_tagged_json(&v, &[buf]).unwrap();
    let SaveValue::Dict(pairs) = d else { panic!() };
    assert_eq!(pairs[0].1, SaveValue::Int(1));
    assert_eq!(pairs[1].1, SaveValue::Float(1.0));
    assert_eq!(pairs[2].1, SaveValue::Tuple(vec![SaveValue::None, SaveValue::Bool(true)]));
    assert!(matches!(&pairs[3].1, SaveValue::BigInt(b) if b.to_decimal() == "-1180591620717411303424"));
    assert_eq!(pairs[4].1, SaveValue::Bytes(buf));
    assert_eq!(pairs[5].1, SaveValue::Int(5));
    assert!(matches!(&pairs[6].1, SaveValue::Tensor(t) if t.dtype == DType::Float32 && t.check().is_ok()));
  }

  #[test]
  fn tagged_json_errors_name_the_place() {
    let bad = |s: &str| from_tagged_json(&serde_json::from_str(s).unwrap(), &[]).unwrap_err();
    assert!(
      bad(r#"{"$d": [["a", {"$d": [["b", 1.5]]}]]}"#).contains("at a.b"),
      "{}",
      bad(r#"{"$d": [["a", {"$d": [["b", 1.5]]}]]}"#)
    );
    assert!(bad(r#"{"$tensor": 0, "dtype": "float32", "shape": [1]}"#).contains("missing buffer"));
    assert!(bad(r#"{"$d": [["x", {"$x": 1}]]}"#).contains("unknown tagged value"));
    let e = from_tagged_json(
      &serde_json::from_str(r#"{"$tensor": 0, "dtype": "float128", "shape": [1]}"#).unwrap(),
      &[&[0u8; 4]],
    )
    .unwrap_err();
    assert!(e.contains("unknown dtype `float128`"));
  }

  #[test]
  fn tagged_json_round_trips_a_read_value() {
    // every variant a read value can hold, through the one codec: encode (reads) then decode (saves)
    let big = bigint_from_decimal("-1180591620717411303424").unwrap();
    let v: PyValue<Vec<u8>> = PyValue::Dict(vec![
      (PyValue::Str("n".into()), PyValue::None),
      (
        PyValue::Int(1),
        PyValue::List(vec![PyValue::Bool(true), PyValue::Int(1 << 60), PyValue::BigInt(big)]),
      ),
      (PyValue::Float(1e-5), PyValue::Tuple(vec![PyValue::Float(-0.0), PyValue::Float(f64::NAN)])),
      (PyValue::Bool(false), PyValue::Bytes(vec![1, 2, 3])),
      (
        PyValue::None,
        PyValue::Tensor(Tensor { dtype: DType::BFloat16, shape: vec![2], data: vec![0, 0x3f, 0x80, 0x3f] }),
      ),
    ]);
    let mut buffers = Vec::new();
    let json = to_tagged_json(v.clone(), &mut buffers);
    // non-str keys carry Python's str(key) for readers
    let entries = json["$d"].as_array().unwrap();
    assert_eq!(entries[1][2], "1");
    assert_eq!(entries[2][2], "1e-05");
    assert_eq!(entries[3][2], "False");
    assert_eq!(entries[4][2], "None");
    assert_eq!(entries[0].as_array().unwrap().len(), 2);
    let slices: Vec<&[u8]> = buffers.iter().map(Vec::as_slice).collect();
    let back = from_tagged_json(&json, &slices).unwrap();
    // NaN != NaN: compare through Debug, which prints the same bits the same way
    assert_eq!(format!("{back:?}"), format!("{:?}", v.borrowed()));
    let PyValue::Dict(pairs) = &back else { panic!() };
    let PyValue::Tuple(t) = &pairs[2].1 else { panic!() };
    assert!(matches!(t[0], PyValue::Float(z) if z.to_bits() == (-0.0f64).to_bits()));
  }
}
