//! DCP → Hugging Face safetensors: the tensors chosen and named ([`select`]), the output planned from `.metadata`
//! alone (shards, headers, every destination offset: [`plan`]), then written by a [`ConvertJob`] in one call
//! (all of it, or one rank's shards), which reports progress through counters and stops on a flag.

mod cast;
mod job;

pub use cast::{cast, cast_parallel, f32_to_bf16, f32_to_f16};
pub use job::{ConvertJob, JobProgress};

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::safetensors::{encode_header, WriteEntry};
use crate::Checkpoint;
use serde::Serialize;
use std::collections::BTreeMap;

/// One tensor to convert: its DCP key and its name in the output.
#[derive(Debug, Clone)]
pub struct ConvertEntry {
  /// The tensor's flat key in the checkpoint.
  pub key: String,
  /// The tensor's name in the safetensors output.
  pub name: String,
}

/// Which tensors of a checkpoint a conversion writes and under which names: the rules behind
/// `ConvertOptions.keyMap` / `include` / `exclude`, applied to every key in one pass (an MoE checkpoint has tens
/// of thousands).
#[derive(Debug, Clone, Default)]
pub struct Selection {
  /// Prefix renames `(from, to)`, tried in order; the first whose `from` starts the name applies.
  pub key_map: Vec<(String, String)>,
  /// Only names matching one of these globs are written (`*`: any run of characters, dots included; `?`: one
  /// character); `None`: every name.
  pub include: Option<Vec<String>>,
  /// Names matching one of these globs are left out.
  pub exclude: Vec<String>,
}

/// A key a conversion leaves out, and why (for the plan and `--dry-run`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
  /// The key in the checkpoint.
  pub key: String,
  /// Why, in words: `not a tensor`, `not included`, `excluded`, or the caller's reason.
  pub reason: String,
}

/// The outcome of [`select`]: what to convert (in `.metadata` order) and what was left out.
#[derive(Debug, Clone, Default)]
pub struct Selected {
  /// The tensors to write, with their output names.
  pub entries: Vec<ConvertEntry>,
  /// The keys left out.
  pub skipped: Vec<Skipped>,
}

impl Selected {
  /// The checkpoint key written under output name `name`, if any.
  pub fn key_of(&self, name: &str) -> Option<&str> {
    self.entries.iter().find(|e| e.name == name).map(|e| e.key.as_str())
  }

  /// Leaves out the tensor written as `name` (recorded in `skipped` with `reason`); false if there is none.
  pub fn drop_name(&mut self, name: &str, reason: &str) -> bool {
    let Some(i) = self.entries.iter().position(|e| e.name == name) else {
      return false;
    };
    let e = self.entries.remove(i);
    self.skipped.push(Skipped { key: e.key, reason: reason.to_owned() });
    true
  }
}

/// Whether `name` matches `glob` as a whole (`*`: any run of characters, `?`: one character; everything else
/// literal). Iterative with one backtrack point, so a hostile pattern costs O(len(glob) × len(name)).
pub fn glob_match(glob: &str, name: &str) -> bool {
  let (g, n): (Vec<char>, Vec<char>) = (glob.chars().collect(), name.chars().collect());
  let (mut gi, mut ni) = (0, 0);
  let mut star: Option<(usize, usize)> = None;
  while ni < n.len() {
    match g.get(gi) {
      Some('*') => {
        star = Some((gi, ni));
        gi += 1;
      }
      Some(&c) if c == '?' || c == n[ni] => {
        gi += 1;
        ni += 1;
      }
      _ => match star {
        Some((sg, sn)) => {
          gi = sg + 1;
          ni = sn + 1;
          star = Some((sg, sn + 1));
        }
        None => return false,
      },
    }
  }
  g[gi..].iter().all(|&c| c == '*')
}

/// The output name of every tensor key of `ck`, and which keys are left out. A key's name is the key itself, or,
/// when every key sits under one top-level `model` (the seed's `{"model": state_dict}`), its path below it joined
/// with dots (NeMo-RL's converter unwraps it the same way); then `key_map`, `include` and `exclude` apply.
pub fn select(ck: &Checkpoint, sel: &Selection) -> Selected {
  use crate::metadata::{ItemMetadata, PathElem};
  let keys: Vec<&str> = ck.keys().collect();
  let is_model = |k: &&str| matches!(ck.planner_path(k).first(), Some(PathElem::Key(t)) if t == "model");
  let unwrap = !keys.is_empty() && keys.iter().all(is_model);
  let mut out = Selected::default();
  for key in keys {
    let skip = |out: &mut Selected, reason: &str| {
      out.skipped.push(Skipped { key: key.to_owned(), reason: reason.into() })
    };
    if !matches!(ck.item(key), Ok(ItemMetadata::Tensor(_))) {
      skip(&mut out, "not a tensor");
      continue;
    }
    let mut name =
      if unwrap { crate::write::flatten::join(&ck.planner_path(key)[1..]) } else { key.to_owned() };
    if let Some((from, to)) = sel.key_map.iter().find(|(from, _)| name.starts_with(from.as_str())) {
      name = format!("{to}{}", &name[from.len()..]);
    }
    if sel.include.as_ref().is_some_and(|inc| !inc.iter().any(|g| glob_match(g, &name))) {
      skip(&mut out, "not included");
      continue;
    }
    if sel.exclude.iter().any(|g| glob_match(g, &name)) {
      skip(&mut out, "excluded");
      continue;
    }
    out.entries.push(ConvertEntry { key: key.to_owned(), name });
  }
  out
}

/// Where one tensor goes in the output, decided before any byte is written.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TensorPlan {
  /// The tensor's flat key in the checkpoint.
  pub key: String,
  /// The tensor's name in the output.
  pub name: String,
  /// The stored dtype (torch name).
  pub source_dtype: String,
  /// The output dtype (torch name); differs from `source_dtype` when the conversion casts.
  pub dtype: String,
  /// Shape.
  pub shape: Vec<u64>,
  /// Absolute byte offset of the tensor's data in its shard file.
  pub offset: u64,
  /// Bytes of the tensor in the output dtype.
  pub nbytes: u64,
  /// Index into [`ConvertPlan::shards`] of the file it goes to.
  pub shard: usize,
}

/// One output safetensors file.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ShardPlan {
  /// File name inside the output folder.
  pub file: String,
  /// Bytes of the file: 8-byte length, JSON header, tensor data.
  pub size: u64,
  /// Bytes of the JSON header.
  pub header_len: u64,
  /// The JSON header, padded as safetensors requires.
  #[serde(skip)]
  pub header: Vec<u8>,
  /// Indices into [`ConvertPlan::tensors`] of the tensors in this file, in file order.
  pub tensors: Vec<usize>,
}

/// The whole conversion, computed from `.metadata` alone: files, headers and every tensor's offset.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConvertPlan {
  /// The output files.
  pub shards: Vec<ShardPlan>,
  /// Tensors in the order they are written (shard by shard, in file order).
  pub tensors: Vec<TensorPlan>,
  /// Sum of tensor bytes (`metadata.total_size` of the index).
  pub total_size: u64,
  /// `model.safetensors.index.json`, when there is more than one shard.
  pub index_json: Option<String>,
  /// Index into `tensors` of each entry, in the order the entries were given (state-dict order).
  #[serde(skip)]
  pub entry_order: Vec<usize>,
}

fn shard_name(i: usize, n: usize) -> String {
  if n == 1 {
    "model.safetensors".into()
  } else {
    format!("model-{:05}-of-{:05}.safetensors", i + 1, n)
  }
}

/// Plans the conversion of `entries` (in state-dict order) to safetensors shards of at most `max_shard_size`
/// bytes of tensor data (a larger tensor gets a shard of its own), casting floating tensors to `dtype` if given.
pub fn plan(
  ck: &Checkpoint,
  entries: &[ConvertEntry],
  dtype: Option<DType>,
  max_shard_size: u64,
) -> Result<ConvertPlan> {
  struct Item {
    key: String,
    name: String,
    from: DType,
    to: DType,
    shape: Vec<u64>,
    nbytes: u64,
  }
  let mut items = Vec::with_capacity(entries.len());
  let mut names = std::collections::HashSet::new();
  for e in entries {
    let t = ck.tensor(&e.key)?;
    let from = t.dtype();
    let to = match dtype {
      Some(d) if from.is_floating_point() => d,
      _ => from,
    };
    if to.safetensors_name().is_none() {
      return Err(Error::Unsupported {
        checkpoint: ck.root.clone(),
        key: e.key.clone(),
        reason: format!("safetensors has no {to} dtype"),
      });
    }
    if !names.insert(e.name.clone()) {
      return Err(Error::BadRequest {
        checkpoint: ck.root.clone(),
        key: e.key.clone(),
        reason: format!("two tensors would both be named `{}` in the output", e.name),
      });
    }
    let nbytes = crate::limits::checked_nbytes(&t.size, to.size()).ok_or_else(|| Error::SizeOverflow {
      path: ck.metadata_path.clone(),
      key: e.key.clone(),
      what: format!("the byte size of a {to} tensor of shape {:?}", t.size),
    })?;
    items.push(Item { key: e.key.clone(), name: e.name.clone(), from, to, shape: t.size.clone(), nbytes });
  }

  // huggingface_hub's split_state_dict_into_shards: fill in order, start a new shard when the next tensor would
  // not fit; a tensor larger than the limit sits alone
  let mut groups: Vec<Vec<usize>> = Vec::new();
  let mut current = 0u64;
  for (i, it) in items.iter().enumerate() {
    match groups.last_mut() {
      Some(g) if current + it.nbytes <= max_shard_size => {
        g.push(i);
        current += it.nbytes;
      }
      _ => {
        groups.push(vec![i]);
        current = it.nbytes;
      }
    }
  }
  if groups.is_empty() {
    groups.push(Vec::new());
  }

  let n = groups.len();
  let mut entry_order = vec![0usize; items.len()];
  let mut shards = Vec::with_capacity(n);
  let mut tensors = Vec::with_capacity(items.len());
  let mut weight_map = BTreeMap::new();
  for (si, mut group) in groups.into_iter().enumerate() {
    // safetensors' order: larger alignment first, then by name
    group.sort_by(|&a, &b| {
      items[b].to.size().cmp(&items[a].to.size()).then_with(|| items[a].name.cmp(&items[b].name))
    });
    let file = shard_name(si, n);
    let mut entries = Vec::with_capacity(group.len());
    for &i in &group {
      let it = &items[i];
      entries.push(WriteEntry { name: &it.name, dtype: it.to, shape: &it.shape, nbytes: it.nbytes });
      // the index (and so the map) exists only for several shards
      if n > 1 {
        weight_map.insert(it.name.clone(), file.clone());
      }
    }
    let bytes = encode_header(&entries).map_err(|reason| Error::BadRequest {
      checkpoint: ck.root.clone(),
      key: String::new(),
      reason,
    })?;
    let header_len = bytes.len() as u64 - crate::safetensors::HEADER_LEN_BYTES;
    let data_start = bytes.len() as u64;
    let mut indices = Vec::with_capacity(group.len());
    let mut off = data_start;
    for &i in &group {
      let it = &items[i];
      entry_order[i] = tensors.len();
      indices.push(tensors.len());
      tensors.push(TensorPlan {
        key: it.key.clone(),
        name: it.name.clone(),
        source_dtype: it.from.name().into(),
        dtype: it.to.name().into(),
        shape: it.shape.clone(),
        offset: off,
        nbytes: it.nbytes,
        shard: si,
      });
      off += it.nbytes;
    }
    shards.push(ShardPlan { file, size: off, header_len, header: bytes, tensors: indices });
  }
  let total_size: u64 = items.iter().map(|i| i.nbytes).sum();
  let index_json = (n > 1).then(|| {
    let index = serde_json::json!({ "metadata": { "total_size": total_size }, "weight_map": weight_map });
    let mut s = serde_json::to_string_pretty(&index).unwrap_or_default();
    s.push('\n');
    s
  });
  Ok(ConvertPlan { shards, tensors, total_size, index_json, entry_order })
}

/// The index transformers reads a sharded output through.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// Written last, so a reader that finds the config finds the weights it describes.
pub const CONFIG_FILE: &str = "config.json";
/// The single-file weights distcp writes (safetensors, or the seed's `pytorch_model.bin`).
const SINGLE_WEIGHTS: [&str; 2] = ["model.safetensors", "pytorch_model.bin"];

/// `model-<5 digits>-of-<5 digits>.safetensors`: the shard names distcp and transformers write.
fn is_shard_name(name: &str) -> bool {
  let five = |s: &str| s.len() == 5 && s.bytes().all(|b| b.is_ascii_digit());
  name
    .strip_prefix("model-")
    .and_then(|s| s.strip_suffix(".safetensors"))
    .and_then(|s| s.split_once("-of-"))
    .is_some_and(|(a, b)| five(a) && five(b))
}

/// The weight files of an earlier output in `out` that the new files `new` do not replace and that would mix
/// with them: the single-file weights and the index distcp writes, files named like distcp's (and
/// transformers') shards, and the shards the earlier index lists (plain names ending in `.safetensors`, regular
/// files). Nothing else in the folder is ever a candidate.
pub fn stale_output_files(out: &std::path::Path, new: &[String]) -> Vec<String> {
  let is_new = |n: &str| new.iter().any(|f| f == n);
  let is_file = |n: &str| std::fs::symlink_metadata(out.join(n)).is_ok_and(|m| m.is_file());
  let mut stale: Vec<String> = SINGLE_WEIGHTS
    .iter()
    .chain([INDEX_FILE].iter())
    .filter(|n| !is_new(n) && is_file(n))
    .map(|n| (*n).to_owned())
    .collect();
  // transformers' save_pretrained (the seed's writer) removes earlier shards named like its own: so does distcp
  if let Ok(entries) = std::fs::read_dir(out) {
    for e in entries.flatten() {
      let name = e.file_name().to_string_lossy().into_owned();
      if is_shard_name(&name) && !is_new(&name) && is_file(&name) {
        stale.push(name);
      }
    }
  }
  let listed = std::fs::read(out.join(INDEX_FILE))
    .ok()
    .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok());
  if let Some(map) = listed.as_ref().and_then(|v| v.get("weight_map")).and_then(|m| m.as_object()) {
    for shard in map.values().filter_map(|v| v.as_str()) {
      let plain = crate::commit::is_safe_relative(shard) && !shard.contains('/') && !shard.starts_with('.');
      if plain
        && shard.ends_with(".safetensors")
        && !is_new(shard)
        && is_file(shard)
        && !stale.iter().any(|s| s == shard)
      {
        stale.push(shard.to_owned());
      }
    }
  }
  stale
}

/// Moves a conversion staged in `staged` into its output folder: the weights first, then the index, then the
/// config; then the stale weights of an earlier output go (see [`crate::commit`] for what is atomic).
pub fn commit_output(staged: crate::commit::Staged) -> Result<()> {
  let new = staged.staged_files()?;
  let stale = stale_output_files(staged.out(), &new);
  staged.commit(&[INDEX_FILE, CONFIG_FILE], &stale)
}

/// Parses "5GB", "500MB", "2GiB", "1.5GB" or a plain byte count (decimal units as huggingface_hub, binary for
/// KiB/MiB/GiB/TiB).
pub fn parse_size(s: &str) -> Option<u64> {
  let t = s.trim();
  let split = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
  let (num, unit) = t.split_at(split);
  let value: f64 = num.trim().parse().ok()?;
  let mult: f64 = match unit.trim().to_ascii_uppercase().as_str() {
    "" | "B" => 1.0,
    "KB" => 1e3,
    "MB" => 1e6,
    "GB" => 1e9,
    "TB" => 1e12,
    "KIB" => 1024.0,
    "MIB" => 1024.0 * 1024.0,
    "GIB" => 1024.0 * 1024.0 * 1024.0,
    "TIB" => 1024.0f64.powi(4),
    _ => return None,
  };
  let bytes = value * mult;
  (value.is_finite() && bytes >= 1.0).then_some(bytes as u64)
}

/// Whether two tensors hold the same dtype, shape and bytes; compared in bounded row slabs.
pub fn tensors_equal(ck: &Checkpoint, a: &str, b: &str) -> Result<bool> {
  let (ta, tb) = (ck.tensor(a)?.clone(), ck.tensor(b)?.clone());
  if ta.dtype() != tb.dtype() || ta.size != tb.size {
    return Ok(false);
  }
  let es = ta.dtype().size() as u64;
  let rows = ta.size.first().copied().unwrap_or(1);
  let row_bytes = ta.size.iter().skip(1).product::<u64>() * es;
  let per = if row_bytes == 0 { rows.max(1) } else { (16u64 << 20).div_ceil(row_bytes).max(1) };
  let (mut ba, mut bb) = (Vec::new(), Vec::new());
  let mut r0 = 0;
  while r0 < rows {
    let n = per.min(rows - r0);
    let region = if ta.size.is_empty() {
      crate::plan::Region::whole(&[])
    } else {
      let mut offsets = vec![0; ta.size.len()];
      offsets[0] = r0;
      let mut sizes = ta.size.clone();
      sizes[0] = n;
      crate::plan::Region { offsets, sizes }
    };
    // the region is part of a validated tensor, so its byte size fits
    let len = crate::limits::checked_nbytes(&region.sizes, es as usize).unwrap_or(0) as usize;
    ba.resize(len, 0);
    bb.resize(len, 0);
    ck.read_into(a, &region, &mut ba)?;
    ck.read_into(b, &region, &mut bb)?;
    if ba != bb {
      return Ok(false);
    }
    r0 += n;
    if ta.size.is_empty() {
      break;
    }
  }
  Ok(true)
}

#[cfg(test)]
mod tests {
  use super::*;

  #[test]
  fn globs_match_whole_names() {
    for (g, n, want) in [
      ("*", "", true),
      ("*", "model.layers.0.w", true),
      ("model.*.weight", "model.layers.0.mlp.weight", true),
      ("model.*.weight", "model.layers.0.mlp.bias", false),
      ("*.bias", "a.bias.x", false),
      ("a?c", "abc", true),
      ("a?c", "ac", false),
      ("a.c", "abc", false),
      ("**x*", "yxy", true),
      ("lm_head.weight", "lm_head.weight", true),
      ("lm_head", "lm_head.weight", false),
      ("é*", "éa", true),
    ] {
      assert_eq!(glob_match(g, n), want, "{g} ~ {n}");
    }
    // a pattern that makes naive backtracking exponential stays quick
    let name = "a".repeat(200);
    assert!(!glob_match(&format!("{}b", "*a".repeat(40)), &name));
  }

  #[test]
  fn sizes() {
    assert_eq!(parse_size("5GB"), Some(5_000_000_000));
    assert_eq!(parse_size("500MB"), Some(500_000_000));
    assert_eq!(parse_size("2GiB"), Some(2 << 30));
    assert_eq!(parse_size("1.5 GB"), Some(1_500_000_000));
    assert_eq!(parse_size("123"), Some(123));
    assert_eq!(parse_size("5XB"), None);
    assert_eq!(parse_size("-1GB"), None);
  }
}

#[cfg(test)]
mod output_tests {
  use super::*;

  #[test]
  fn only_distcp_weight_names_and_indexed_shards_are_stale() {
    let d = std::env::temp_dir().join(format!("distcp-stale-{}", crate::commit::temp_name("")));
    std::fs::create_dir_all(d.join("sub")).unwrap();
    for f in [
      "model.safetensors",
      "pytorch_model.bin",
      "thesis.tex",
      "a.safetensors",
      "b.safetensors",
      "keep.safetensors",
      "notes.bin",
      "sub/c.safetensors",
    ] {
      std::fs::write(d.join(f), "x").unwrap();
    }
    let index = r#"{"weight_map": {"x": "a.safetensors", "y": "b.safetensors", "z": "thesis.tex", "u": "../evil.safetensors", "v": "sub/c.safetensors"}}"#;
    std::fs::write(d.join(INDEX_FILE), index).unwrap();
    let mut stale = stale_output_files(&d, &["b.safetensors".to_owned(), "config.json".to_owned()]);
    stale.sort();
    assert_eq!(
      stale,
      ["a.safetensors", "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"]
    );
    std::fs::remove_dir_all(&d).unwrap();
  }
}
