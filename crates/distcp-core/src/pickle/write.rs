//! A protocol-2 pickle emitter that writes the bytes CPython's C pickler writes, memo `BINPUT`s included, so that
//! a `data.pkl` made here is byte-identical to the one `torch.save` makes for the same value.
//!
//! CPython memoizes by object identity. The rules reproduced here (checked against CPython 3.11, see
//! `interop/make_golden.py`):
//! * every str, bytes, non-empty tuple, list, dict and REDUCE/NEWOBJ result gets a `BINPUT` (`LONG_BINPUT` from
//!   index 256 on); ints, floats, None, bools and the empty tuple never do;
//! * a second reference to an object already in the memo is a `BINGET`. Distinct objects with equal contents are
//!   pickled again, so only objects that are singletons in CPython are looked up: globals (a class or a dtype
//!   is one object), the empty str and one-character latin-1 strs (cached by CPython when decoded or sliced;
//!   [`Pickler::str`]), bytes of length 0 or 1, and interned constants of torch's or CPython's own code
//!   ([`Pickler::str_const`]: `'storage'`, `'cpu'`, `'latin1'`).
//! * lists and dicts are filled in batches of 1000 (`MARK … APPENDS`/`SETITEMS`); a single item uses
//!   `APPEND`/`SETITEM`; a dict whose size is a multiple of 1000 ends with an empty batch (a C-pickler quirk).
//! * Python `bytes` have no protocol-2 opcode: CPython pickles them as `_codecs.encode(<latin-1 str>, 'latin1')`
//!   and `b''` as `__builtin__.bytes()`; so does this module (and so every torch version, including its
//!   `weights_only` unpickler, loads them).

use crate::pickle::BigInt;
use std::collections::HashMap;

const PROTO: u8 = 0x80;
const STOP: u8 = b'.';
const MARK: u8 = b'(';
const GLOBAL: u8 = b'c';
const BINPUT: u8 = b'q';
const LONG_BINPUT: u8 = b'r';
const BINGET: u8 = b'h';
const LONG_BINGET: u8 = b'j';
const NONE: u8 = b'N';
const NEWTRUE: u8 = 0x88;
const NEWFALSE: u8 = 0x89;
const BININT: u8 = b'J';
const BININT1: u8 = b'K';
const BININT2: u8 = b'M';
const LONG1: u8 = 0x8a;
const LONG4: u8 = 0x8b;
const BINFLOAT: u8 = b'G';
const BINUNICODE: u8 = b'X';
const EMPTY_TUPLE: u8 = b')';
const TUPLE: u8 = b't';
const TUPLE1: u8 = 0x85;
const TUPLE2: u8 = 0x86;
const TUPLE3: u8 = 0x87;
const EMPTY_LIST: u8 = b']';
const APPEND: u8 = b'a';
const APPENDS: u8 = b'e';
const EMPTY_DICT: u8 = b'}';
const SETITEM: u8 = b's';
const SETITEMS: u8 = b'u';
const REDUCE: u8 = b'R';
const NEWOBJ: u8 = 0x81;
const BUILD: u8 = b'b';
const BINPERSID: u8 = b'Q';

/// CPython's `BATCHSIZE` for APPENDS/SETITEMS.
const BATCH: usize = 1000;

/// Objects CPython shares, so that a second occurrence is a `BINGET`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Shared {
  Global(String, String),
  /// `''` or a one-character str with a code point below 256.
  SmallStr(Option<char>),
  /// `b''` or a one-byte bytes object.
  SmallBytes(Option<u8>),
  /// A str constant interned in the pickling program (`'storage'`, `'cpu'`, `'latin1'`, field names).
  Const(String),
}

/// Emits protocol-2 opcodes. Values are pushed in pickle order: arguments before the opcode that consumes them;
/// the container helpers take a closure that emits the items.
#[derive(Debug)]
pub struct Pickler {
  out: Vec<u8>,
  next_memo: u32,
  shared: HashMap<Shared, u32>,
  /// Memoize every str by content (not CPython's behaviour; for `.metadata`, where it only saves space).
  share_all_strings: bool,
}

impl Default for Pickler {
  fn default() -> Self {
    Self::new()
  }
}

impl Pickler {
  /// A pickle that starts with `PROTO 2`.
  pub fn new() -> Self {
    Pickler { out: vec![PROTO, 2], next_memo: 0, shared: HashMap::new(), share_all_strings: false }
  }

  /// Like [`Pickler::new`], but every str is written once and referenced afterwards (smaller `.metadata`).
  pub fn sharing_strings() -> Self {
    Pickler { share_all_strings: true, ..Self::new() }
  }

  /// Ends the pickle with `STOP` and returns its bytes.
  pub fn finish(mut self) -> Vec<u8> {
    self.out.push(STOP);
    self.out
  }

  /// Bytes emitted so far (without `STOP`).
  pub fn bytes(&self) -> &[u8] {
    &self.out
  }

  fn memoize(&mut self) -> u32 {
    let idx = self.next_memo;
    self.next_memo += 1;
    if idx < 256 {
      self.out.extend_from_slice(&[BINPUT, idx as u8]);
    } else {
      self.out.push(LONG_BINPUT);
      self.out.extend_from_slice(&idx.to_le_bytes());
    }
    idx
  }

  fn get(&mut self, idx: u32) {
    if idx < 256 {
      self.out.extend_from_slice(&[BINGET, idx as u8]);
    } else {
      self.out.push(LONG_BINGET);
      self.out.extend_from_slice(&idx.to_le_bytes());
    }
  }

  /// Emits a reference if `key` was pickled before; otherwise runs `emit` and memoizes its result.
  fn shared(&mut self, key: Shared, emit: impl FnOnce(&mut Self)) {
    if let Some(&idx) = self.shared.get(&key) {
      self.get(idx);
      return;
    }
    emit(self);
    let idx = self.memoize();
    self.shared.insert(key, idx);
  }

  /// `GLOBAL module\nname\n` (a class, function or dtype; shared).
  pub fn global(&mut self, module: &str, name: &str) {
    self.shared(Shared::Global(module.to_owned(), name.to_owned()), |p| {
      p.out.push(GLOBAL);
      p.out.extend_from_slice(module.as_bytes());
      p.out.push(b'\n');
      p.out.extend_from_slice(name.as_bytes());
      p.out.push(b'\n');
    });
  }

  pub fn none(&mut self) {
    self.out.push(NONE);
  }

  pub fn bool(&mut self, b: bool) {
    self.out.push(if b { NEWTRUE } else { NEWFALSE });
  }

  /// The smallest of BININT1 / BININT2 / BININT / LONG1, as CPython chooses.
  pub fn int(&mut self, i: i64) {
    if (0..=0xff).contains(&i) {
      self.out.extend_from_slice(&[BININT1, i as u8]);
    } else if (0..=0xffff).contains(&i) {
      self.out.push(BININT2);
      self.out.extend_from_slice(&(i as u16).to_le_bytes());
    } else if i32::try_from(i).is_ok() {
      self.out.push(BININT);
      self.out.extend_from_slice(&(i as i32).to_le_bytes());
    } else {
      self.long(&i.to_le_bytes());
    }
  }

  pub fn uint(&mut self, u: u64) {
    match i64::try_from(u) {
      Ok(i) => self.int(i),
      Err(_) => {
        let mut b = u.to_le_bytes().to_vec();
        b.push(0);
        self.long(&b);
      }
    }
  }

  /// An int of any size (little-endian two's complement).
  pub fn big_int(&mut self, v: &BigInt) {
    let b = minimal_twos_complement(&v.0);
    if b.len() <= 8 {
      let negative = b.last().is_some_and(|x| x & 0x80 != 0);
      let mut w = [if negative { 0xff } else { 0 }; 8];
      w[..b.len()].copy_from_slice(&b);
      self.int(i64::from_le_bytes(w));
    } else {
      self.long(&b);
    }
  }

  /// LONG1 (LONG4 past 255 bytes) with CPython's encoding: the shortest two's complement.
  fn long(&mut self, le: &[u8]) {
    let b = minimal_twos_complement(le);
    if b.len() < 256 {
      self.out.extend_from_slice(&[LONG1, b.len() as u8]);
    } else {
      self.out.push(LONG4);
      self.out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    }
    self.out.extend_from_slice(&b);
  }

  /// BINFLOAT: big-endian IEEE double (every bit kept, NaN payloads included).
  pub fn float(&mut self, f: f64) {
    self.out.push(BINFLOAT);
    self.out.extend_from_slice(&f.to_bits().to_be_bytes());
  }

  fn binunicode(&mut self, s: &str) {
    self.out.push(BINUNICODE);
    self.out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    self.out.extend_from_slice(s.as_bytes());
  }

  /// A str object of the pickled value: shared only where CPython shares (see the module docs).
  pub fn str(&mut self, s: &str) {
    if self.share_all_strings {
      return self.str_const(s);
    }
    let mut chars = s.chars();
    let small = match (chars.next(), chars.next()) {
      (None, _) => Some(None),
      (Some(c), None) if (c as u32) < 256 => Some(Some(c)),
      _ => None,
    };
    match small {
      Some(c) => self.shared(Shared::SmallStr(c), |p| p.binunicode(s)),
      None => {
        self.binunicode(s);
        self.memoize();
      }
    }
  }

  /// A str that is never shared (e.g. `str(n)` results, which CPython builds afresh).
  pub fn str_fresh(&mut self, s: &str) {
    self.binunicode(s);
    self.memoize();
  }

  /// An interned str constant: written once, referenced afterwards.
  pub fn str_const(&mut self, s: &str) {
    self.shared(Shared::Const(s.to_owned()), |p| p.binunicode(s));
  }

  /// Python bytes, as CPython's protocol-2 pickler writes them.
  pub fn bytes_value(&mut self, b: &[u8]) {
    let emit = |p: &mut Self| {
      if b.is_empty() {
        p.global("__builtin__", "bytes");
        p.out.push(EMPTY_TUPLE);
        p.out.push(REDUCE);
      } else {
        p.global("_codecs", "encode");
        let latin1: String = b.iter().map(|&c| char::from(c)).collect();
        p.str(&latin1);
        p.str_const("latin1");
        p.out.push(TUPLE2);
        p.memoize();
        p.out.push(REDUCE);
      }
    };
    match b.len() {
      0 => self.shared(Shared::SmallBytes(None), emit),
      1 => self.shared(Shared::SmallBytes(Some(b[0])), emit),
      _ => {
        emit(self);
        self.memoize();
      }
    }
  }

  /// A tuple of `n` items emitted by `items` (TUPLE1/2/3, or MARK … TUPLE; EMPTY_TUPLE for none).
  pub fn tuple<E>(&mut self, n: usize, items: impl FnOnce(&mut Self) -> Result<(), E>) -> Result<(), E> {
    match n {
      0 => {
        items(self)?;
        self.out.push(EMPTY_TUPLE);
        return Ok(());
      }
      1..=3 => {
        items(self)?;
        self.out.push([TUPLE1, TUPLE2, TUPLE3][n - 1]);
      }
      _ => {
        self.out.push(MARK);
        items(self)?;
        self.out.push(TUPLE);
      }
    }
    self.memoize();
    Ok(())
  }

  /// A tuple of ints (sizes, strides).
  pub fn int_tuple(&mut self, v: &[u64]) {
    let _ = self.tuple::<()>(v.len(), |p| {
      for &x in v {
        p.uint(x);
      }
      Ok(())
    });
  }

  /// A list: `EMPTY_LIST`, then its items in batches. `item(p, i)` emits item `i`.
  pub fn list<E>(
    &mut self,
    n: usize,
    mut item: impl FnMut(&mut Self, usize) -> Result<(), E>,
  ) -> Result<(), E> {
    self.out.push(EMPTY_LIST);
    self.memoize();
    if n == 1 {
      item(self, 0)?;
      self.out.push(APPEND);
      return Ok(());
    }
    let mut i = 0;
    while i < n {
      self.out.push(MARK);
      let end = (i + BATCH).min(n);
      for j in i..end {
        item(self, j)?;
      }
      self.out.push(APPENDS);
      i = end;
    }
    Ok(())
  }

  /// A dict: `EMPTY_DICT`, then its pairs in batches. `pair(p, i)` emits key `i` then its value.
  pub fn dict<E>(
    &mut self,
    n: usize,
    mut pair: impl FnMut(&mut Self, usize) -> Result<(), E>,
  ) -> Result<(), E> {
    self.out.push(EMPTY_DICT);
    self.memoize();
    if n == 0 {
      return Ok(());
    }
    if n == 1 {
      pair(self, 0)?;
      self.out.push(SETITEM);
      return Ok(());
    }
    let mut i = 0;
    loop {
      self.out.push(MARK);
      let end = (i + BATCH).min(n);
      for j in i..end {
        pair(self, j)?;
      }
      self.out.push(SETITEMS);
      // CPython's batch_dict_exact loops while the last batch was full, so n % 1000 == 0 adds an empty one
      if end - i < BATCH {
        break;
      }
      i = end;
    }
    Ok(())
  }

  /// `callable(*args)`: the callable and the argument tuple must already be on the stack.
  pub fn reduce(&mut self) {
    self.out.push(REDUCE);
    self.memoize();
  }

  /// `cls.__new__(cls, *args)`: the class and the argument tuple must already be on the stack.
  pub fn newobj(&mut self) {
    self.out.push(NEWOBJ);
    self.memoize();
  }

  /// `BUILD`: applies the state on the stack to the object below it.
  pub fn build(&mut self) {
    self.out.push(BUILD);
  }

  /// `BINPERSID`: the persistent id (usually a tuple) must be on the stack.
  pub fn persistent_id(&mut self) {
    self.out.push(BINPERSID);
  }

  /// A dataclass instance as `object.__reduce_ex__(2)` pickles it: class, `()`, NEWOBJ, then its `__dict__`
  /// (emitted by `state`, a dict) and BUILD — or no BUILD when `state` is `None` (empty `__dict__`).
  pub fn dataclass<E>(
    &mut self,
    module: &str,
    name: &str,
    state: Option<impl FnOnce(&mut Self) -> Result<(), E>>,
  ) -> Result<(), E> {
    self.global(module, name);
    self.out.push(EMPTY_TUPLE);
    self.newobj();
    if let Some(state) = state {
      state(self)?;
      self.build();
    }
    Ok(())
  }
}

/// The shortest little-endian two's complement encoding of the same number (CPython's `encode_long`; zero is
/// zero bytes).
pub fn minimal_twos_complement(le: &[u8]) -> Vec<u8> {
  let negative = le.last().is_some_and(|b| b & 0x80 != 0);
  let filler = if negative { 0xff } else { 0x00 };
  let mut n = le.len();
  // drop a top byte while it is pure sign extension of the byte below
  while n > 0 && le[n - 1] == filler && (n == 1 || ((le[n - 2] & 0x80) != 0) == negative) {
    n -= 1;
  }
  let mut out = le[..n].to_vec();
  if negative && out.is_empty() {
    out.push(0xff); // -1
  }
  out
}

/// Parses a decimal integer (optional `-`) into little-endian two's complement bytes.
pub fn bigint_from_decimal(s: &str) -> Option<BigInt> {
  let (negative, digits) = match s.strip_prefix('-') {
    Some(d) => (true, d),
    None => (false, s),
  };
  if digits.is_empty() || !digits.bytes().all(|c| c.is_ascii_digit()) {
    return None;
  }
  // magnitude, little-endian base 256
  let mut mag: Vec<u8> = Vec::new();
  for c in digits.bytes() {
    let mut carry = u32::from(c - b'0');
    for b in mag.iter_mut() {
      let v = u32::from(*b) * 10 + carry;
      *b = v as u8;
      carry = v >> 8;
    }
    while carry > 0 {
      mag.push(carry as u8);
      carry >>= 8;
    }
  }
  mag.push(0); // room for the sign bit
  if negative {
    let mut carry = true;
    for b in mag.iter_mut() {
      *b = !*b;
      if carry {
        let (v, c) = b.overflowing_add(1);
        *b = v;
        carry = c;
      }
    }
  }
  Some(BigInt(minimal_twos_complement(&mag)))
}

#[cfg(test)]
mod tests {
  use super::*;
  use crate::pickle::{unpickle, Value};

  fn any(_: &str, _: &str) -> bool {
    true
  }

  #[test]
  fn ints_use_the_smallest_opcode() {
    let cases: &[(i64, &[u8])] = &[
      (0, b"K\x00"),
      (255, b"K\xff"),
      (256, b"M\x00\x01"),
      (65535, b"M\xff\xff"),
      (65536, b"J\x00\x00\x01\x00"),
      (-1, b"J\xff\xff\xff\xff"),
      (i64::from(i32::MIN), b"J\x00\x00\x00\x80"),
      (i64::from(i32::MAX) + 1, b"\x8a\x05\x00\x00\x00\x80\x00"),
      (i64::from(i32::MIN) - 1, b"\x8a\x05\xff\xff\xff\x7f\xff"),
      (i64::MIN, b"\x8a\x08\x00\x00\x00\x00\x00\x00\x00\x80"),
    ];
    for &(i, want) in cases {
      let mut p = Pickler::new();
      p.int(i);
      assert_eq!(&p.bytes()[2..], want, "{i}");
      assert_eq!(unpickle(&p.finish(), &any).unwrap(), Value::Int(i));
    }
    let mut p = Pickler::new();
    p.uint(u64::MAX);
    assert_eq!(&p.bytes()[2..], b"\x8a\x09\xff\xff\xff\xff\xff\xff\xff\xff\x00");
  }

  #[test]
  fn big_ints_round_trip_through_decimal() {
    for s in [
      "0",
      "1",
      "-1",
      "127",
      "128",
      "-128",
      "-129",
      "1180591620717411303424",
      "-1180591620717411303424",
      "-9223372036854775808",
      "9223372036854775808",
    ] {
      let b = bigint_from_decimal(s).unwrap();
      assert_eq!(b.to_decimal(), s);
    }
    assert!(bigint_from_decimal("12a").is_none());
    assert!(bigint_from_decimal("-").is_none());
    // 2**70 as CPython writes it
    let mut p = Pickler::new();
    p.big_int(&bigint_from_decimal("1180591620717411303424").unwrap());
    assert_eq!(&p.bytes()[2..], b"\x8a\x09\x00\x00\x00\x00\x00\x00\x00\x00\x40");
    // small values collapse to BININT*
    let mut p = Pickler::new();
    p.big_int(&bigint_from_decimal("-5").unwrap());
    assert_eq!(&p.bytes()[2..], b"J\xfb\xff\xff\xff");
  }

  #[test]
  fn minimal_encoding() {
    assert_eq!(minimal_twos_complement(&[0, 0, 0]), Vec::<u8>::new());
    assert_eq!(minimal_twos_complement(&[0xff, 0xff]), vec![0xff]);
    assert_eq!(minimal_twos_complement(&[0x80, 0xff]), vec![0x80]);
    assert_eq!(minimal_twos_complement(&[0x80, 0x00]), vec![0x80, 0x00]);
    assert_eq!(minimal_twos_complement(&[0x7f, 0xff]), vec![0x7f, 0xff]);
  }

  #[test]
  fn strings_and_bytes_are_shared_like_cpython() {
    // CPython 3.11: pickle.dumps(json.loads('["", "", "a", "a", "ab", "ab"]'), 2)
    let mut p = Pickler::new();
    let items = ["", "", "a", "a", "ab", "ab"];
    p.list::<()>(items.len(), |p, i| {
      p.str(items[i]);
      Ok(())
    })
    .unwrap();
    assert_eq!(
      p.finish(),
      b"\x80\x02]q\x00(X\x00\x00\x00\x00q\x01h\x01X\x01\x00\x00\x00aq\x02h\x02X\x02\x00\x00\x00abq\x03X\x02\x00\x00\x00abq\x04e.".to_vec()
    );
    // pickle.dumps([bytes([97]), bytes([97]), bytes(), bytes(), bytes([1,2]), bytes([1,2])], 2)
    let mut p = Pickler::new();
    let items: [&[u8]; 6] = [b"a", b"a", b"", b"", b"\x01\x02", b"\x01\x02"];
    p.list::<()>(items.len(), |p, i| {
      p.bytes_value(items[i]);
      Ok(())
    })
    .unwrap();
    assert_eq!(
      p.finish(),
      b"\x80\x02]q\x00(c_codecs\nencode\nq\x01X\x01\x00\x00\x00aq\x02X\x06\x00\x00\x00latin1q\x03\x86q\x04Rq\x05h\x05c__builtin__\nbytes\nq\x06)Rq\x07h\x07h\x01X\x02\x00\x00\x00\x01\x02q\x08h\x03\x86q\tRq\nh\x01X\x02\x00\x00\x00\x01\x02q\x0bh\x03\x86q\x0cRq\re.".to_vec()
    );
  }

  #[test]
  fn batches_follow_the_c_pickler() {
    for n in [0usize, 1, 2, 999, 1000, 1001, 2000] {
      let mut p = Pickler::new();
      // None items and keys: no byte of the output but MARK is 0x28
      p.list::<()>(n, |p, _| {
        p.none();
        Ok(())
      })
      .unwrap();
      let out = p.finish();
      let marks = out.iter().filter(|&&b| b == MARK).count();
      assert_eq!(marks, if n < 2 { 0 } else { n.div_ceil(1000) }, "list {n}");
      match unpickle(&out, &any).unwrap() {
        Value::List(v) => assert_eq!(v.len(), n),
        other => panic!("{other:?}"),
      }

      let mut p = Pickler::new();
      p.dict::<()>(n, |p, _| {
        p.none();
        p.bool(true);
        Ok(())
      })
      .unwrap();
      let out = p.finish();
      let marks = out.iter().filter(|&&b| b == MARK).count();
      let want = if n < 2 { 0 } else { n / 1000 + 1 };
      assert_eq!(marks, want, "dict {n}");
      match unpickle(&out, &any).unwrap() {
        Value::Dict(v) => assert_eq!(v.len(), n),
        other => panic!("{other:?}"),
      }
    }
  }

  #[test]
  fn memo_indices_switch_to_long_binput() {
    let mut p = Pickler::new();
    p.list::<()>(300, |p, i| {
      p.str_fresh(&format!("s{i}"));
      Ok(())
    })
    .unwrap();
    let out = p.finish();
    assert!(out.windows(5).any(|w| w == [LONG_BINPUT, 0, 1, 0, 0]));
    match unpickle(&out, &any).unwrap() {
      Value::List(v) => assert_eq!(v[299], Value::Str("s299".into())),
      other => panic!("{other:?}"),
    }
  }

  #[test]
  fn floats_keep_every_bit() {
    for f in [0.001, -0.0, f64::INFINITY, f64::from_bits(0x7ff8_0000_0000_1234)] {
      let mut p = Pickler::new();
      p.float(f);
      let out = p.finish();
      match unpickle(&out, &any).unwrap() {
        Value::Float(g) => assert_eq!(g.to_bits(), f.to_bits()),
        other => panic!("{other:?}"),
      }
    }
    let mut p = Pickler::new();
    p.float(0.001);
    assert_eq!(p.finish(), b"\x80\x02G?PbM\xd2\xf1\xa9\xfc.".to_vec());
  }
}
