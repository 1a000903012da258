//! State-dict rules the TypeScript layer needs without saving: torch's flattening (flat keys and where each leaf
//! sits). The rules themselves live in `distcp_core::write::flatten`; this converts and returns.

use crate::errors::{internal, invalid_input as invalid, Result};
use crate::tagged::json_from_js;
use distcp_core::metadata::PathElem;
use distcp_core::write::{flatten, from_tagged_json, Layout, Nested, SaveValue};
use napi::bindgen_prelude::{Either, Uint32Array, Unknown};
use napi::Env;
use napi_derive::napi;

/// One flat key: the path to its leaf as positions (index among a dict's entries in order, or a list index), its
/// path as torch records it in `planner_data` (dict keys and list indices), and whether the leaf is a tensor.
#[napi(object)]
pub struct FlatKey {
  pub key: String,
  pub positions: Vec<u32>,
  #[napi(ts_type = "Array<string | number>")]
  pub planner_path: Vec<Either<String, f64>>,
  pub tensor: bool,
}

/// A `planner_data` path as JS: dict keys as strings, list indices as numbers. Read back by `ranks.rs`.
pub(crate) fn planner_path_js(p: &[PathElem]) -> Vec<Either<String, f64>> {
  p.iter()
    .map(|e| match e {
      PathElem::Key(k) => Either::A(k.clone()),
      // a list index: far below 2^53 (a list that long cannot be held)
      PathElem::Index(i) => Either::B(*i as f64),
    })
    .collect()
}

/// torch's `flatten_state_dict` over `tree` (the tagged tree `save` sends, whose `$tensor` entries index
/// `tensorCount` placeholder slots: only which leaves are tensors matters here), in torch's key order.
#[napi]
pub fn flatten_state_dict_keys(
  env: &Env,
  #[napi(ts_arg_type = "TaggedValue")] tree: Unknown<'_>,
  tensor_count: u32,
  layout: String,
) -> Result<Vec<FlatKey>> {
  let layout = Layout::from_name(&layout)
    .ok_or_else(|| invalid(format!("layout must be \"2.4\" or \"2.3\", not {layout:?}")))?;
  let json = json_from_js(env, tree, "state dict")?;
  let empty: Vec<&[u8]> = vec![&[]; tensor_count as usize];
  let value = from_tagged_json(&json, &empty).map_err(|e| invalid(format!("state dict: {e}")))?;
  let items =
    flatten(&value, layout).map_err(|e| invalid(format!("cannot flatten key `{}`: {}", e.key, e.reason)))?;
  Ok(
    items
      .into_iter()
      .map(|i| FlatKey {
        planner_path: planner_path_js(&i.path),
        tensor: matches!(i.value, SaveValue::Tensor(_)),
        positions: i.positions.into_iter().map(|p| p as u32).collect(),
        key: i.key,
      })
      .collect(),
  )
}

/// What a node of a `NestedTree` is.
#[napi]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NestedKind {
  /// A value: `values[i]` is the index of its key in `keys()`.
  Leaf,
  /// A dict: `values[i]` is its number of entries; each entry's name is the next of `names`, then its node.
  Dict,
  /// A list: `values[i]` is its length; its items' nodes follow.
  List,
  /// A list index no key reaches (torch pads lists with `None`).
  Hole,
}

/// A checkpoint's nested state dict without values (the core's `write::unflatten`), as its nodes in preorder:
/// node `i` is `kinds[i]` with `values[i]`; a container's children follow it, each child's subtree whole before
/// the next child; `names` holds the entry names of every dict, in the same preorder (one per dict entry).
#[napi(object)]
pub struct NestedTree {
  pub kinds: Vec<NestedKind>,
  pub values: Uint32Array,
  pub names: Vec<String>,
}

/// A count or an index that JS receives as a `u32` (`what` names it). The core's limits and memory keep every one
/// far below `u32::MAX`; one that is not is a bug, reported, never truncated.
pub(crate) fn to_u32(n: usize, what: &str) -> Result<u32> {
  u32::try_from(n)
    .map_err(|_| internal(napi::Error::from_reason(format!("{what} {n} does not fit the u32 JS receives"))))
}

/// [`NestedTree`] of `n`, the nesting [`distcp_core::Checkpoint::nested`] rebuilt.
pub(crate) fn nested_tree(n: &Nested) -> Result<NestedTree> {
  struct Nodes {
    kinds: Vec<NestedKind>,
    values: Vec<u32>,
    names: Vec<String>,
  }
  fn push(n: Option<&Nested>, t: &mut Nodes) -> Result<()> {
    let (kind, value) = match n {
      None => (NestedKind::Hole, 0),
      Some(Nested::Leaf(i)) => (NestedKind::Leaf, to_u32(*i, "a key index")?),
      Some(Nested::Dict(entries)) => (NestedKind::Dict, to_u32(entries.len(), "a dict's length")?),
      Some(Nested::List(items)) => (NestedKind::List, to_u32(items.len(), "a list's length")?),
    };
    t.kinds.push(kind);
    t.values.push(value);
    match n {
      Some(Nested::Dict(entries)) => {
        for (name, child) in entries {
          t.names.push(name.clone());
          push(Some(child), t)?;
        }
      }
      Some(Nested::List(items)) => {
        for item in items {
          push(item.as_ref(), t)?;
        }
      }
      _ => {}
    }
    Ok(())
  }
  let mut t = Nodes { kinds: Vec::new(), values: Vec::new(), names: Vec::new() };
  push(Some(n), &mut t)?;
  Ok(NestedTree { kinds: t.kinds, values: Uint32Array::new(t.values), names: t.names })
}

/// The deepest nesting a state dict may have (`distcp_core::limits::MAX_NESTING`), so the TypeScript encoder
/// refuses what the core would refuse, with the same number.
#[napi]
pub fn max_nesting() -> u32 {
  distcp_core::limits::MAX_NESTING as u32
}
