//! State-dict rules the TypeScript layer needs without saving: torch's flattening (flat keys and where each leaf
//! sits). The rules themselves live in `distcp_core::write::flatten`; this converts and returns.

use crate::errors::{invalid_input as invalid, Result};
use distcp_core::metadata::PathElem;
use distcp_core::write::{flatten, from_tagged_json, Layout, Nested, SaveValue};
use napi_derive::napi;
use serde_json::{json, Value};

/// One flat key: the path to its leaf as positions (index among a dict's entries in order, or a list index), its
/// path as torch records it in `planner_data` (JSON `[str | int, …]`), and whether the leaf is a tensor.
#[napi(object)]
pub struct FlatKey {
  pub key: String,
  pub positions: Vec<u32>,
  pub planner_path: String,
  pub tensor: bool,
}

/// A `planner_data` path as JSON: `[str | int, …]` (dict key, list index). Read back by `ranks.rs`.
pub(crate) fn planner_path_json(p: &[PathElem]) -> Value {
  Value::Array(
    p.iter()
      .map(|e| match e {
        PathElem::Key(k) => json!(k),
        PathElem::Index(i) => json!(i),
      })
      .collect(),
  )
}

/// torch's `flatten_state_dict` over `tree` (the tagged JSON `save` sends, whose `$tensor` entries index
/// `tensorCount` placeholder slots: only which leaves are tensors matters here), in torch's key order.
#[napi]
pub fn flatten_state_dict_keys(tree: String, tensor_count: u32, layout: String) -> Result<Vec<FlatKey>> {
  let layout = Layout::from_name(&layout)
    .ok_or_else(|| invalid(format!("layout must be \"2.4\" or \"2.3\", not {layout:?}")))?;
  let json: serde_json::Value =
    serde_json::from_str(&tree).map_err(|e| invalid(format!("state dict: {e}")))?;
  let empty: Vec<&[u8]> = vec![&[]; tensor_count as usize];
  let value = from_tagged_json(&json, &empty).map_err(|e| invalid(format!("state dict: {e}")))?;
  let items =
    flatten(&value, layout).map_err(|e| invalid(format!("cannot flatten key `{}`: {}", e.key, e.reason)))?;
  Ok(
    items
      .into_iter()
      .map(|i| FlatKey {
        planner_path: planner_path_json(&i.path).to_string(),
        tensor: matches!(i.value, SaveValue::Tensor(_)),
        positions: i.positions.into_iter().map(|p| p as u32).collect(),
        key: i.key,
      })
      .collect(),
  )
}

/// A checkpoint's nested state dict without values ([`distcp_core::write::unflatten`]) as JSON: a leaf is the
/// index of its key, a dict `{"$d": [[key, child], …]}` (in order), a list an array (`null` for a hole).
pub(crate) fn nested_json(n: &Nested) -> Value {
  match n {
    Nested::Leaf(i) => json!(i),
    Nested::Dict(entries) => {
      json!({ "$d": entries.iter().map(|(k, c)| json!([k, nested_json(c)])).collect::<Vec<_>>() })
    }
    Nested::List(items) => {
      Value::Array(items.iter().map(|c| c.as_ref().map_or(Value::Null, nested_json)).collect())
    }
  }
}

/// The deepest nesting a state dict may have (`distcp_core::limits::MAX_NESTING`), so the TypeScript encoder
/// refuses what the core would refuse, with the same number.
#[napi]
pub fn max_nesting() -> u32 {
  distcp_core::limits::MAX_NESTING as u32
}
