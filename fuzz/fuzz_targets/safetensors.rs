#![no_main]
use libfuzzer_sys::fuzz_target;
use std::path::PathBuf;

// A folder of one of the safetensors-based layouts, cut from one input: `[u8 layout]` then, for every file name of
// that layout but the last, `[u32 LE n][n bytes]`; the last file takes the rest. An empty file is left out, so the
// mutator can also drop ranks and shards. The names are what torch writes (the seed corpus, fuzz/seed-corpus.sh,
// is the torch-written fixtures serialized the same way). Opening the folder (layout detection, safetensors headers,
// DCP_SHARDING_INFO, index.json) and reading every key must end in Ok or a coded error: no panic, no overflow, no
// allocation beyond -rss_limit_mb, no hang.
const LAYOUTS: &[&[&str]] = &[
  // FileSystemWriter(serialization_format=SAFETENSORS): .metadata + safetensors blobs carrying DCP_SHARDING_INFO
  &[".metadata", "__0_0.distcp", "__1_0.distcp", "__2_0.distcp"],
  // HuggingFaceStorageWriter(save_distributed=True): per-rank shards, no .metadata
  &[
    "shard-00001-model-00001-of-00001.safetensors",
    "shard-00002-model-00001-of-00001.safetensors",
    "shard-00003-model-00001-of-00001.safetensors",
  ],
  // a Hugging Face folder: index.json + shards
  &[
    "model.safetensors.index.json",
    "model-00001-of-00003.safetensors",
    "model-00002-of-00003.safetensors",
    "model-00003-of-00003.safetensors",
  ],
  &["model.safetensors"],
  // HuggingFaceStorageWriter(enable_consolidation=True): consolidated files + index beside sharded/
  &[
    "model.safetensors.index.json",
    "model-00001-of-00002.safetensors",
    "model-00002-of-00002.safetensors",
    "sharded/shard-00001-model-00001-of-00002.safetensors",
    "sharded/shard-00001-model-00002-of-00002.safetensors",
    "sharded/shard-00002-model-00001-of-00002.safetensors",
    "sharded/shard-00002-model-00002-of-00002.safetensors",
  ],
];

fn take<'a>(data: &mut &'a [u8]) -> &'a [u8] {
  if data.len() < 4 {
    return std::mem::take(data);
  }
  let n = (u32::from_le_bytes([data[0], data[1], data[2], data[3]]) as usize).min(data.len() - 4);
  let (part, rest) = data[4..].split_at(n);
  *data = rest;
  part
}

fuzz_target!(|input: &[u8]| {
  let Some((&which, mut data)) = input.split_first() else { return };
  let names = LAYOUTS[which as usize % LAYOUTS.len()];
  let dir = PathBuf::from(std::env::temp_dir()).join(format!("distcp-fuzz-safetensors-{}", std::process::id()));
  let _ = std::fs::remove_dir_all(&dir);
  if std::fs::create_dir_all(dir.join("sharded")).is_err() {
    return;
  }
  for (i, name) in names.iter().enumerate() {
    let bytes = if i + 1 == names.len() { std::mem::take(&mut data) } else { take(&mut data) };
    if !bytes.is_empty() && std::fs::write(dir.join(name), bytes).is_err() {
      return;
    }
  }
  let Ok(ck) = distcp_core::Checkpoint::open(&dir, None) else { return };
  let _ = ck.summary();
  let keys: Vec<String> = ck.keys().map(str::to_owned).collect();
  for key in keys {
    if let Ok(t) = ck.tensor(&key) {
      let _ = ck.read_tensor(&key);
      // a box: the last element of every dimension, so a chunk's far end is resolved too
      if !t.size.iter().any(|&d| d == 0) {
        let region = distcp_core::plan::Region {
          offsets: t.size.iter().map(|&d| d - 1).collect(),
          sizes: vec![1; t.size.len()],
        };
        let mut one = vec![0u8; t.dtype().size()];
        let _ = ck.read_into(&key, &region, &mut one);
      }
    } else {
      let _ = ck.read_object(&key);
    }
  }
});
