//! The pickle VM. Objects live in an arena so that memo references share (and see later mutations of) one
//! object, as in Python; the tree handed back is materialised at the end with limits on depth and size, so a
//! hostile stream cannot loop or blow up memory.
//!
//! Memory is what bounds a hostile stream, so the arena is compact: a node is 16 bytes, strings and bytes are
//! ranges of the input rather than copies, tuples (immutable once built) share one pool of ids, and a list or dict
//! gets storage of its own only when something is added to it. Every growth is checked against the budget before
//! it is allocated.
//!
//! Opcode reference: CPython `Lib/pickletools.py`.

use super::value::{BigInt, Global, Object, Value};
use crate::limits::{unpickle_budget, MAX_NESTING as MAX_DEPTH};
use std::cell::Cell;
use std::collections::HashMap;
use std::mem::size_of;

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

/// Index of a node in the arena. Pickles are limited to `u32::MAX` bytes and every opcode makes at most one node,
/// so 32 bits always suffice.
type Id = u32;

/// "No storage yet" for a list, dict or set, and "no state" for an object.
const NONE: u32 = u32::MAX;

#[derive(Debug, Clone, Copy)]
enum Node {
  None,
  Bool(bool),
  Int(i64),
  Float(f64),
  /// UTF-8 text standing in the input at `at..at + len` (checked when pushed).
  Str {
    at: u32,
    len: u32,
  },
  /// Bytes standing in the input at `at..at + len`.
  Bytes {
    at: u32,
    len: u32,
  },
  /// A value built rather than read as it stands (big ints, latin-1 decoded bytes): index into `owned`.
  Owned(u32),
  /// Items at `tuples[at..at + len]`.
  Tuple {
    at: u32,
    len: u32,
  },
  /// Index into `growable` ([`NONE`]: empty so far).
  List(u32),
  /// Index into `growable`, keys and values interleaved ([`NONE`]: empty so far).
  Dict(u32),
  /// Index into `growable` ([`NONE`]: empty so far).
  Set(u32),
  /// Index into `globals`.
  Global(u32),
  /// Index into `objects`.
  Object(u32),
  PersistentId(Id),
}

#[derive(Debug, Clone, Copy)]
struct ObjectNode {
  class: u32,
  /// Arguments at `tuples[args_at..args_at + args_len]`.
  args_at: u32,
  args_len: u32,
  state: Id,
}

/// The tables a stream unpickles into, which the VM ([`Machine`]) fills and an [`Unpickled`] reads in place.
struct Tables {
  arena: Vec<Node>,
  tuples: Vec<Id>,
  growable: Vec<Vec<Id>>,
  owned: Vec<Value>,
  globals: Vec<Global>,
  objects: Vec<ObjectNode>,
}

struct Machine<'a, A: AllowList + ?Sized> {
  data: &'a [u8],
  pos: usize,
  t: Tables,
  global_ids: HashMap<Global, u32>,
  stack: Vec<Id>,
  marks: Vec<u32>,
  /// Memo keys as CPython's pickler writes them (0, 1, 2, ... in order); any other key goes to `memo_sparse`.
  memo: Vec<Id>,
  memo_sparse: HashMap<u64, Id>,
  allow: &'a A,
  /// Heap bytes held beyond the tables' own capacities (the items of growable containers, owned values, names).
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
  let u = unpickle_view_with_budget(data, allow, budget)?;
  // The materialised tree gets what the VM left of the budget: shared memo references could otherwise expand
  // exponentially.
  let mut budget = u.budget.get();
  u.materialise(u.root, 0, &mut budget)
}

/// Unpickles `data` without building a [`Value`] tree: the result is read in place through [`View`]s (no string
/// is copied, no container allocated), which is what a caller turning the stream into its own types wants. Reading
/// it is charged to what the VM left of [`unpickle_budget`] (see [`Unpickled::overspent`]).
pub fn unpickle_view<'a, A: AllowList + ?Sized>(
  data: &'a [u8],
  allow: &A,
) -> Result<Unpickled<'a>, UnpickleError> {
  unpickle_view_with_budget(data, allow, unpickle_budget(data.len()))
}

fn unpickle_view_with_budget<'a, A: AllowList + ?Sized>(
  data: &'a [u8],
  allow: &A,
  budget: usize,
) -> Result<Unpickled<'a>, UnpickleError> {
  if u32::try_from(data.len()).is_err() {
    return Err(UnpickleError::Malformed {
      pos: 0,
      reason: format!("a pickle of {} bytes (4 GiB at most)", data.len()),
    });
  }
  // Small first tables, sized by the pickle (one node per byte at most): a checkpoint has one small pickle per
  // tensor record, and growing a dozen tables from nothing cost more than reading the opcodes (an MoE checkpoint
  // resolves tens of thousands). A few KiB at most, well inside limits::UNPICKLE_BASE_BYTES.
  let first = |n: usize| data.len().min(n);
  let mut m = Machine {
    data,
    pos: 0,
    t: Tables {
      arena: Vec::with_capacity(first(64)),
      tuples: Vec::with_capacity(first(32)),
      growable: Vec::new(),
      owned: Vec::new(),
      globals: Vec::with_capacity(first(8)),
      objects: Vec::with_capacity(first(8)),
    },
    global_ids: HashMap::new(),
    stack: Vec::with_capacity(first(32)),
    marks: Vec::with_capacity(first(8)),
    memo: Vec::with_capacity(first(32)),
    memo_sparse: HashMap::new(),
    allow,
    extra: 0,
    budget,
  };
  let root = m.run()?;
  // the stack and memo are done with: free them before the result is read
  m.stack = Vec::new();
  m.marks = Vec::new();
  m.memo = Vec::new();
  m.memo_sparse = HashMap::new();
  m.global_ids = HashMap::new();
  let left = m.budget.saturating_sub(m.used());
  Ok(Unpickled { data, pos: m.pos, t: m.t, root, budget: Cell::new(left), overspent: Cell::new(false) })
}

/// A stream unpickled by [`unpickle_view`]: the VM's compact nodes, strings still ranges of the input. Memo
/// references share nodes, so a reader can reach one node many times: every [`View`] read that a copy would pay
/// for (a container's items, a string's bytes) is charged to the budget the VM left, as [`unpickle`]'s tree is.
/// Past it, containers read as empty and [`Unpickled::overspent`] says so: a reader checks it before reporting
/// any other error, and before trusting its result.
pub struct Unpickled<'a> {
  data: &'a [u8],
  pos: usize,
  t: Tables,
  root: Id,
  budget: Cell<usize>,
  overspent: Cell<bool>,
}

impl<'a> Unpickled<'a> {
  /// The value the stream evaluates to.
  pub fn root(&self) -> View<'_> {
    View { u: self, id: self.root }
  }

  /// The error to report when reading the value charged more than the budget allowed (see [`Unpickled`]).
  pub fn overspent(&self) -> Option<UnpickleError> {
    self.overspent.get().then(|| UnpickleError::Malformed {
      pos: self.pos,
      reason: "the pickle expands to far more memory than it has bytes (shared references?)".into(),
    })
  }

  /// Takes `bytes` from the budget; false (and [`Unpickled::overspent`] from now on) when it is spent.
  fn charge(&self, bytes: usize) -> bool {
    if self.overspent.get() {
      return false;
    }
    match self.budget.get().checked_sub(bytes) {
      Some(left) => {
        self.budget.set(left);
        true
      }
      None => {
        self.overspent.set(true);
        false
      }
    }
  }

  fn slice(&self, at: u32, len: u32) -> &'a [u8] {
    &self.data[at as usize..at as usize + len as usize]
  }

  fn str_at(&self, at: u32, len: u32) -> &'a str {
    // every Str node was checked as UTF-8 when it was made, so the fallback is never taken
    std::str::from_utf8(self.slice(at, len)).unwrap_or_default()
  }

  fn tuple_items(&self, at: u32, len: u32) -> &[Id] {
    &self.t.tuples[at as usize..at as usize + len as usize]
  }

  fn storage(&self, s: u32) -> &[Id] {
    match s {
      NONE => &[],
      s => &self.t.growable[s as usize],
    }
  }

  fn err<T>(&self, reason: impl Into<String>) -> Result<T, UnpickleError> {
    Err(UnpickleError::Malformed { pos: self.pos, reason: reason.into() })
  }
}

/// One value of an [`Unpickled`] stream, read in place. Reads that would copy in [`unpickle`]'s tree are charged
/// to the stream's budget (see [`Unpickled`]); the others cost nothing.
#[derive(Clone, Copy)]
pub struct View<'u> {
  u: &'u Unpickled<'u>,
  id: Id,
}

/// The items of a tuple, list or set, or the keys and values of a dict (interleaved), as [`View`]s.
#[derive(Clone, Copy)]
pub struct Items<'u> {
  u: &'u Unpickled<'u>,
  ids: &'u [Id],
}

impl<'u> Items<'u> {
  /// How many there are.
  pub fn len(&self) -> usize {
    self.ids.len()
  }

  /// Whether there are none.
  pub fn is_empty(&self) -> bool {
    self.ids.is_empty()
  }

  /// Item `i`.
  pub fn get(&self, i: usize) -> Option<View<'u>> {
    self.ids.get(i).map(|&id| View { u: self.u, id })
  }

  /// Every item in order.
  pub fn iter(&self) -> impl ExactSizeIterator<Item = View<'u>> + 'u {
    let u = self.u;
    self.ids.iter().map(move |&id| View { u, id })
  }

  /// Key-value pairs (of a dict's items).
  pub fn pairs(&self) -> impl Iterator<Item = (View<'u>, View<'u>)> + 'u {
    let u = self.u;
    self.ids.chunks_exact(2).map(move |kv| (View { u, id: kv[0] }, View { u, id: kv[1] }))
  }
}

/// An instance ([`Object`] in [`unpickle`]'s tree), read in place.
#[derive(Clone, Copy)]
pub struct ObjectView<'u> {
  u: &'u Unpickled<'u>,
  node: ObjectNode,
}

impl<'u> ObjectView<'u> {
  /// Its class (or the callable that built it).
  pub fn class(&self) -> &'u Global {
    &self.u.t.globals[self.node.class as usize]
  }

  /// The arguments it was built with (charged).
  pub fn args(&self) -> Items<'u> {
    View::charged(self.u, self.u.tuple_items(self.node.args_at, self.node.args_len), 1)
  }

  /// The state a `BUILD` gave it.
  pub fn state(&self) -> Option<View<'u>> {
    (self.node.state != NONE).then_some(View { u: self.u, id: self.node.state })
  }
}

impl<'u> View<'u> {
  fn node(&self) -> Node {
    self.u.t.arena[self.id as usize]
  }

  /// `ids` as items, charged as the tree's vector of `per` values each would be; empty once the budget is spent.
  fn charged(u: &'u Unpickled<'u>, ids: &'u [Id], per: usize) -> Items<'u> {
    let ids = if u.charge(ids.len().saturating_mul(per * size_of::<Value>())) { ids } else { &[] };
    Items { u, ids }
  }

  /// `None`.
  pub fn is_none(&self) -> bool {
    matches!(self.node(), Node::None)
  }

  /// A bool.
  pub fn as_bool(&self) -> Option<bool> {
    match self.node() {
      Node::Bool(b) => Some(b),
      _ => None,
    }
  }

  /// An int that fits in 64 bits.
  pub fn as_int(&self) -> Option<i64> {
    match self.node() {
      Node::Int(i) => Some(i),
      Node::Owned(o) => match &self.u.t.owned[o as usize] {
        Value::Int(i) => Some(*i),
        _ => None,
      },
      _ => None,
    }
  }

  /// A str, borrowed from the input (charged: the caller usually copies it).
  pub fn as_str(&self) -> Option<&'u str> {
    let s = self.peek_str()?;
    self.u.charge(s.len()).then_some(s)
  }

  /// A str, uncharged: for comparisons that copy nothing.
  fn peek_str(&self) -> Option<&'u str> {
    match self.node() {
      Node::Str { at, len } => Some(self.u.str_at(at, len)),
      Node::Owned(o) => match &self.u.t.owned[o as usize] {
        Value::Str(s) => Some(s.as_str()),
        _ => None,
      },
      _ => None,
    }
  }

  /// Whether this is the str `s` (uncharged; compared as bytes, which UTF-8 makes the same).
  pub fn is_str(&self, s: &str) -> bool {
    match self.node() {
      Node::Str { at, len } => self.u.slice(at, len) == s.as_bytes(),
      _ => self.peek_str() == Some(s),
    }
  }

  /// A global (a class or function named, not called).
  pub fn as_global(&self) -> Option<&'u Global> {
    match self.node() {
      Node::Global(g) => Some(&self.u.t.globals[g as usize]),
      _ => None,
    }
  }

  /// An instance.
  pub fn as_object(&self) -> Option<ObjectView<'u>> {
    match self.node() {
      Node::Object(o) => Some(ObjectView { u: self.u, node: self.u.t.objects[o as usize] }),
      _ => None,
    }
  }

  /// What a persistent id stands for.
  pub fn as_persistent_id(&self) -> Option<View<'u>> {
    match self.node() {
      Node::PersistentId(p) => Some(View { u: self.u, id: p }),
      _ => None,
    }
  }

  /// The items of a tuple or a list (charged).
  pub fn as_seq(&self) -> Option<Items<'u>> {
    match self.node() {
      Node::Tuple { at, len } => Some(View::charged(self.u, self.u.tuple_items(at, len), 1)),
      Node::List(s) => Some(View::charged(self.u, self.u.storage(s), 1)),
      _ => None,
    }
  }

  /// The items of a tuple (charged).
  pub fn as_tuple(&self) -> Option<Items<'u>> {
    match self.node() {
      Node::Tuple { at, len } => Some(View::charged(self.u, self.u.tuple_items(at, len), 1)),
      _ => None,
    }
  }

  /// The keys and values of a dict, interleaved (charged; read them with [`Items::pairs`]).
  pub fn as_dict(&self) -> Option<Items<'u>> {
    match self.node() {
      Node::Dict(s) => Some(View::charged(self.u, self.u.storage(s), 1)),
      _ => None,
    }
  }

  /// The value of str key `key` in a dict (the scan is charged as the tree's dict would be once per lookup).
  pub fn get(&self, key: &str) -> Option<View<'u>> {
    self.as_dict()?.pairs().find(|(k, _)| k.is_str(key)).map(|(_, v)| v)
  }

  /// What kind of value this is, in Python's words (for messages).
  pub fn type_name(&self) -> &'static str {
    match self.node() {
      Node::None => "None",
      Node::Bool(_) => "bool",
      Node::Int(_) => "int",
      Node::Float(_) => "float",
      Node::Str { .. } => "str",
      Node::Bytes { .. } => "bytes",
      Node::Owned(o) => self.u.t.owned[o as usize].type_name(),
      Node::Tuple { .. } => "tuple",
      Node::List(_) => "list",
      Node::Dict(_) => "dict",
      Node::Set(_) => "set",
      Node::Global(_) => "global",
      Node::Object(_) => "object",
      Node::PersistentId(_) => "persistent id",
    }
  }

  /// The value as [`unpickle`] would have returned it (charged like it).
  pub fn to_value(&self) -> Result<Value, UnpickleError> {
    let mut budget = self.u.budget.get();
    let v = self.u.materialise(self.id, 0, &mut budget);
    self.u.budget.set(budget);
    v
  }
}

/// Grows `v` by one slot if it is full, first checking that the doubled capacity fits the budget (`used` is what
/// the machine holds now, `v` included).
fn reserve_one<T>(v: &mut Vec<T>, used: usize, budget: usize) -> Result<(), String> {
  if v.len() < v.capacity() {
    return Ok(());
  }
  let more = v.capacity().max(4);
  if used.saturating_add(more.saturating_mul(size_of::<T>())) > budget {
    return Err(format!(
      "the pickle expands past {budget} bytes of memory ({} per byte of pickle, limits::UNPICKLE_BYTES_PER_INPUT_BYTE)",
      crate::limits::UNPICKLE_BYTES_PER_INPUT_BYTE
    ));
  }
  v.try_reserve_exact(more).map_err(|_| "out of memory while unpickling".to_owned())
}

impl<A: AllowList + ?Sized> Machine<'_, A> {
  fn err<T>(&self, reason: impl Into<String>) -> Result<T, UnpickleError> {
    Err(UnpickleError::Malformed { pos: self.pos, reason: reason.into() })
  }

  fn over_budget<T>(&self, reason: String) -> Result<T, UnpickleError> {
    self.err(reason)
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

  /// Skips `n` bytes and returns where they start (fits u32: the whole input does).
  fn take_range(&mut self, n: usize) -> Result<(u32, u32), UnpickleError> {
    let at = self.pos;
    self.take(n)?;
    Ok((at as u32, n as u32))
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

  /// The rest of the current line (without its newline) as a range of the input.
  fn line_range(&mut self) -> Result<(u32, u32), UnpickleError> {
    let rest = &self.data[self.pos..];
    let Some(nl) = rest.iter().position(|&b| b == b'\n') else {
      return self.err("truncated: missing end of line");
    };
    let at = self.pos;
    self.pos += nl + 1;
    Ok((at as u32, nl as u32))
  }

  fn slice(&self, at: u32, len: u32) -> &[u8] {
    &self.data[at as usize..at as usize + len as usize]
  }

  fn str_at(&self, at: u32, len: u32) -> &str {
    // every Str node was checked as UTF-8 when it was made, so the fallback is never taken
    std::str::from_utf8(self.slice(at, len)).unwrap_or_default()
  }

  fn line_str(&mut self) -> Result<String, UnpickleError> {
    let (at, len) = self.line_range()?;
    match std::str::from_utf8(self.slice(at, len)) {
      Ok(s) => Ok(s.to_owned()),
      Err(_) => self.err("text line is not UTF-8"),
    }
  }

  /// A text node for `at..at + len`, checked as UTF-8.
  fn text(&self, at: u32, len: u32) -> Result<Node, UnpickleError> {
    match std::str::from_utf8(self.slice(at, len)) {
      Ok(_) => Ok(Node::Str { at, len }),
      Err(_) => self.err("string is not valid UTF-8"),
    }
  }

  fn utf8(&mut self, n: usize) -> Result<Node, UnpickleError> {
    let (at, len) = self.take_range(n)?;
    self.text(at, len)
  }

  fn bytes(&mut self, n: usize) -> Result<Node, UnpickleError> {
    let (at, len) = self.take_range(n)?;
    Ok(Node::Bytes { at, len })
  }

  /// Approximate heap bytes the VM holds now.
  fn used(&self) -> usize {
    self.t.arena.capacity() * size_of::<Node>()
      + self.t.tuples.capacity() * size_of::<Id>()
      + self.t.growable.capacity() * size_of::<Vec<Id>>()
      + self.t.owned.capacity() * size_of::<Value>()
      + self.t.globals.capacity() * size_of::<Global>()
      + self.global_ids.capacity() * (size_of::<Global>() + size_of::<u32>() + 8)
      + self.t.objects.capacity() * size_of::<ObjectNode>()
      + (self.stack.capacity() + self.marks.capacity() + self.memo.capacity()) * size_of::<u32>()
      + self.memo_sparse.capacity() * (size_of::<u64>() + size_of::<Id>() + 8)
      + self.extra
  }

  fn alloc(&mut self, node: Node) -> Result<Id, UnpickleError> {
    // the budget is looked at only when the table must grow
    if self.t.arena.len() == self.t.arena.capacity() {
      let used = self.used();
      if let Err(e) = reserve_one(&mut self.t.arena, used, self.budget) {
        return self.over_budget(e);
      }
    }
    self.t.arena.push(node);
    Ok((self.t.arena.len() - 1) as Id)
  }

  fn push_id(&mut self, id: Id) -> Result<(), UnpickleError> {
    // the budget is looked at only when the table must grow
    if self.stack.len() == self.stack.capacity() {
      let used = self.used();
      if let Err(e) = reserve_one(&mut self.stack, used, self.budget) {
        return self.over_budget(e);
      }
    }
    self.stack.push(id);
    Ok(())
  }

  fn push(&mut self, node: Node) -> Result<(), UnpickleError> {
    let id = self.alloc(node)?;
    self.push_id(id)
  }

  /// A node for a value that cannot be a range of the input.
  fn owned(&mut self, v: Value) -> Result<Node, UnpickleError> {
    self.extra += match &v {
      Value::Str(s) => s.len(),
      Value::Bytes(b) => b.len(),
      Value::BigInt(b) => b.0.len(),
      _ => 0,
    };
    // the budget is looked at only when the table must grow
    if self.t.owned.len() == self.t.owned.capacity() {
      let used = self.used();
      if let Err(e) = reserve_one(&mut self.t.owned, used, self.budget) {
        return self.over_budget(e);
      }
    }
    self.t.owned.push(v);
    Ok(Node::Owned((self.t.owned.len() - 1) as u32))
  }

  /// Moves the stack's items above `start` into the tuple pool and returns where they stand there.
  fn tuple_from_stack(&mut self, start: usize) -> Result<(u32, u32), UnpickleError> {
    let (at, n) = (self.t.tuples.len(), self.stack.len() - start);
    if self.used().saturating_add(n * 2 * size_of::<Id>()) > self.budget {
      return self.over_budget(format!("the pickle expands past {} bytes of memory", self.budget));
    }
    if self.t.tuples.try_reserve(n).is_err() {
      return self.err("out of memory while unpickling");
    }
    self.t.tuples.extend_from_slice(&self.stack[start..]);
    self.stack.truncate(start);
    Ok((at as u32, n as u32))
  }

  fn tuple_items(&self, at: u32, len: u32) -> &[Id] {
    &self.t.tuples[at as usize..at as usize + len as usize]
  }

  fn floor(&self) -> usize {
    self.marks.last().map_or(0, |&m| m as usize)
  }

  fn pop(&mut self) -> Result<Id, UnpickleError> {
    if self.stack.len() <= self.floor() {
      return self.err("stack underflow");
    }
    match self.stack.pop() {
      Some(id) => Ok(id),
      None => self.err("stack underflow"),
    }
  }

  fn top(&self) -> Result<Id, UnpickleError> {
    match self.stack.last() {
      Some(&id) if self.stack.len() > self.floor() => Ok(id),
      _ => self.err("stack underflow"),
    }
  }

  /// Removes the innermost MARK and returns where its items start on the stack (the caller takes
  /// `stack[start..]` and truncates).
  fn pop_mark(&mut self) -> Result<usize, UnpickleError> {
    match self.marks.pop() {
      Some(m) => Ok(m as usize),
      None => self.err("no MARK on the stack"),
    }
  }

  fn mark(&mut self) -> Result<(), UnpickleError> {
    // the budget is looked at only when the table must grow
    if self.marks.len() == self.marks.capacity() {
      let used = self.used();
      if let Err(e) = reserve_one(&mut self.marks, used, self.budget) {
        return self.over_budget(e);
      }
    }
    self.marks.push(self.stack.len() as u32);
    Ok(())
  }

  fn global(&mut self, module: String, name: String) -> Result<(), UnpickleError> {
    if !self.allow.allows(&module, &name) {
      return Err(UnpickleError::Forbidden { module, name });
    }
    let g = Global { module, name };
    let idx = match self.global_ids.get(&g) {
      Some(&i) => i,
      None => {
        self.extra += 2 * (g.module.len() + g.name.len());
        let i = self.t.globals.len() as u32;
        self.t.globals.push(g.clone());
        self.global_ids.insert(g, i);
        i
      }
    };
    self.push(Node::Global(idx))
  }

  fn as_global(&self, id: Id, what: &str) -> Result<u32, UnpickleError> {
    match self.t.arena[id as usize] {
      Node::Global(g) => Ok(g),
      _ => self.err(format!("{what} expects a class or function, found something else")),
    }
  }

  fn args_tuple(&self, id: Id, what: &str) -> Result<(u32, u32), UnpickleError> {
    match self.t.arena[id as usize] {
      Node::Tuple { at, len } => Ok((at, len)),
      _ => self.err(format!("{what} expects an argument tuple")),
    }
  }

  fn object(&mut self, class: u32, args_at: u32, args_len: u32) -> Result<Node, UnpickleError> {
    // the budget is looked at only when the table must grow
    if self.t.objects.len() == self.t.objects.capacity() {
      let used = self.used();
      if let Err(e) = reserve_one(&mut self.t.objects, used, self.budget) {
        return self.over_budget(e);
      }
    }
    self.t.objects.push(ObjectNode { class, args_at, args_len, state: NONE });
    Ok(Node::Object((self.t.objects.len() - 1) as u32))
  }

  /// A fresh growable container's storage, holding `items` (counted with the slack a doubling Vec keeps).
  fn storage(&mut self, items: Vec<Id>) -> Result<u32, UnpickleError> {
    // the budget is looked at only when the table must grow
    if self.t.growable.len() == self.t.growable.capacity() {
      let used = self.used();
      if let Err(e) = reserve_one(&mut self.t.growable, used, self.budget) {
        return self.over_budget(e);
      }
    }
    self.extra += 2 * items.len() * size_of::<Id>();
    self.t.growable.push(items);
    Ok((self.t.growable.len() - 1) as u32)
  }

  /// Items of a list, tuple or set node (empty for anything else).
  fn seq_items(&self, id: Id) -> &[Id] {
    match self.t.arena[id as usize] {
      Node::Tuple { at, len } => self.tuple_items(at, len),
      Node::List(s) | Node::Set(s) if s != NONE => &self.t.growable[s as usize],
      _ => &[],
    }
  }

  /// `callable(*args)`. A few builtin containers are turned into their values so later SETITEMS/APPENDS work.
  fn call(&mut self, class: u32, args_at: u32, args_len: u32) -> Result<Node, UnpickleError> {
    let g = &self.t.globals[class as usize];
    let is = |m: &str, n: &str| g.module == m && g.name == n;
    if is("collections", "OrderedDict") && args_len == 0 {
      return Ok(Node::Dict(NONE));
    }
    if (is("builtins", "set") || is("builtins", "frozenset") || is("__builtin__", "set")) && args_len <= 1 {
      let items: Vec<Id> = match args_len {
        1 => self.seq_items(self.t.tuples[args_at as usize]).to_vec(),
        _ => Vec::new(),
      };
      return Ok(Node::Set(if items.is_empty() { NONE } else { self.storage(items)? }));
    }
    // protocol 2 has no bytes opcode: CPython pickles bytes as `_codecs.encode(latin-1 text, 'latin1')`, and
    // b'' as `bytes()`
    if is("_codecs", "encode") && args_len == 2 {
      let args = self.tuple_items(args_at, args_len);
      if let (Node::Str { at: ta, len: tl }, Node::Str { at: ea, len: el }) =
        (self.t.arena[args[0] as usize], self.t.arena[args[1] as usize])
      {
        let enc = self.str_at(ea, el);
        if enc == "latin1" || enc == "latin-1" {
          let bytes: Option<Vec<u8>> =
            self.str_at(ta, tl).chars().map(|c| u8::try_from(u32::from(c)).ok()).collect();
          if let Some(bytes) = bytes {
            return self.owned(Value::Bytes(bytes));
          }
        }
      }
    }
    if (is("builtins", "bytes") || is("__builtin__", "bytes")) && args_len == 0 {
      return Ok(Node::Bytes { at: 0, len: 0 });
    }
    self.object(class, args_at, args_len)
  }

  fn memo_put(&mut self, key: u64) -> Result<(), UnpickleError> {
    let id = self.top()?;
    match usize::try_from(key) {
      Ok(k) if k < self.memo.len() => self.memo[k] = id,
      Ok(k) if k == self.memo.len() => {
        if self.memo.len() == self.memo.capacity() {
          let used = self.used();
          if let Err(e) = reserve_one(&mut self.memo, used, self.budget) {
            return self.over_budget(e);
          }
        }
        self.memo.push(id);
      }
      _ => {
        if self.used() + 64 > self.budget {
          return self.over_budget(format!("the pickle expands past {} bytes of memory", self.budget));
        }
        self.memo_sparse.insert(key, id);
      }
    }
    Ok(())
  }

  fn memo_get(&mut self, key: u64) -> Result<(), UnpickleError> {
    let found = match usize::try_from(key) {
      Ok(k) if k < self.memo.len() => Some(self.memo[k]),
      _ => self.memo_sparse.get(&key).copied(),
    };
    match found {
      Some(id) => self.push_id(id),
      None => self.err(format!("memo key {key} was never stored")),
    }
  }

  /// Appends `items` (taken from the stack above `start`) to the storage of container `target`, creating it
  /// on first use. `pairs` asks for an even count (dict items).
  fn extend(&mut self, target: Id, start: usize, pairs: bool) -> Result<(), UnpickleError> {
    let n = self.stack.len() - start;
    if pairs && !n.is_multiple_of(2) {
      return self.err("SETITEMS with an odd number of items");
    }
    let slot = match self.t.arena[target as usize] {
      Node::Dict(s) if pairs => s,
      Node::List(s) | Node::Set(s) if !pairs => s,
      _ if pairs => return self.err("SETITEM(S) on something that is not a dict"),
      _ => return self.err("APPEND(S) on something that is not a list"),
    };
    // growth of the target's storage, with the slack a doubling Vec keeps
    if self.used().saturating_add(2 * n * size_of::<Id>()) > self.budget {
      return self.over_budget(format!("the pickle expands past {} bytes of memory", self.budget));
    }
    if slot == NONE {
      let items = self.stack.split_off(start);
      let s = self.storage(items)?;
      self.t.arena[target as usize] = match self.t.arena[target as usize] {
        Node::Dict(_) => Node::Dict(s),
        Node::Set(_) => Node::Set(s),
        _ => Node::List(s),
      };
    } else {
      self.extra += 2 * n * size_of::<Id>();
      self.t.growable[slot as usize].extend_from_slice(&self.stack[start..]);
      self.stack.truncate(start);
    }
    Ok(())
  }

  /// Pushes `items` (ids not on the stack) onto it and extends `target` with them.
  fn extend_with(&mut self, target: Id, items: &[Id], pairs: bool) -> Result<(), UnpickleError> {
    let start = self.stack.len();
    for &i in items {
      self.push_id(i)?;
    }
    self.extend(target, start, pairs)
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
        b'(' => self.mark()?,
        b'0' => {
          self.pop()?;
        }
        b'1' => {
          let start = self.pop_mark()?;
          self.stack.truncate(start);
        }
        b'2' => {
          let id = self.top()?;
          self.push_id(id)?;
        }
        b'N' => self.push(Node::None)?,
        0x88 => self.push(Node::Bool(true))?,
        0x89 => self.push(Node::Bool(false))?,
        b'J' => {
          let v = i32::from_le_bytes(self.le::<4>()?);
          self.push(Node::Int(i64::from(v)))?;
        }
        b'K' => {
          let v = self.u8()?;
          self.push(Node::Int(i64::from(v)))?;
        }
        b'M' => {
          let v = u16::from_le_bytes(self.le::<2>()?);
          self.push(Node::Int(i64::from(v)))?;
        }
        b'I' => {
          let s = self.line_str()?;
          let v = match s.as_str() {
            "01" => Node::Bool(true),
            "00" => Node::Bool(false),
            t => match t.parse::<i64>() {
              Ok(i) => Node::Int(i),
              Err(_) => return self.err(format!("bad INT literal {t:?}")),
            },
          };
          self.push(v)?;
        }
        b'L' => {
          let s = self.line_str()?;
          let t = s.trim_end_matches('L');
          match t.parse::<i64>() {
            Ok(i) => self.push(Node::Int(i))?,
            Err(_) => return self.err(format!("LONG literal {t:?} is out of range")),
          }
        }
        0x8a => {
          let n = usize::from(self.u8()?);
          let bytes = self.take(n)?.to_vec();
          self.push_long(bytes)?;
        }
        0x8b => {
          let n = i32::from_le_bytes(self.le::<4>()?);
          let Ok(n) = usize::try_from(n) else {
            return self.err("LONG4 with a negative length");
          };
          if n > crate::limits::MAX_INT_BYTES {
            return self.err(format!(
              "an int of {n} bytes (distcp reads ints up to {} bytes, about {} digits)",
              crate::limits::MAX_INT_BYTES,
              crate::limits::MAX_INT_DIGITS
            ));
          }
          let bytes = self.take(n)?.to_vec();
          self.push_long(bytes)?;
        }
        b'G' => {
          let v = f64::from_be_bytes(self.le::<8>()?);
          self.push(Node::Float(v))?;
        }
        b'F' => {
          let s = self.line_str()?;
          match s.trim().parse::<f64>() {
            Ok(v) => self.push(Node::Float(v))?,
            Err(_) => return self.err(format!("bad FLOAT literal {s:?}")),
          }
        }
        b'X' => {
          let n = u32::from_le_bytes(self.le::<4>()?) as usize;
          let v = self.utf8(n)?;
          self.push(v)?;
        }
        0x8c => {
          let n = usize::from(self.u8()?);
          let v = self.utf8(n)?;
          self.push(v)?;
        }
        0x8d => {
          let n = self.len_u64()?;
          let v = self.utf8(n)?;
          self.push(v)?;
        }
        b'V' => {
          // protocol 0 raw-unicode-escape; plain ASCII/UTF-8 is all DCP could produce
          let (at, len) = self.line_range()?;
          let v = match std::str::from_utf8(self.slice(at, len)) {
            Ok(_) => Node::Str { at, len },
            Err(_) => return self.err("text line is not UTF-8"),
          };
          self.push(v)?;
        }
        b'T' | b'B' => {
          let n = u32::from_le_bytes(self.le::<4>()?) as usize;
          let v = self.bytes(n)?;
          self.push(v)?;
        }
        b'U' | b'C' => {
          let n = usize::from(self.u8()?);
          let v = self.bytes(n)?;
          self.push(v)?;
        }
        b'S' => {
          let (at, len) = self.line_range()?;
          let l = self.slice(at, len);
          let quoted = len >= 2 && (l[0] == b'\'' || l[0] == b'"') && l[len as usize - 1] == l[0];
          if !quoted {
            return self.err("bad STRING literal");
          }
          self.push(Node::Bytes { at: at + 1, len: len - 2 })?;
        }
        0x8e | 0x96 => {
          let n = self.len_u64()?;
          let v = self.bytes(n)?;
          self.push(v)?;
        }
        b']' => self.push(Node::List(NONE))?,
        b'l' => {
          let start = self.pop_mark()?;
          let items = self.stack.split_off(start);
          let s = if items.is_empty() { NONE } else { self.storage(items)? };
          self.push(Node::List(s))?;
        }
        b'a' => {
          let list = {
            let item = self.pop()?;
            let list = self.top()?;
            self.push_id(item)?;
            list
          };
          let start = self.stack.len() - 1;
          self.extend(list, start, false)?;
        }
        b'e' => {
          let start = self.pop_mark()?;
          if start == 0 {
            return self.err("stack underflow");
          }
          let list = self.stack[start - 1];
          if start <= self.floor() {
            return self.err("stack underflow");
          }
          self.extend(list, start, false)?;
        }
        b')' => self.push(Node::Tuple { at: 0, len: 0 })?,
        b't' => {
          let start = self.pop_mark()?;
          let (at, len) = self.tuple_from_stack(start)?;
          self.push(Node::Tuple { at, len })?;
        }
        0x85..=0x87 => {
          let n = usize::from(op - 0x84);
          if self.stack.len() < self.floor() + n {
            return self.err("stack underflow");
          }
          let start = self.stack.len() - n;
          let (at, len) = self.tuple_from_stack(start)?;
          self.push(Node::Tuple { at, len })?;
        }
        b'}' => self.push(Node::Dict(NONE))?,
        b'd' => {
          let start = self.pop_mark()?;
          let dict = self.alloc(Node::Dict(NONE))?;
          self.extend(dict, start, true)?;
          self.push_id(dict)?;
        }
        b's' => {
          if self.stack.len() < self.floor() + 3 {
            return self.err("stack underflow");
          }
          let start = self.stack.len() - 2;
          let dict = self.stack[start - 1];
          self.extend(dict, start, true)?;
        }
        b'u' => {
          let start = self.pop_mark()?;
          if start == 0 || start <= self.floor() {
            return self.err("stack underflow");
          }
          let dict = self.stack[start - 1];
          self.extend(dict, start, true)?;
        }
        0x8f => self.push(Node::Set(NONE))?,
        0x90 => {
          let start = self.pop_mark()?;
          if start == 0 || start <= self.floor() {
            return self.err("stack underflow");
          }
          let set = self.stack[start - 1];
          self.extend(set, start, false)?;
        }
        0x91 => {
          let start = self.pop_mark()?;
          let items = self.stack.split_off(start);
          let s = if items.is_empty() { NONE } else { self.storage(items)? };
          self.push(Node::Set(s))?;
        }
        b'c' => {
          let module = self.line_str()?;
          let name = self.line_str()?;
          self.global(module, name)?;
        }
        0x93 => {
          let name = self.pop()?;
          let module = self.pop()?;
          let (Node::Str { at: ma, len: ml }, Node::Str { at: na, len: nl }) =
            (self.t.arena[module as usize], self.t.arena[name as usize])
          else {
            return self.err("STACK_GLOBAL expects two strings");
          };
          let (m, n) = (self.str_at(ma, ml).to_owned(), self.str_at(na, nl).to_owned());
          self.global(m, n)?;
        }
        b'R' => {
          let args = self.pop()?;
          let callable = self.pop()?;
          let class = self.as_global(callable, "REDUCE")?;
          let (at, len) = self.args_tuple(args, "REDUCE")?;
          let node = self.call(class, at, len)?;
          self.push(node)?;
        }
        0x81 => {
          let args = self.pop()?;
          let cls = self.pop()?;
          let class = self.as_global(cls, "NEWOBJ")?;
          let (at, len) = self.args_tuple(args, "NEWOBJ")?;
          let node = self.object(class, at, len)?;
          self.push(node)?;
        }
        0x92 => {
          let _kwargs = self.pop()?;
          let args = self.pop()?;
          let cls = self.pop()?;
          let class = self.as_global(cls, "NEWOBJ_EX")?;
          let (at, len) = self.args_tuple(args, "NEWOBJ_EX")?;
          let node = self.object(class, at, len)?;
          self.push(node)?;
        }
        b'i' => {
          let module = self.line_str()?;
          let name = self.line_str()?;
          let start = self.pop_mark()?;
          if !self.allow.allows(&module, &name) {
            return Err(UnpickleError::Forbidden { module, name });
          }
          self.global(module, name)?;
          let cls = self.pop()?;
          let class = self.as_global(cls, "INST")?;
          let (at, len) = self.tuple_from_stack(start)?;
          let node = self.object(class, at, len)?;
          self.push(node)?;
        }
        b'o' => {
          let start = self.pop_mark()?;
          let Some(&cls) = self.stack.get(start) else {
            return self.err("OBJ without a class");
          };
          let class = self.as_global(cls, "OBJ")?;
          let (at, len) = self.tuple_from_stack(start + 1)?;
          self.stack.truncate(start);
          let node = self.object(class, at, len)?;
          self.push(node)?;
        }
        b'b' => {
          let state = self.pop()?;
          let target = self.top()?;
          match self.t.arena[target as usize] {
            Node::Object(o) => self.t.objects[o as usize].state = state,
            // BUILD on a dict merges attributes into it, which is how a dict subclass would behave
            Node::Dict(_) => {
              if let Node::Dict(s) = self.t.arena[state as usize] {
                if s != NONE {
                  let items = self.t.growable[s as usize].clone();
                  self.extend_with(target, &items, true)?;
                }
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
          let k = (self.memo.len() + self.memo_sparse.len()) as u64;
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
          self.push(Node::PersistentId(pid))?;
        }
        b'P' => {
          let (at, len) = self.line_range()?;
          let text = self.text(at, len)?;
          let pid = self.alloc(text)?;
          self.push(Node::PersistentId(pid))?;
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

  fn push_long(&mut self, bytes: Vec<u8>) -> Result<(), UnpickleError> {
    match long_value(bytes) {
      Value::Int(i) => self.push(Node::Int(i)),
      big => {
        let node = self.owned(big)?;
        self.push(node)
      }
    }
  }
}

impl Unpickled<'_> {
  /// Takes `bytes` from the materialising budget, or stops: shared memo references could otherwise expand
  /// exponentially.
  fn charge_to(&self, budget: &mut usize, bytes: usize) -> Result<(), UnpickleError> {
    match budget.checked_sub(bytes) {
      Some(left) => {
        *budget = left;
        Ok(())
      }
      None => self.err("the pickle expands to far more memory than it has bytes (shared references?)"),
    }
  }

  /// A vector for `n` items, charged before it is allocated.
  fn vec_for<T>(&self, n: usize, budget: &mut usize) -> Result<Vec<T>, UnpickleError> {
    self.charge_to(budget, n.saturating_mul(size_of::<T>()))?;
    let mut out = Vec::new();
    if out.try_reserve_exact(n).is_err() {
      return self.err("out of memory while unpickling");
    }
    Ok(out)
  }

  /// The value of node `id`. Each value's heap (a container's items, a string's bytes, a box) is charged to
  /// `budget` before it is allocated; the value itself is charged by whoever holds it.
  fn materialise(&self, id: Id, depth: usize, budget: &mut usize) -> Result<Value, UnpickleError> {
    if depth > MAX_DEPTH {
      return self.err("nesting too deep (a reference cycle?)");
    }
    let many = |ids: &[Id], budget: &mut usize| -> Result<Vec<Value>, UnpickleError> {
      let mut out = self.vec_for(ids.len(), budget)?;
      for &i in ids {
        out.push(self.materialise(i, depth + 1, budget)?);
      }
      Ok(out)
    };
    let storage = |s: u32| -> &[Id] {
      match s {
        NONE => &[],
        s => &self.t.growable[s as usize],
      }
    };
    let global = |g: u32, budget: &mut usize| -> Result<Global, UnpickleError> {
      let g = &self.t.globals[g as usize];
      self.charge_to(budget, g.module.len() + g.name.len())?;
      Ok(g.clone())
    };
    Ok(match self.t.arena[id as usize] {
      Node::None => Value::None,
      Node::Bool(b) => Value::Bool(b),
      Node::Int(i) => Value::Int(i),
      Node::Float(f) => Value::Float(f),
      Node::Str { at, len } => {
        self.charge_to(budget, len as usize)?;
        Value::Str(self.str_at(at, len).to_owned())
      }
      Node::Bytes { at, len } => {
        self.charge_to(budget, len as usize)?;
        Value::Bytes(self.slice(at, len).to_vec())
      }
      Node::Owned(o) => {
        let v = &self.t.owned[o as usize];
        self.charge_to(
          budget,
          match v {
            Value::Bytes(b) => b.len(),
            Value::BigInt(b) => b.0.len(),
            _ => 0,
          },
        )?;
        v.clone()
      }
      Node::List(s) => Value::List(many(storage(s), budget)?),
      Node::Tuple { at, len } => Value::Tuple(many(self.tuple_items(at, len), budget)?),
      Node::Set(s) => Value::Set(many(storage(s), budget)?),
      Node::Dict(s) => {
        let items = storage(s);
        let mut out = self.vec_for(items.len() / 2, budget)?;
        for kv in items.chunks_exact(2) {
          out
            .push((self.materialise(kv[0], depth + 1, budget)?, self.materialise(kv[1], depth + 1, budget)?));
        }
        Value::Dict(out)
      }
      Node::Global(g) => {
        self.charge_to(budget, size_of::<Global>())?;
        Value::Global(Box::new(global(g, budget)?))
      }
      Node::Object(o) => {
        let o = self.t.objects[o as usize];
        self.charge_to(budget, size_of::<Object>())?;
        Value::Object(Box::new(Object {
          class: global(o.class, budget)?,
          args: many(self.tuple_items(o.args_at, o.args_len), budget)?,
          state: match o.state {
            NONE => None,
            s => Some(self.materialise(s, depth + 1, budget)?),
          },
        }))
      }
      Node::PersistentId(p) => {
        self.charge_to(budget, size_of::<Value>())?;
        Value::PersistentId(Box::new(self.materialise(p, depth + 1, budget)?))
      }
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
  fn a_view_reads_in_place_and_charges_shared_reads() {
    // pickle.dumps({'a': [1, 'xy'], 'b': (None, True)}, protocol=2)
    let bytes = b"\x80\x02}q\x00(X\x01\x00\x00\x00aq\x01]q\x02(K\x01X\x02\x00\x00\x00xyq\x03eX\x01\x00\x00\x00bq\x04N\x88\x86q\x05u.";
    let u = unpickle_view(bytes, &any).unwrap();
    let root = u.root();
    let a = root.get("a").and_then(|v| v.as_seq()).unwrap();
    assert_eq!(
      (a.len(), a.get(0).and_then(|v| v.as_int()), a.get(1).and_then(|v| v.as_str())),
      (2, Some(1), Some("xy"))
    );
    let b = root.get("b").and_then(|v| v.as_tuple()).unwrap();
    assert!(b.get(0).unwrap().is_none() && b.get(1).unwrap().as_bool() == Some(true));
    assert!(root.get("c").is_none() && u.overspent().is_none());
    assert_eq!(root.to_value().unwrap(), load(bytes).unwrap());

    // a = []; for _ in range(40): a = [a, a]: walking every path visits 2^40 nodes; the walk is charged, stops
    // finding items once the budget is spent, and says so
    let mut bytes = b"\x80\x02]q\x00".to_vec();
    for i in 0..40u8 {
      bytes.extend_from_slice(&[b'h', i, b'h', i, 0x86, b'q', i + 1]);
    }
    bytes.push(b'.');
    let u = unpickle_view(&bytes, &any).unwrap();
    fn walk(v: View<'_>) -> u64 {
      v.as_seq().map_or(1, |items| items.iter().map(walk).sum::<u64>() + 1)
    }
    let visited = walk(u.root());
    assert!(visited < 1 << 20, "{visited}");
    assert!(matches!(u.overspent(), Some(UnpickleError::Malformed { .. })));
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
    // 4 MB of EMPTY_LIST: one arena node (16 bytes) and one stack slot (4) per byte, given 8 bytes per byte
    let mut bytes = vec![0x80, 2];
    bytes.extend(std::iter::repeat_n(b']', 4 << 20));
    bytes.push(b'.');
    match unpickle_with_budget(&bytes[..], &|_: &str, _: &str| false, 8 * bytes.len()) {
      Err(UnpickleError::Malformed { reason, pos }) => {
        assert!(reason.contains("expands past"), "{reason}");
        // stopped well before the end: memory stayed within the budget
        assert!(pos < bytes.len() / 2, "{pos}");
      }
      other => panic!("{:?}", other.map(|_| ())),
    }
    // with the default budget the same flood is legal (each list is a real, if useless, value)
    assert!(unpickle(&bytes[..], &|_: &str, _: &str| false).is_ok());
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
