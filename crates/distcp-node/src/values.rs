//! Python values from BYTE_IO items, encoded as tagged JSON plus side buffers; `src/values.ts` decodes them.
//! Tags keep what JSON would lose: floats (`$f`, exact bits, NaN/±0/∞), big ints (`$i`), tuples (`$t`), dicts
//! with their key types and order (`$d`), bytes and tensors (`$b`, `$tensor`: index into the buffers).

use distcp_core::torch_save::PyObject;
use serde_json::{json, Value};

const MAX_SAFE: i64 = (1 << 53) - 1;

pub fn encode(obj: PyObject, buffers: &mut Vec<Vec<u8>>) -> Value {
  match obj {
    PyObject::None => Value::Null,
    PyObject::Bool(b) => Value::Bool(b),
    PyObject::Int(i) if (-MAX_SAFE..=MAX_SAFE).contains(&i) => json!(i),
    PyObject::Int(i) => json!({ "$i": i.to_string() }),
    PyObject::BigInt(b) => json!({ "$i": b.to_decimal() }),
    PyObject::Float(f) => json!({ "$f": format!("{:016x}", f.to_bits()) }),
    PyObject::Str(s) => Value::String(s),
    PyObject::Bytes(b) => {
      buffers.push(b);
      json!({ "$b": buffers.len() - 1 })
    }
    PyObject::List(items) => Value::Array(items.into_iter().map(|o| encode(o, buffers)).collect()),
    PyObject::Tuple(items) => {
      json!({ "$t": items.into_iter().map(|o| encode(o, buffers)).collect::<Vec<_>>() })
    }
    // a non-str key carries Python's str(key) as a third element, so plain-object keys match torch's flat keys
    PyObject::Dict(pairs) => json!({
      "$d": pairs
        .into_iter()
        .map(|(k, v)| match (&k, distcp_core::write::value::read_key_string(&k)) {
          (PyObject::Str(_), _) | (_, None) => json!([encode(k, buffers), encode(v, buffers)]),
          (_, Some(s)) => json!([encode(k, buffers), encode(v, buffers), s]),
        })
        .collect::<Vec<_>>()
    }),
    PyObject::TensorData { dtype, shape, data } => {
      buffers.push(data);
      json!({ "$tensor": buffers.len() - 1, "dtype": dtype.name(), "shape": shape })
    }
    // `read_object` materialises every tensor; a bare record here would be a bug, reported as a value
    PyObject::Tensor(_) => json!({ "$error": "unread tensor" }),
  }
}
