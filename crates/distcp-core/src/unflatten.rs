//! Rebuilding the nested state dict from flat keys, through `planner_data` (each key's path in the original
//! tree). Both torch ≤ 2.3 and ≥ 2.4 layouts go through the same paths; they only differ in which containers
//! were stored whole.

use crate::metadata::PathElem;

#[derive(Debug, Clone, PartialEq)]
pub enum Tree<T> {
  /// A hole in a list that was never filled (torch fills it with None).
  Empty,
  Leaf(T),
  Dict(Vec<(String, Tree<T>)>),
  List(Vec<Tree<T>>),
}

/// Places `value` at `path` in `root`, creating dicts (for a string step) and lists (for an int step) on the way,
/// as torch's `set_element` does. Returns an error text if the path runs through an existing leaf.
pub fn set_element<T>(root: &mut Tree<T>, path: &[PathElem], value: T) -> Result<(), String> {
  let mut node = root;
  for (i, step) in path.iter().enumerate() {
    if matches!(node, Tree::Empty) {
      *node = match step {
        PathElem::Key(_) => Tree::Dict(Vec::new()),
        PathElem::Index(_) => Tree::List(Vec::new()),
      };
    }
    node = match (node, step) {
      (Tree::Dict(entries), PathElem::Key(k)) => {
        let pos = match entries.iter().position(|(ek, _)| ek == k) {
          Some(p) => p,
          None => {
            entries.push((k.clone(), Tree::Empty));
            entries.len() - 1
          }
        };
        &mut entries[pos].1
      }
      (Tree::List(items), PathElem::Index(idx)) => {
        let Ok(idx) = usize::try_from(*idx) else {
          return Err(format!("negative list index {idx} in path"));
        };
        if idx > 1 << 24 {
          return Err(format!("list index {idx} in path is implausibly large"));
        }
        if items.len() <= idx {
          items.resize_with(idx + 1, || Tree::Empty);
        }
        &mut items[idx]
      }
      (Tree::Dict(entries), PathElem::Index(idx)) => {
        // dict keys that were ints became str(key) in flat keys; keep them as strings
        let k = idx.to_string();
        let pos = match entries.iter().position(|(ek, _)| *ek == k) {
          Some(p) => p,
          None => {
            entries.push((k, Tree::Empty));
            entries.len() - 1
          }
        };
        &mut entries[pos].1
      }
      _ => return Err(format!("path step {} collides with a value stored at a shorter path", i + 1)),
    };
  }
  match node {
    Tree::Empty => {
      *node = Tree::Leaf(value);
      Ok(())
    }
    _ => Err("two keys map to the same place".into()),
  }
}

#[cfg(test)]
mod tests {
  use super::*;

  fn k(s: &str) -> PathElem {
    PathElem::Key(s.into())
  }

  #[test]
  fn nested_dicts_and_lists() {
    let mut t = Tree::Empty;
    set_element(&mut t, &[k("optim"), k("state"), k("0.weight"), k("exp_avg")], 1).unwrap();
    set_element(&mut t, &[k("optim"), k("param_groups"), PathElem::Index(1), k("lr")], 2).unwrap();
    set_element(&mut t, &[k("optim"), k("param_groups"), PathElem::Index(0), k("lr")], 3).unwrap();
    let Tree::Dict(top) = &t else { panic!() };
    let Tree::Dict(optim) = &top[0].1 else { panic!() };
    let Tree::List(groups) = &optim[1].1 else { panic!() };
    assert_eq!(groups.len(), 2);
    assert_eq!(groups[0], Tree::Dict(vec![("lr".into(), Tree::Leaf(3))]));
    assert!(set_element(&mut t, &[k("optim"), k("state")], 9).is_err());
  }
}
