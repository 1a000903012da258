//! The pickle VM. Objects live in an arena so that memo references share (and see later mutations of) one
//! object, as in Python; the tree handed back is materialised at the end with limits on depth and size, so a
//! hostile stream cannot loop or blow up memory.
//!
//! Opcode reference: CPython `Lib/pickletools.py`.

use super::value::{BigInt, Global, Object, Value};
use std::collections::HashMap;

/// Which globals may appear. Anything else stops unpickling with an error naming it.
pub trait AllowList {
  fn allows(&self, module: &str, name: &str) -> bool;
}

impl<F: Fn(&str, &str) -> bool> AllowList for F {
  fn allows(&self, module: &str, name: &str) -> bool {
    self(module, name)
  }
}

/// Why unpickling stopped; the caller adds the file name.
#[derive(Debug, PartialEq)]
pub enum UnpickleError {
  Malformed { pos: usize, reason: String },
  Forbidden { module: String, name: String },
}

type Id = usize;

#[derive(Debug)]
enum Node {
  Scalar(Value),
  List(Vec<Id>),
  Tuple(Vec<Id>),
  Dict(Vec<(Id, Id)>),
  Set(Vec<Id>),
  Global(Global),
  Object { class: Global, args: Vec<Id>, state: Option<Id> },
  PersistentId(Id),
}

use crate::limits::{unpickle_budget, MAX_NESTING as MAX_DEPTH};

struct Machine<'a, A: AllowList + ?Sized> {
  data: &'a [u8],
  pos: usize,
  arena: Vec<Node>,
  stack: Vec<Id>,
  marks: Vec<usize>,
  memo: HashMap<u64, Id>,
  allow: &'a A,
  /// Heap bytes held by nodes beyond their fixed size (strings, item lists), for the memory budget.
  extra: usize,
  /// Memory this unpickling may use ([`unpickle_budget`]).
  budget: usize,
}

/// Unpickles `data`, using at most [`unpickle_budget`] bytes of memory for it.
pub fn unpickle<A: AllowList + ?Sized>(data: &[u8], allow: &A) -> Result<Value, UnpickleError> {
  unpickle_with_budget(data, allow, unpickle_budget(data.len()))
}

/// [`unpickle`] with an explicit memory budget in bytes (tests measure real files against the limit with it).
pub fn unpickle_with_budget<A: AllowList + ?Sized>(
  data: &[u8],
  allow: &A,
  budget: usize,
) -> Result<Value, UnpickleError> {
  let mut m = Machine {
    data,
    pos: 0,
    arena: Vec::new(),
    stack: Vec::new(),
    marks: Vec::new(),
    memo: HashMap::new(),
    allow,
    extra: 0,
    budget,
  };
  let root = m.run()?;
  // The materialised tree gets what the VM left of the budget: shared memo references could otherwise expand
  // exponentially.
  let mut budget = m.budget.saturating_sub(m.used());
  m.materialise(root, 0, &mut budget)
}

impl<A: AllowList + ?Sized> Machine<'_, A> {
  fn err<T>(&self, reason: impl Into<String>) -> Result<T, UnpickleError> {
    Err(UnpickleError::Malformed { pos: self.pos, reason: reason.into() })
  }

  fn take(&mut self, n: usize) -> Result<&[u8], UnpickleError> {
    let end = match self.pos.checked_add(n) {
      Some(e) if e <= self.data.len() => e,
      _ => return self.err(format!("truncated: wanted {n} more bytes, {} left", self.data.len() - self.pos)),
    };
    let s = &self.data[self.pos..end];
    self.pos = end;
    Ok(s)
  }

  fn u8(&mut self) -> Result<u8, UnpickleError> {
    Ok(self.take(1)?[0])
  }

  fn le<const N: usize>(&mut self) -> Result<[u8; N], UnpickleError> {
    let mut out = [0u8; N];
    out.copy_from_slice(self.take(N)?);
    Ok(out)
  }

  fn len_u64(&mut self) -> Result<usize, UnpickleError> {
    let n = u64::from_le_bytes(self.le::<8>()?);
    usize::try_from(n).or_else(|_| self.err("length does not fit in memory"))
  }

  fn line(&mut self) -> Result<&[u8], UnpickleError> {
    let rest = &self.data[self.pos..];
    let Some(nl) = rest.iter().position(|&b| b == b'\n') else {
      return self.err("truncated: missing end of line");
    };
    self.pos += nl + 1;
    Ok(&rest[..nl])
  }

  fn line_str(&mut self) -> Result<String, UnpickleError> {
    let l = self.line()?;
    match std::str::from_utf8(l) {
      Ok(s) => Ok(s.to_owned()),
      Err(_) => self.err("text line is not UTF-8"),
    }
  }

  fn utf8(&mut self, n: usize) -> Result<Value, UnpickleError> {
    let bytes = self.take(n)?;
    match std::str::from_utf8(bytes) {
      Ok(s) => Ok(Value::Str(s.to_owned())),
      Err(_) => self.err("string is not valid UTF-8"),
    }
  }

  /// Approximate heap bytes the VM holds now.
  fn used(&self) -> usize {
    self.arena.capacity() * std::mem::size_of::<Node>()
      + (self.stack.capacity() + self.marks.capacity()) * std::mem::size_of::<usize>()
      + self.memo.capacity() * 2 * std::mem::size_of::<u64>()
      + self.extra
  }

  fn alloc(&mut self, node: Node) -> Id {
    self.arena.push(node);
    self.arena.len() - 1
  }

  fn push(&mut self, node: Node) {
    let id = self.alloc(node);
    self.stack.push(id);
  }

  fn push_scalar(&mut self, v: Value) {
    self.extra += match &v {
      Value::Str(s) => s.len(),
      Value::Bytes(b) => b.len(),
      Value::BigInt(b) => b.0.len(),
      _ => 0,
    };
    self.push(Node::Scalar(v));
  }

  fn pop(&mut self) -> Result<Id, UnpickleError> {
    let floor = self.marks.last().copied().unwrap_or(0);
    if self.stack.len() <= floor {
      return self.err("stack underflow");
    }
    match self.stack.pop() {
      Some(id) => Ok(id),
      None => self.err("stack underflow"),
    }
  }

  fn top(&self) -> Result<Id, UnpickleError> {
    let floor = self.marks.last().copied().unwrap_or(0);
    match self.stack.last() {
      Some(&id) if self.stack.len() > floor => Ok(id),
      _ => self.err("stack underflow"),
    }
  }

  fn pop_mark(&mut self) -> Result<Vec<Id>, UnpickleError> {
    let Some(mark) = self.marks.pop() else {
      return self.err("no MARK on the stack");
    };
    Ok(self.stack.split_off(mark))
  }

  fn global(&mut self, module: String, name: String) -> Result<(), UnpickleError> {
    if !self.allow.allows(&module, &name) {
      return Err(UnpickleError::Forbidden { module, name });
    }
    self.push(Node::Global(Global { module, name }));
    Ok(())
  }

  fn as_global(&self, id: Id, what: &str) -> Result<Global, UnpickleError> {
    match &self.arena[id] {
      Node::Global(g) => Ok(g.clone()),
      _ => self.err(format!("{what} expects a class or function, found something else")),
    }
  }

  fn tuple_items(&mut self, id: Id, what: &str) -> Result<Vec<Id>, UnpickleError> {
    match &self.arena[id] {
      Node::Tuple(items) => {
        self.extra += items.len() * std::mem::size_of::<Id>();
        Ok(items.clone())
      }
      _ => self.err(format!("{what} expects an argument tuple")),
    }
  }

  /// `callable(*args)`. A few builtin containers are turned into their values so later SETITEMS/APPENDS work.
  fn call(&mut self, class: Global, args: Vec<Id>) -> Node {
    let is = |m: &str, n: &str| class.module == m && class.name == n;
    if is("collections", "OrderedDict") && args.is_empty() {
      return Node::Dict(Vec::new());
    }
    if (is("builtins", "set") || is("builtins", "frozenset") || is("__builtin__", "set")) && args.len() <= 1 {
      let items = match args.first().map(|&a| &self.arena[a]) {
        Some(Node::List(v)) | Some(Node::Tuple(v)) | Some(Node::Set(v)) => v.clone(),
        _ => Vec::new(),
      };
      self.extra += items.len() * std::mem::size_of::<Id>();
      return Node::Set(items);
    }
    // protocol 2 has no bytes opcode: CPython pickles bytes as `_codecs.encode(latin-1 text, 'latin1')`, and
    // b'' as `bytes()`
    if is("_codecs", "encode") && args.len() == 2 {
      if let (Node::Scalar(Value::Str(text)), Node::Scalar(Value::Str(enc))) =
        (&self.arena[args[0]], &self.arena[args[1]])
      {
        if enc == "latin1" || enc == "latin-1" {
          let bytes: Option<Vec<u8>> = text.chars().map(|c| u8::try_from(u32::from(c)).ok()).collect();
          if let Some(bytes) = bytes {
            return Node::Scalar(Value::Bytes(bytes));
          }
        }
      }
    }
    if (is("builtins", "bytes") || is("__builtin__", "bytes")) && args.is_empty() {
      return Node::Scalar(Value::Bytes(Vec::new()));
    }
    Node::Object { class, args, state: None }
  }

  fn memo_put(&mut self, key: u64) -> Result<(), UnpickleError> {
    let id = self.top()?;
    self.memo.insert(key, id);
    Ok(())
  }

  fn memo_get(&mut self, key: u64) -> Result<(), UnpickleError> {
    match self.memo.get(&key) {
      Some(&id) => {
        self.stack.push(id);
        Ok(())
      }
      None => self.err(format!("memo key {key} was never stored")),
    }
  }

  fn set_items(&mut self, target: Id, items: Vec<Id>) -> Result<(), UnpickleError> {
    if !items.len().is_multiple_of(2) {
      return self.err("SETITEMS with an odd number of items");
    }
    let pairs: Vec<(Id, Id)> = items.chunks(2).map(|c| (c[0], c[1])).collect();
    // growth of the target's list, with the slack a doubling Vec keeps
    self.extra += 2 * pairs.len() * std::mem::size_of::<(Id, Id)>();
    match &mut self.arena[target] {
      Node::Dict(d) => {
        d.extend(pairs);
        Ok(())
      }
      _ => self.err("SETITEM(S) on something that is not a dict"),
    }
  }

  fn append_items(&mut self, target: Id, items: Vec<Id>) -> Result<(), UnpickleError> {
    self.extra += 2 * items.len() * std::mem::size_of::<Id>();
    match &mut self.arena[target] {
      Node::List(l) | Node::Set(l) => {
        l.extend(items);
        Ok(())
      }
      _ => self.err("APPEND(S) on something that is not a list"),
    }
  }

  fn run(&mut self) -> Result<Id, UnpickleError> {
    loop {
      if self.used() > self.budget {
        return self.err(format!(
          "the pickle expands past {} bytes of memory ({} per byte of pickle, limits::UNPICKLE_BYTES_PER_INPUT_BYTE)",
          self.budget,
          crate::limits::UNPICKLE_BYTES_PER_INPUT_BYTE
        ));
      }
      let op = self.u8()?;
      match op {
        0x80 => {
          let proto = self.u8()?;
          if proto > 5 {
            return self.err(format!("unsupported pickle protocol {proto}"));
          }
        }
        0x95 => {
          self.take(8)?; // FRAME: framing is only a read-ahead hint
        }
        b'.' => return self.pop(),
        b'(' => self.marks.push(self.stack.len()),
        b'0' => {
          self.pop()?;
        }
        b'1' => {
          self.pop_mark()?;
        }
        b'2' => {
          let id = self.top()?;
          self.stack.push(id);
        }
        b'N' => self.push_scalar(Value::None),
        0x88 => self.push_scalar(Value::Bool(true)),
        0x89 => self.push_scalar(Value::Bool(false)),
        b'J' => {
          let v = i32::from_le_bytes(self.le::<4>()?);
          self.push_scalar(Value::Int(i64::from(v)));
        }
        b'K' => {
          let v = self.u8()?;
          self.push_scalar(Value::Int(i64::from(v)));
        }
        b'M' => {
          let v = u16::from_le_bytes(self.le::<2>()?);
          self.push_scalar(Value::Int(i64::from(v)));
        }
        b'I' => {
          let s = self.line_str()?;
          let v = match s.as_str() {
            "01" => Value::Bool(true),
            "00" => Value::Bool(false),
            t => match t.parse::<i64>() {
              Ok(i) => Value::Int(i),
              Err(_) => return self.err(format!("bad INT literal {t:?}")),
            },
          };
          self.push_scalar(v);
        }
        b'L' => {
          let s = self.line_str()?;
          let t = s.trim_end_matches('L');
          match t.parse::<i64>() {
            Ok(i) => self.push_scalar(Value::Int(i)),
            Err(_) => return self.err(format!("LONG literal {t:?} is out of range")),
          }
        }
        0x8a => {
          let n = usize::from(self.u8()?);
          let bytes = self.take(n)?.to_vec();
          self.push_scalar(long_value(bytes));
        }
        0x8b => {
          let n = i32::from_le_bytes(self.le::<4>()?);
          let Ok(n) = usize::try_from(n) else {
            return self.err("LONG4 with a negative length");
          };
          let bytes = self.take(n)?.to_vec();
          self.push_scalar(long_value(bytes));
        }
        b'G' => {
          let v = f64::from_be_bytes(self.le::<8>()?);
          self.push_scalar(Value::Float(v));
        }
        b'F' => {
          let s = self.line_str()?;
          match s.trim().parse::<f64>() {
            Ok(v) => self.push_scalar(Value::Float(v)),
            Err(_) => return self.err(format!("bad FLOAT literal {s:?}")),
          }
        }
        b'X' => {
          let n = u32::from_le_bytes(self.le::<4>()?) as usize;
          let v = self.utf8(n)?;
          self.push_scalar(v);
        }
        0x8c => {
          let n = usize::from(self.u8()?);
          let v = self.utf8(n)?;
          self.push_scalar(v);
        }
        0x8d => {
          let n = self.len_u64()?;
          let v = self.utf8(n)?;
          self.push_scalar(v);
        }
        b'V' => {
          // protocol 0 raw-unicode-escape; plain ASCII/UTF-8 is all DCP could produce
          let s = self.line_str()?;
          self.push_scalar(Value::Str(s));
        }
        b'T' => {
          let n = u32::from_le_bytes(self.le::<4>()?) as usize;
          let b = self.take(n)?.to_vec();
          self.push_scalar(Value::Bytes(b));
        }
        b'U' => {
          let n = usize::from(self.u8()?);
          let b = self.take(n)?.to_vec();
          self.push_scalar(Value::Bytes(b));
        }
        b'S' => {
          let l = self.line()?.to_vec();
          let inner = l.strip_prefix(b"'").and_then(|x| x.strip_suffix(b"'"));
          let inner = inner.or_else(|| l.strip_prefix(b"\"").and_then(|x| x.strip_suffix(b"\"")));
          match inner {
            Some(b) => self.push_scalar(Value::Bytes(b.to_vec())),
            None => return self.err("bad STRING literal"),
          }
        }
        b'B' => {
          let n = u32::from_le_bytes(self.le::<4>()?) as usize;
          let b = self.take(n)?.to_vec();
          self.push_scalar(Value::Bytes(b));
        }
        b'C' => {
          let n = usize::from(self.u8()?);
          let b = self.take(n)?.to_vec();
          self.push_scalar(Value::Bytes(b));
        }
        0x8e | 0x96 => {
          let n = self.len_u64()?;
          let b = self.take(n)?.to_vec();
          self.push_scalar(Value::Bytes(b));
        }
        b']' => self.push(Node::List(Vec::new())),
        b'l' => {
          let items = self.pop_mark()?;
          self.push(Node::List(items));
        }
        b'a' => {
          let item = self.pop()?;
          let list = self.top()?;
          self.append_items(list, vec![item])?;
        }
        b'e' => {
          let items = self.pop_mark()?;
          let list = self.top()?;
          self.append_items(list, items)?;
        }
        b')' => self.push(Node::Tuple(Vec::new())),
        b't' => {
          let items = self.pop_mark()?;
          self.push(Node::Tuple(items));
        }
        0x85 => {
          let a = self.pop()?;
          self.push(Node::Tuple(vec![a]));
        }
        0x86 => {
          let b = self.pop()?;
          let a = self.pop()?;
          self.push(Node::Tuple(vec![a, b]));
        }
        0x87 => {
          let c = self.pop()?;
          let b = self.pop()?;
          let a = self.pop()?;
          self.push(Node::Tuple(vec![a, b, c]));
        }
        b'}' => self.push(Node::Dict(Vec::new())),
        b'd' => {
          let items = self.pop_mark()?;
          let dict = self.alloc(Node::Dict(Vec::new()));
          self.set_items(dict, items)?;
          self.stack.push(dict);
        }
        b's' => {
          let v = self.pop()?;
          let k = self.pop()?;
          let dict = self.top()?;
          self.set_items(dict, vec![k, v])?;
        }
        b'u' => {
          let items = self.pop_mark()?;
          let dict = self.top()?;
          self.set_items(dict, items)?;
        }
        0x8f => self.push(Node::Set(Vec::new())),
        0x90 => {
          let items = self.pop_mark()?;
          let set = self.top()?;
          self.append_items(set, items)?;
        }
        0x91 => {
          let items = self.pop_mark()?;
          self.push(Node::Set(items));
        }
        b'c' => {
          let module = self.line_str()?;
          let name = self.line_str()?;
          self.global(module, name)?;
        }
        0x93 => {
          let name = self.pop()?;
          let module = self.pop()?;
          let (Node::Scalar(Value::Str(m)), Node::Scalar(Value::Str(n))) =
            (&self.arena[module], &self.arena[name])
          else {
            return self.err("STACK_GLOBAL expects two strings");
          };
          let (m, n) = (m.clone(), n.clone());
          self.global(m, n)?;
        }
        b'R' => {
          let args = self.pop()?;
          let callable = self.pop()?;
          let class = self.as_global(callable, "REDUCE")?;
          let args = self.tuple_items(args, "REDUCE")?;
          let node = self.call(class, args);
          self.push(node);
        }
        0x81 => {
          let args = self.pop()?;
          let cls = self.pop()?;
          let class = self.as_global(cls, "NEWOBJ")?;
          let args = self.tuple_items(args, "NEWOBJ")?;
          self.push(Node::Object { class, args, state: None });
        }
        0x92 => {
          let _kwargs = self.pop()?;
          let args = self.pop()?;
          let cls = self.pop()?;
          let class = self.as_global(cls, "NEWOBJ_EX")?;
          let args = self.tuple_items(args, "NEWOBJ_EX")?;
          self.push(Node::Object { class, args, state: None });
        }
        b'i' => {
          let module = self.line_str()?;
          let name = self.line_str()?;
          let args = self.pop_mark()?;
          if !self.allow.allows(&module, &name) {
            return Err(UnpickleError::Forbidden { module, name });
          }
          self.push(Node::Object { class: Global { module, name }, args, state: None });
        }
        b'o' => {
          let mut items = self.pop_mark()?;
          if items.is_empty() {
            return self.err("OBJ without a class");
          }
          let cls = items.remove(0);
          let class = self.as_global(cls, "OBJ")?;
          self.push(Node::Object { class, args: items, state: None });
        }
        b'b' => {
          let state = self.pop()?;
          let target = self.top()?;
          match &mut self.arena[target] {
            Node::Object { state: s, .. } => *s = Some(state),
            // BUILD on a dict merges attributes into it, which is how a dict subclass would behave
            Node::Dict(_) => {
              if let Node::Dict(items) = &self.arena[state] {
                let items: Vec<Id> = items.iter().flat_map(|&(k, v)| [k, v]).collect();
                self.set_items(target, items)?;
              }
            }
            _ => return self.err("BUILD on something that is not an object"),
          }
        }
        b'p' => {
          let s = self.line_str()?;
          match s.parse::<u64>() {
            Ok(k) => self.memo_put(k)?,
            Err(_) => return self.err("bad PUT index"),
          }
        }
        b'q' => {
          let k = u64::from(self.u8()?);
          self.memo_put(k)?;
        }
        b'r' => {
          let k = u64::from(u32::from_le_bytes(self.le::<4>()?));
          self.memo_put(k)?;
        }
        0x94 => {
          let k = self.memo.len() as u64;
          self.memo_put(k)?;
        }
        b'g' => {
          let s = self.line_str()?;
          match s.parse::<u64>() {
            Ok(k) => self.memo_get(k)?,
            Err(_) => return self.err("bad GET index"),
          }
        }
        b'h' => {
          let k = u64::from(self.u8()?);
          self.memo_get(k)?;
        }
        b'j' => {
          let k = u64::from(u32::from_le_bytes(self.le::<4>()?));
          self.memo_get(k)?;
        }
        b'Q' => {
          let pid = self.pop()?;
          self.push(Node::PersistentId(pid));
        }
        b'P' => {
          let s = self.line_str()?;
          let pid = self.alloc(Node::Scalar(Value::Str(s)));
          self.push(Node::PersistentId(pid));
        }
        0x82..=0x84 => return self.err("extension-registry opcodes (EXT1/2/4) are not supported"),
        0x97 | 0x98 => return self.err("out-of-band buffers are not supported"),
        other => {
          self.pos -= 1;
          return self.err(format!("unknown opcode 0x{other:02x}"));
        }
      }
    }
  }

  fn materialise(&self, id: Id, depth: usize, budget: &mut usize) -> Result<Value, UnpickleError> {
    if depth > MAX_DEPTH {
      return self.err("nesting too deep (a reference cycle?)");
    }
    // each value costs its own size plus what it owns on the heap (strings, globals' names, an object's box)
    let cost = std::mem::size_of::<Value>()
      + match &self.arena[id] {
        Node::Scalar(Value::Str(s)) => s.len(),
        Node::Scalar(Value::Bytes(b)) => b.len(),
        Node::Scalar(Value::BigInt(b)) => b.0.len(),
        Node::Global(g) => g.module.len() + g.name.len(),
        Node::Object { class, .. } => std::mem::size_of::<Object>() + class.module.len() + class.name.len(),
        _ => 0,
      };
    match budget.checked_sub(cost) {
      Some(left) => *budget = left,
      None => {
        return self.err("the pickle expands to far more memory than it has bytes (shared references?)")
      }
    }
    let many = |ids: &[Id], budget: &mut usize| -> Result<Vec<Value>, UnpickleError> {
      ids.iter().map(|&i| self.materialise(i, depth + 1, budget)).collect()
    };
    Ok(match &self.arena[id] {
      Node::Scalar(v) => v.clone(),
      Node::List(ids) => Value::List(many(ids, budget)?),
      Node::Tuple(ids) => Value::Tuple(many(ids, budget)?),
      Node::Set(ids) => Value::Set(many(ids, budget)?),
      Node::Dict(pairs) => {
        let mut out = Vec::with_capacity(pairs.len());
        for &(k, v) in pairs {
          out.push((self.materialise(k, depth + 1, budget)?, self.materialise(v, depth + 1, budget)?));
        }
        Value::Dict(out)
      }
      Node::Global(g) => Value::Global(g.clone()),
      Node::Object { class, args, state } => Value::Object(Box::new(Object {
        class: class.clone(),
        args: many(args, budget)?,
        state: match state {
          Some(s) => Some(self.materialise(*s, depth + 1, budget)?),
          None => None,
        },
      })),
      Node::PersistentId(p) => Value::PersistentId(Box::new(self.materialise(*p, depth + 1, budget)?)),
    })
  }
}

fn long_value(bytes: Vec<u8>) -> Value {
  if bytes.len() <= 8 {
    let negative = bytes.last().is_some_and(|b| b & 0x80 != 0);
    let mut buf = if negative { [0xffu8; 8] } else { [0u8; 8] };
    buf[..bytes.len()].copy_from_slice(&bytes);
    Value::Int(i64::from_le_bytes(buf))
  } else {
    Value::BigInt(BigInt(bytes))
  }
}

#[cfg(test)]
mod tests {
  use super::*;

  fn any(_: &str, _: &str) -> bool {
    true
  }

  fn load(bytes: &[u8]) -> Result<Value, UnpickleError> {
    unpickle(bytes, &any)
  }

  #[test]
  fn scalars_protocol_2() {
    // pickle.dumps(0.001, protocol=2)
    let v = load(b"\x80\x02G?PbM\xd2\xf1\xa9\xfc.").unwrap();
    assert_eq!(v, Value::Float(0.001));
    assert_eq!(load(b"\x80\x02K\x05.").unwrap(), Value::Int(5));
    assert_eq!(load(b"\x80\x02J\xfb\xff\xff\xff.").unwrap(), Value::Int(-5));
    assert_eq!(load(b"\x80\x02\x88.").unwrap(), Value::Bool(true));
    assert_eq!(load(b"\x80\x02N.").unwrap(), Value::None);
  }

  #[test]
  fn longs() {
    // pickle.dumps(2**70, protocol=2)
    let v = load(b"\x80\x02\x8a\x09\x00\x00\x00\x00\x00\x00\x00\x00\x40.").unwrap();
    assert_eq!(v, Value::BigInt(BigInt(vec![0, 0, 0, 0, 0, 0, 0, 0, 0x40])));
    // pickle.dumps(-(2**63), protocol=2)
    let v = load(b"\x80\x02\x8a\x08\x00\x00\x00\x00\x00\x00\x00\x80.").unwrap();
    assert_eq!(v, Value::Int(i64::MIN));
    // pickle.dumps(2**40, protocol=2)
    let v = load(b"\x80\x02\x8a\x06\x00\x00\x00\x00\x00\x01.").unwrap();
    assert_eq!(v, Value::Int(1 << 40));
  }

  #[test]
  fn memo_shares_mutations() {
    // A dict memoised while empty, filled later, then fetched again.
    // CPython: pickle.dumps([d, d], protocol=4) for d = {'a': 1}
    let bytes = b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00]\x94(}\x94\x8c\x01a\x94K\x01sh\x01e.";
    let v = load(bytes).unwrap();
    let d = Value::Dict(vec![(Value::Str("a".into()), Value::Int(1))]);
    assert_eq!(v, Value::List(vec![d.clone(), d]));
  }

  #[test]
  fn forbidden_global_is_named() {
    let only_torch = |m: &str, _: &str| m == "torch";
    // CPython protocol 2 shape of os.system('echo hi') via REDUCE
    let bytes = b"\x80\x02cposix\nsystem\nq\x00X\x07\x00\x00\x00echo hiq\x01\x85q\x02Rq\x03.";
    let err = unpickle(bytes, &only_torch).unwrap_err();
    assert_eq!(err, UnpickleError::Forbidden { module: "posix".into(), name: "system".into() });
    // STACK_GLOBAL form (protocol 4): builtins.eval
    let bytes = b"\x80\x04\x8c\x08builtins\x8c\x04eval\x93\x8c\x041+1\x85R.";
    let err = unpickle(bytes, &only_torch).unwrap_err();
    assert_eq!(err, UnpickleError::Forbidden { module: "builtins".into(), name: "eval".into() });
  }

  #[test]
  fn truncated_and_garbage_are_errors() {
    assert!(matches!(load(b"\x80\x02X\x10\x00\x00\x00abc"), Err(UnpickleError::Malformed { .. })));
    assert!(matches!(load(b""), Err(UnpickleError::Malformed { .. })));
    assert!(matches!(load(b"\x80\x02\xff"), Err(UnpickleError::Malformed { .. })));
    assert!(matches!(load(b"\x80\x02a."), Err(UnpickleError::Malformed { .. })));
    assert!(matches!(load(b"\x80\x02h\x05."), Err(UnpickleError::Malformed { .. })));
    assert!(matches!(load(b"\x80\x02K\x01K\x02R."), Err(UnpickleError::Malformed { .. })));
  }

  #[test]
  fn self_referencing_list_is_rejected_not_looped() {
    // l = []; l.append(l); pickle.dumps(l, protocol=2)
    let bytes = b"\x80\x02]q\x00h\x00a.";
    assert!(matches!(load(bytes), Err(UnpickleError::Malformed { .. })));
  }

  #[test]
  fn exponential_sharing_is_bounded() {
    // a = []; for _ in range(40): a = [a, a]  → 2^40 nodes if expanded naively
    let mut bytes = b"\x80\x02]q\x00".to_vec();
    for i in 0..40u8 {
      bytes.extend_from_slice(&[b'h', i, b'h', i, 0x86, b'q', i + 1]);
    }
    bytes.push(b'.');
    assert!(matches!(load(&bytes), Err(UnpickleError::Malformed { .. })));
  }

  #[test]
  fn newobj_and_build() {
    // class with NEWOBJ + BUILD(dict state), as dataclasses pickle at protocol >= 2
    let bytes = b"\x80\x02cm\nC\n)\x81}X\x01\x00\x00\x00xK\x07sb.";
    let v = load(bytes).unwrap();
    let o = v.as_object().unwrap();
    assert!(o.class.is("m", "C"));
    assert_eq!(o.state.as_ref().unwrap().get("x"), Some(&Value::Int(7)));
  }

  #[test]
  fn protocol_2_bytes() {
    // CPython: pickle.dumps(b'\x00\xffab', protocol=2) and pickle.dumps(b'', protocol=2)
    let bytes = b"\x80\x02c_codecs\nencode\nq\x00X\x05\x00\x00\x00\x00\xc3\xbfabq\x01X\x06\x00\x00\x00latin1q\x02\x86q\x03Rq\x04.";
    assert_eq!(load(bytes).unwrap(), Value::Bytes(vec![0, 0xff, b'a', b'b']));
    let bytes = b"\x80\x02c__builtin__\nbytes\nq\x00)Rq\x01.";
    assert_eq!(load(bytes).unwrap(), Value::Bytes(vec![]));
  }

  #[test]
  fn ordered_dict_reduce_then_setitems() {
    // CPython: pickle.dumps(OrderedDict(a=1), protocol=2)
    let bytes = b"\x80\x02ccollections\nOrderedDict\nq\x00)Rq\x01X\x01\x00\x00\x00aq\x02K\x01s.";
    let v = load(bytes).unwrap();
    assert_eq!(v, Value::Dict(vec![(Value::Str("a".into()), Value::Int(1))]));
  }

  #[test]
  fn an_empty_list_flood_stops_at_the_memory_budget() {
    // 4 MB of EMPTY_LIST: one arena node per byte, far more memory than the budget allows per byte
    let mut bytes = vec![0x80, 2];
    bytes.extend(std::iter::repeat_n(b']', 4 << 20));
    bytes.push(b'.');
    match unpickle(&bytes[..], &|_: &str, _: &str| false) {
      Err(UnpickleError::Malformed { reason, pos }) => {
        assert!(reason.contains("expands past"), "{reason}");
        // stopped well before the end: memory stayed within the budget
        assert!(pos < bytes.len(), "{pos}");
      }
      other => panic!("{other:?}"),
    }
  }

  #[test]
  fn shared_references_to_a_big_string_stop_at_the_memory_budget() {
    // one 64 KiB string, then a list of 20 000 memo references to it: 1.3 GB if materialised
    let mut bytes = vec![0x80, 2, b']', b'q', 0, b'X'];
    bytes.extend((64u32 << 10).to_le_bytes());
    bytes.extend(std::iter::repeat_n(b'a', 64 << 10));
    bytes.extend([b'q', 1, b'0', b'(']);
    for _ in 0..20_000 {
      bytes.extend([b'h', 1]);
    }
    bytes.extend([b'e', b'.']);
    match unpickle(&bytes[..], &|_: &str, _: &str| false) {
      Err(UnpickleError::Malformed { reason, .. }) => assert!(reason.contains("expands"), "{reason}"),
      other => panic!("{:?}", other.map(|_| ())),
    }
  }
}
