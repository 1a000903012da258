use std::fmt;

/// A Python global (`module.qualname`) as pickled; never resolved to anything but its name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Global {
  pub module: String,
  pub name: String,
}

impl Global {
  pub fn is(&self, module: &str, name: &str) -> bool {
    self.module == module && self.name == name
  }
}

impl fmt::Display for Global {
  fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    write!(f, "{}.{}", self.module, self.name)
  }
}

/// An instance built by `REDUCE` (`class(*args)`) or `NEWOBJ` (`class.__new__(class, *args)`), with the state a
/// later `BUILD` gave it.
#[derive(Debug, Clone, PartialEq)]
pub struct Object {
  pub class: Global,
  pub args: Vec<Value>,
  pub state: Option<Value>,
}

/// An integer too wide for i64: little-endian two's complement, as pickle's LONG1/LONG4 store it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BigInt(pub Vec<u8>);

impl BigInt {
  pub fn is_negative(&self) -> bool {
    self.0.last().is_some_and(|b| b & 0x80 != 0)
  }

  /// Magnitude as little-endian u64 words, and the sign.
  pub fn to_words(&self) -> (bool, Vec<u64>) {
    let negative = self.is_negative();
    let mut bytes = self.0.clone();
    if negative {
      // two's complement → magnitude
      let mut carry = true;
      for b in bytes.iter_mut() {
        *b = !*b;
        if carry {
          let (v, c) = b.overflowing_add(1);
          *b = v;
          carry = c;
        }
      }
    }
    let words = bytes
      .chunks(8)
      .map(|c| {
        let mut w = [0u8; 8];
        w[..c.len()].copy_from_slice(c);
        u64::from_le_bytes(w)
      })
      .collect();
    (negative, words)
  }

  pub fn to_decimal(&self) -> String {
    let (negative, mut words) = self.to_words();
    let mut digits = Vec::new();
    while words.iter().any(|&w| w != 0) {
      let mut rem: u128 = 0;
      for w in words.iter_mut().rev() {
        let cur = (rem << 64) | u128::from(*w);
        *w = (cur / 10) as u64;
        rem = cur % 10;
      }
      digits.push(b'0' + rem as u8);
    }
    if digits.is_empty() {
      digits.push(b'0');
    }
    if negative {
      digits.push(b'-');
    }
    digits.reverse();
    String::from_utf8(digits).unwrap_or_default()
  }
}

/// What an unpickled stream evaluates to. Containers keep insertion order, as Python's do.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
  None,
  Bool(bool),
  Int(i64),
  BigInt(BigInt),
  Float(f64),
  Str(String),
  Bytes(Vec<u8>),
  List(Vec<Value>),
  Tuple(Vec<Value>),
  Dict(Vec<(Value, Value)>),
  Set(Vec<Value>),
  Global(Box<Global>),
  Object(Box<Object>),
  PersistentId(Box<Value>),
}

impl Value {
  pub fn as_str(&self) -> Option<&str> {
    match self {
      Value::Str(s) => Some(s),
      _ => None,
    }
  }

  pub fn as_int(&self) -> Option<i64> {
    match self {
      Value::Int(i) => Some(*i),
      Value::Bool(b) => Some(i64::from(*b)),
      _ => None,
    }
  }

  /// Items of a tuple or a list.
  pub fn as_seq(&self) -> Option<&[Value]> {
    match self {
      Value::Tuple(v) | Value::List(v) => Some(v),
      _ => None,
    }
  }

  pub fn as_dict(&self) -> Option<&[(Value, Value)]> {
    match self {
      Value::Dict(v) => Some(v),
      _ => None,
    }
  }

  pub fn as_object(&self) -> Option<&Object> {
    match self {
      Value::Object(o) => Some(o),
      _ => None,
    }
  }

  /// Look up a string key in a dict.
  pub fn get(&self, key: &str) -> Option<&Value> {
    self.as_dict()?.iter().find(|(k, _)| k.as_str() == Some(key)).map(|(_, v)| v)
  }

  pub fn type_name(&self) -> &'static str {
    match self {
      Value::None => "None",
      Value::Bool(_) => "bool",
      Value::Int(_) | Value::BigInt(_) => "int",
      Value::Float(_) => "float",
      Value::Str(_) => "str",
      Value::Bytes(_) => "bytes",
      Value::List(_) => "list",
      Value::Tuple(_) => "tuple",
      Value::Dict(_) => "dict",
      Value::Set(_) => "set",
      Value::Global(_) => "global",
      Value::Object(_) => "object",
      Value::PersistentId(_) => "persistent id",
    }
  }
}

#[cfg(test)]
mod tests {
  use super::*;

  #[test]
  fn bigint_decimal() {
    // 2**70 = 1180591620717411303424
    let mut b = vec![0u8; 9];
    b[8] = 0x40;
    assert_eq!(BigInt(b).to_decimal(), "1180591620717411303424");
    // -(2**63) as 8 bytes
    let mut b = vec![0u8; 8];
    b[7] = 0x80;
    assert_eq!(BigInt(b).to_decimal(), "-9223372036854775808");
    assert_eq!(BigInt(vec![0xff]).to_decimal(), "-1");
    assert_eq!(BigInt(vec![]).to_decimal(), "0");
  }
}
