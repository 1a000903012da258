//! What `distcp inspect <dir>` prints, built on distcp-core's public API only: every key (dtype, shape, chunks,
//! bytes, data files), then totals and the format details.
//!
//! ```text
//! cargo run -p distcp-core --example inspect -- <checkpoint-dir> [--rank N]
//! ```

use distcp_core::metadata::ItemMetadata;
use distcp_core::{Checkpoint, Result};
use std::collections::BTreeSet;
use std::process::ExitCode;

fn main() -> ExitCode {
  let args: Vec<String> = std::env::args().skip(1).collect();
  let (dir, rank) = match args.as_slice() {
    [dir] => (dir.clone(), None),
    [dir, flag, n] if flag == "--rank" => match n.parse::<u32>() {
      Ok(n) => (dir.clone(), Some(n)),
      Err(_) => return usage(),
    },
    _ => return usage(),
  };
  match inspect(&dir, rank) {
    Ok(()) => ExitCode::SUCCESS,
    Err(e) => {
      // the stable code is what scripts match on; the message says where
      eprintln!("inspect: {e} ({})", e.code());
      ExitCode::FAILURE
    }
  }
}

fn usage() -> ExitCode {
  eprintln!("usage: inspect <checkpoint-dir> [--rank N]");
  ExitCode::from(2)
}

fn inspect(dir: &str, rank: Option<u32>) -> Result<()> {
  let ck = Checkpoint::open(dir, rank)?;
  let mut rows = vec![["key", "dtype", "shape", "chunks", "bytes", "files"].map(String::from).to_vec()];
  let (mut tensors, mut objects, mut chunks) = (0usize, 0usize, 0usize);
  let (mut tensor_bytes, mut object_bytes) = (0u64, 0u64);
  for key in ck.keys() {
    match ck.item(key)? {
      ItemMetadata::Tensor(t) => {
        let locations = ck.chunk_locations(key)?;
        let files: BTreeSet<&str> = locations.iter().map(|l| l.info.relative_path.as_str()).collect();
        let nbytes = ck.tensor_bytes(key)?;
        tensors += 1;
        chunks += t.chunks.len();
        tensor_bytes = tensor_bytes.saturating_add(nbytes);
        let shape: Vec<String> = t.size.iter().map(u64::to_string).collect();
        rows.push(vec![
          key.to_owned(),
          t.dtype().to_string(),
          format!("[{}]", shape.join(", ")),
          t.chunks.len().to_string(),
          human_bytes(nbytes),
          files.into_iter().collect::<Vec<_>>().join(","),
        ]);
      }
      ItemMetadata::Bytes => {
        let location = ck.object_location(key)?;
        objects += 1;
        object_bytes = object_bytes.saturating_add(location.length);
        rows.push(vec![
          key.to_owned(),
          "(object)".into(),
          String::new(),
          String::new(),
          human_bytes(location.length),
          location.relative_path,
        ]);
      }
    }
  }
  print_table(&rows);

  let s = ck.summary();
  println!();
  println!("checkpoint   {dir}");
  println!(
    "keys         {} ({tensors} tensors in {chunks} chunks, {objects} other values)",
    tensors + objects
  );
  println!(
    "bytes        {} of tensors, {} of other values",
    human_bytes(tensor_bytes),
    human_bytes(object_bytes)
  );
  println!("ranks        {} ({} data files)", s.ranks, s.files.len());
  println!("layout       {}: {}", s.layout, s.writer);
  if let Some(w) = &s.nemo_rl_weights {
    let tok = s.tokenizer_beside.as_ref().map(|t| format!(", tokenizer {t}")).unwrap_or_default();
    println!("NeMo-RL      weights {w}{tok}");
  }
  if let Some((major, minor)) = s.oldest_torch {
    println!("torch        loads with torch >= {major}.{minor}");
  }
  let props =
    s.tensor_properties_module.as_ref().map(|m| format!(", TensorProperties from {m}")).unwrap_or_default();
  println!("metadata     {}{props}", s.metadata_file);
  Ok(())
}

fn print_table(rows: &[Vec<String>]) {
  let cols = rows.first().map_or(0, Vec::len);
  let widths: Vec<usize> =
    (0..cols).map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0)).collect();
  for r in rows {
    let line: Vec<String> = r.iter().zip(&widths).map(|(cell, w)| format!("{cell:<w$}")).collect();
    println!("{}", line.join("  ").trim_end());
  }
}

/// Same units as the CLI: powers of 1024, one decimal above bytes.
fn human_bytes(n: u64) -> String {
  const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
  let mut v = n as f64;
  let mut u = 0;
  while v >= 1024.0 && u + 1 < UNITS.len() {
    v /= 1024.0;
    u += 1;
  }
  if u == 0 {
    format!("{n} B")
  } else {
    format!("{v:.1} {}", UNITS[u])
  }
}
