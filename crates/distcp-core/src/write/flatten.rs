//! Nested state dict → flat keys, exactly as `torch.distributed.checkpoint`'s `flatten_state_dict` does it (spec
//! §3), in either traversal generation.

use crate::metadata::PathElem;
use crate::write::value::{SaveValue, MAX_DEPTH};

/// Which PyTorch traversal decides what is a leaf.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Layout {
  /// torch ≥ 2.4 (`traverse_state_dict`): dicts are always recursed (an empty dict leaves no key); a list is
  /// recursed only if it holds a tensor, a dict or a recursed list; tuples and everything else are leaves.
  #[default]
  Torch24,
  /// torch ≤ 2.3 (`traverse_state_dict_v_2_3`): a dict or list holding no tensor and no recursed container is
  /// one leaf (an empty dict included); others are recursed; tuples are leaves.
  Torch23,
}

impl Layout {
  /// The layout for a torch version string as users write it (`2.4`/`torch24`, `2.3`/`torch23`).
  pub fn from_name(name: &str) -> Option<Layout> {
    match name {
      "2.4" | "torch24" => Some(Layout::Torch24),
      "2.3" | "torch23" => Some(Layout::Torch23),
      _ => None,
    }
  }
}

/// One item of the flattened state dict.
#[derive(Debug, Clone, PartialEq)]
pub struct FlatItem<'v, 'a> {
  /// `".".join(str(p) for p in path)`.
  pub key: String,
  /// The path in the nested state dict (`planner_data`): dict keys as `str(key)`, list indices as ints.
  pub path: Vec<PathElem>,
  /// The same path as positions: the index of each step among its dict's entries (in order) or its list's items,
  /// so a caller holding the original tree (with its original key objects) can find the leaf without `str(key)`.
  pub positions: Vec<usize>,
  /// The leaf value saved under `key`.
  pub value: &'v SaveValue<'a>,
}

/// Why a state dict cannot be flattened; `key` is the flat key (or the path so far).
#[derive(Debug, Clone, PartialEq)]
pub struct FlattenError {
  /// The flat key (or path so far) where flattening failed.
  pub key: String,
  /// What is wrong with the value there.
  pub reason: String,
}

/// A path's flat key, as torch's `flatten_state_dict` makes it: the elements joined with dots (indices in decimal).
pub fn join(path: &[PathElem]) -> String {
  let parts: Vec<String> = path
    .iter()
    .map(|p| match p {
      PathElem::Key(k) => k.clone(),
      PathElem::Index(i) => i.to_string(),
    })
    .collect();
  parts.join(".")
}

fn is_container(v: &SaveValue) -> bool {
  matches!(v, SaveValue::Dict(_) | SaveValue::List(_))
}

fn is_terminal(v: &SaveValue, layout: Layout, depth: usize) -> bool {
  if depth > MAX_DEPTH {
    return true; // reported by the traversal
  }
  let entries: Box<dyn Iterator<Item = &SaveValue>> = match (v, layout) {
    (SaveValue::Dict(_), Layout::Torch24) => return false,
    (SaveValue::Dict(pairs), Layout::Torch23) => Box::new(pairs.iter().map(|(_, x)| x)),
    (SaveValue::List(items), _) => Box::new(items.iter()),
    _ => return true,
  };
  for e in entries {
    if is_container(e) && !is_terminal(e, layout, depth + 1) {
      return false;
    }
    if matches!(e, SaveValue::Tensor(_)) {
      return false;
    }
  }
  true
}

/// Flattens `root` (a dict: the state dict) into items in torch's order. Duplicate flat keys are an error, as in
/// torch (`"duplicated flatten key"`).
pub fn flatten<'v, 'a>(
  root: &'v SaveValue<'a>,
  layout: Layout,
) -> Result<Vec<FlatItem<'v, 'a>>, FlattenError> {
  let SaveValue::Dict(pairs) = root else {
    return Err(FlattenError {
      key: String::new(),
      reason: format!("the state dict must be a dict, not a {}", root.type_name()),
    });
  };
  let mut out = Vec::new();
  let mut seen = std::collections::HashSet::new();
  for (i, (k, v)) in pairs.iter().enumerate() {
    let key = k.key_string().map_err(|reason| FlattenError { key: String::new(), reason })?;
    traverse(Step { path: vec![PathElem::Key(key)], positions: vec![i] }, v, layout, &mut out, &mut seen, 0)?;
  }
  Ok(out)
}

/// Where the traversal is: the path as torch names it and as positions.
#[derive(Clone)]
struct Step {
  path: Vec<PathElem>,
  positions: Vec<usize>,
}

impl Step {
  fn child(&self, elem: PathElem, position: usize) -> Step {
    let mut next = self.clone();
    next.path.push(elem);
    next.positions.push(position);
    next
  }
}

fn traverse<'v, 'a>(
  step: Step,
  v: &'v SaveValue<'a>,
  layout: Layout,
  out: &mut Vec<FlatItem<'v, 'a>>,
  seen: &mut std::collections::HashSet<String>,
  depth: usize,
) -> Result<(), FlattenError> {
  if depth > MAX_DEPTH {
    return Err(FlattenError {
      key: join(&step.path),
      reason: format!("nested more than {MAX_DEPTH} levels deep"),
    });
  }
  let recurse_dict = match layout {
    Layout::Torch24 => matches!(v, SaveValue::Dict(_)),
    Layout::Torch23 => matches!(v, SaveValue::Dict(_)) && !is_terminal(v, layout, depth),
  };
  if recurse_dict {
    if let SaveValue::Dict(pairs) = v {
      for (i, (k, x)) in pairs.iter().enumerate() {
        let key = k.key_string().map_err(|reason| FlattenError { key: join(&step.path), reason })?;
        traverse(step.child(PathElem::Key(key), i), x, layout, out, seen, depth + 1)?;
      }
    }
    return Ok(());
  }
  if is_terminal(v, layout, depth) {
    let key = join(&step.path);
    if !seen.insert(key.clone()) {
      return Err(FlattenError {
        key,
        reason: "duplicated flatten key: two paths join to the same dotted key".into(),
      });
    }
    out.push(FlatItem { key, path: step.path, positions: step.positions, value: v });
    return Ok(());
  }
  if let SaveValue::List(items) = v {
    for (i, x) in items.iter().enumerate() {
      traverse(step.child(PathElem::Index(i as i64), i), x, layout, out, seen, depth + 1)?;
    }
  }
  Ok(())
}

/// The nested state dict that flat keys came from, without the values: what torch's `unflatten_state_dict`
/// builds by `set_element` for each key's `planner_data` path. Leaves name the item they hold by its index in the
/// keys given to [`unflatten`].
#[derive(Debug, Clone, PartialEq)]
pub enum Nested {
  /// The value stored under the `n`th key.
  Leaf(usize),
  /// A dict, with its `str` keys in the order the keys first reached them.
  Dict(Vec<(String, Nested)>),
  /// A list; an index no key reaches is `None` (torch's `extend_list` pads with `None`).
  List(Vec<Option<Nested>>),
}

enum Node {
  Leaf(usize),
  Dict(Vec<(String, usize)>, std::collections::HashMap<String, usize>),
  List(Vec<Option<usize>>),
}

/// torch's `unflatten_state_dict`: puts item `n` (flat key `key`, `planner_data` path `path`) at its path, in order.
/// A step into a missing container creates a dict before a `str` key and a list before an int; lists are padded
/// with `None` up to an index. Unlike torch, two keys at one place, or a path through a value, are errors (torch
/// would silently overwrite), as are a `str` step into a list and an index past
/// [`crate::limits::MAX_UNFLATTEN_LIST_INDEX`]. A dict step that is an int becomes `str(int)`: the rebuilt dict
/// has string keys, as a JS object does.
pub fn unflatten<'p>(
  items: impl IntoIterator<Item = (&'p str, &'p [PathElem])>,
) -> Result<Nested, FlattenError> {
  let mut nodes = vec![Node::Dict(Vec::new(), Default::default())];
  for (n, (key, path)) in items.into_iter().enumerate() {
    let fail = |reason: String| FlattenError { key: key.to_owned(), reason };
    if path.is_empty() {
      return Err(fail("its planner_data path is empty".into()));
    }
    if path.len() > MAX_DEPTH {
      return Err(fail(format!("its planner_data path is nested more than {MAX_DEPTH} levels deep")));
    }
    let mut cur = 0usize;
    for (i, step) in path.iter().enumerate() {
      let last = i + 1 == path.len();
      let fresh = match path.get(i + 1) {
        _ if last => Node::Leaf(n),
        Some(PathElem::Index(_)) => Node::List(Vec::new()),
        _ => Node::Dict(Vec::new(), Default::default()),
      };
      let next = nodes.len();
      let existing = match (&mut nodes[cur], step) {
        (Node::Dict(entries, index), step) => {
          let name = match step {
            PathElem::Key(k) => k.clone(),
            PathElem::Index(x) => x.to_string(),
          };
          match index.get(&name) {
            Some(&child) => Some(child),
            None => {
              index.insert(name.clone(), next);
              entries.push((name, next));
              None
            }
          }
        }
        (Node::List(items), PathElem::Index(x)) => {
          let Some(at) = u64::try_from(*x).ok().filter(|&x| x < crate::limits::MAX_UNFLATTEN_LIST_INDEX)
          else {
            return Err(fail(format!(
              "list index {x} in its planner_data path is outside 0..{} (MAX_UNFLATTEN_LIST_INDEX)",
              crate::limits::MAX_UNFLATTEN_LIST_INDEX
            )));
          };
          // below MAX_UNFLATTEN_LIST_INDEX, so it fits a usize
          let at = at as usize;
          if items.len() <= at {
            items.resize(at + 1, None);
          }
          match items[at] {
            Some(child) => Some(child),
            None => {
              items[at] = Some(next);
              None
            }
          }
        }
        (Node::List(_), PathElem::Key(k)) => {
          return Err(fail(format!("its planner_data path indexes a list with the key `{k}`")));
        }
        (Node::Leaf(_), _) => {
          return Err(fail("its planner_data path runs through another item's value".into()))
        }
      };
      match existing {
        None => nodes.push(fresh),
        Some(_) if last => return Err(fail("two keys map to the same place in the state dict".into())),
        Some(child) => {
          if matches!(nodes[child], Node::Leaf(_)) {
            return Err(fail("its planner_data path runs through another item's value".into()));
          }
        }
      }
      cur = existing.unwrap_or(next);
    }
  }
  Ok(build(&mut nodes, 0))
}

/// The arena as a tree; each node is taken once (a node has one parent).
fn build(nodes: &mut [Node], at: usize) -> Nested {
  match std::mem::replace(&mut nodes[at], Node::Leaf(0)) {
    Node::Leaf(n) => Nested::Leaf(n),
    Node::Dict(entries, _) => Nested::Dict(entries.into_iter().map(|(k, c)| (k, build(nodes, c))).collect()),
    Node::List(items) => Nested::List(items.into_iter().map(|c| c.map(|c| build(nodes, c))).collect()),
  }
}

#[cfg(test)]
mod tests {
  use super::*;
  use crate::dtype::DType;
  use crate::write::value::TensorRef;

  fn s(x: &str) -> SaveValue<'static> {
    SaveValue::Str(x.into())
  }
  fn d(pairs: Vec<(&str, SaveValue<'static>)>) -> SaveValue<'static> {
    SaveValue::Dict(pairs.into_iter().map(|(k, v)| (s(k), v)).collect())
  }
  fn t() -> SaveValue<'static> {
    SaveValue::Tensor(TensorRef { dtype: DType::Float32, shape: vec![1], data: &[0, 0, 0, 0] })
  }
  fn keys(v: &SaveValue, layout: Layout) -> Vec<(String, Vec<PathElem>)> {
    flatten(v, layout).unwrap().into_iter().map(|i| (i.key, i.path)).collect()
  }
  fn k(x: &str) -> PathElem {
    PathElem::Key(x.into())
  }

  /// The worked example of spec §3.2 (an Adam optimizer state dict next to a model).
  fn optim() -> SaveValue<'static> {
    d(vec![
      ("model", d(vec![("layer1.weight", t())])),
      (
        "optim",
        d(vec![
          ("state", d(vec![("layer1.weight", d(vec![("exp_avg", t()), ("step", t())]))])),
          (
            "param_groups",
            SaveValue::List(vec![d(vec![
              ("lr", SaveValue::Float(0.001)),
              ("betas", SaveValue::Tuple(vec![SaveValue::Float(0.9), SaveValue::Float(0.999)])),
              ("params", SaveValue::List(vec![s("layer1.weight")])),
            ])]),
          ),
          ("empty", d(vec![])),
          ("nolist", SaveValue::List(vec![])),
        ]),
      ),
    ])
  }

  #[test]
  fn torch24_keys() {
    let got = keys(&optim(), Layout::Torch24);
    let want = vec![
      ("model.layer1.weight", vec![k("model"), k("layer1.weight")]),
      ("optim.state.layer1.weight.exp_avg", vec![k("optim"), k("state"), k("layer1.weight"), k("exp_avg")]),
      ("optim.state.layer1.weight.step", vec![k("optim"), k("state"), k("layer1.weight"), k("step")]),
      ("optim.param_groups.0.lr", vec![k("optim"), k("param_groups"), PathElem::Index(0), k("lr")]),
      ("optim.param_groups.0.betas", vec![k("optim"), k("param_groups"), PathElem::Index(0), k("betas")]),
      ("optim.param_groups.0.params", vec![k("optim"), k("param_groups"), PathElem::Index(0), k("params")]),
      ("optim.nolist", vec![k("optim"), k("nolist")]),
    ];
    let want: Vec<_> = want.into_iter().map(|(a, b)| (a.to_owned(), b)).collect();
    assert_eq!(got, want);
  }

  #[test]
  fn torch23_keys() {
    let got: Vec<String> = keys(&optim(), Layout::Torch23).into_iter().map(|(k, _)| k).collect();
    assert_eq!(
      got,
      [
        "model.layer1.weight",
        "optim.state.layer1.weight.exp_avg",
        "optim.state.layer1.weight.step",
        "optim.param_groups",
        "optim.empty",
        "optim.nolist"
      ]
    );
  }

  #[test]
  fn lists_of_tensors_and_nested_lists() {
    let v = d(vec![
      ("a", SaveValue::List(vec![t(), SaveValue::Int(3)])),
      ("b", SaveValue::List(vec![SaveValue::List(vec![t()]), SaveValue::List(vec![SaveValue::Int(1)])])),
      ("c", SaveValue::Tuple(vec![t()])),
      ("d", SaveValue::Int(1)),
    ]);
    let got: Vec<String> = keys(&v, Layout::Torch24).into_iter().map(|(k, _)| k).collect();
    assert_eq!(got, ["a.0", "a.1", "b.0.0", "b.1", "c", "d"]);
    let got23: Vec<String> = keys(&v, Layout::Torch23).into_iter().map(|(k, _)| k).collect();
    assert_eq!(got23, got);
  }

  #[test]
  fn non_string_keys_are_stringified() {
    let v = SaveValue::Dict(vec![(
      s("state"),
      SaveValue::Dict(vec![
        (SaveValue::Int(0), d(vec![("x", t())])),
        (SaveValue::Bool(true), t()),
        (SaveValue::Float(0.5), t()),
      ]),
    )]);
    let got: Vec<String> = keys(&v, Layout::Torch24).into_iter().map(|(k, _)| k).collect();
    assert_eq!(got, ["state.0.x", "state.True", "state.0.5"]);
  }

  #[test]
  fn duplicate_and_bad_keys_are_errors() {
    let v = d(vec![("a.b", t()), ("a", d(vec![("b", t())]))]);
    let e = flatten(&v, Layout::Torch24).unwrap_err();
    assert_eq!(e.key, "a.b");
    assert!(e.reason.contains("duplicated"));
    let v = SaveValue::Dict(vec![(s("a"), SaveValue::Dict(vec![(SaveValue::Tuple(vec![]), t())]))]);
    assert!(flatten(&v, Layout::Torch24).unwrap_err().reason.contains("tuple"));
    assert!(flatten(&SaveValue::Int(1), Layout::Torch24).is_err());
  }

  fn unflat(items: &[(&str, Vec<PathElem>)]) -> Result<Nested, FlattenError> {
    unflatten(items.iter().map(|(k, p)| (*k, p.as_slice())))
  }

  #[test]
  fn unflatten_inverts_flatten() {
    // torch ≥ 2.4 keys of a state dict with nested lists and non-str keys, back into the tree
    let v = d(vec![
      ("m", SaveValue::Dict(vec![(SaveValue::Float(1e-5), t()), (SaveValue::Int(3), d(vec![("w", t())]))])),
      ("l", SaveValue::List(vec![SaveValue::List(vec![t(), t()]), d(vec![("x", t())])])),
    ]);
    let items = keys(&v, Layout::Torch24);
    let tree = unflat(&items.iter().map(|(k, p)| (k.as_str(), p.clone())).collect::<Vec<_>>()).unwrap();
    use Nested::*;
    let want = Dict(vec![
      ("m".into(), Dict(vec![("1e-05".into(), Leaf(0)), ("3".into(), Dict(vec![("w".into(), Leaf(1))]))])),
      (
        "l".into(),
        List(vec![Some(List(vec![Some(Leaf(2)), Some(Leaf(3))])), Some(Dict(vec![("x".into(), Leaf(4))]))]),
      ),
    ]);
    assert_eq!(tree, want);
  }

  #[test]
  fn unflatten_pads_lists_and_refuses_conflicts() {
    use Nested::*;
    let i = PathElem::Index;
    let got = unflat(&[("a.2", vec![k("a"), i(2)]), ("a.0.b", vec![k("a"), i(0), k("b")])]).unwrap();
    assert_eq!(
      got,
      Dict(vec![("a".into(), List(vec![Some(Dict(vec![("b".into(), Leaf(1))])), None, Some(Leaf(0))]))])
    );
    let e = unflat(&[("x", vec![k("a")]), ("y", vec![k("a")])]).unwrap_err();
    assert_eq!(e.key, "y");
    assert!(e.reason.contains("same place"), "{}", e.reason);
    let e = unflat(&[("x", vec![k("a")]), ("y", vec![k("a"), k("b")])]).unwrap_err();
    assert!(e.reason.contains("runs through"), "{}", e.reason);
    let e = unflat(&[("x", vec![k("a"), k("b")]), ("y", vec![k("a")])]).unwrap_err();
    assert!(e.reason.contains("same place"), "{}", e.reason);
    let e = unflat(&[("x", vec![k("a"), i(0)]), ("y", vec![k("a"), k("b")])]).unwrap_err();
    assert!(e.reason.contains("indexes a list"), "{}", e.reason);
    let e = unflat(&[("x", vec![k("a"), i(-1)])]).unwrap_err();
    assert!(e.reason.contains("MAX_UNFLATTEN_LIST_INDEX"), "{}", e.reason);
    let e = unflat(&[("x", vec![k("a"), i(1 << 40)])]).unwrap_err();
    assert!(e.reason.contains("MAX_UNFLATTEN_LIST_INDEX"), "{}", e.reason);
    assert!(unflat(&[("x", vec![])]).is_err());
    // an int step into a dict is str(int)
    assert_eq!(unflat(&[("0", vec![i(0)])]).unwrap(), Dict(vec![("0".into(), Leaf(0))]));
  }
}
