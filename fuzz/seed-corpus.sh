#!/usr/bin/env bash
# Seeds the fuzz corpora from the committed torch fixtures: every .metadata for the pickle/metadata targets, and
# every record of every .distcp (split at the offsets .metadata gives, via distcp inspect --json) for torch_save.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p fuzz/corpus/unpickle fuzz/corpus/metadata fuzz/corpus/torch_save fuzz/corpus/checkpoint fuzz/corpus/safetensors
i=0
for md in $(find fixtures -name .metadata -o -name '__*.metadata'); do
  cp "$md" "fuzz/corpus/unpickle/md$i"; cp "$md" "fuzz/corpus/metadata/md$i"; i=$((i+1))
done
for ck in $(find fixtures -name .metadata -printf '%h\n'); do
  node bin/distcp.js inspect "$ck" --json | node -e '
    const inv = JSON.parse(require("fs").readFileSync(0, "utf8")); const fs = require("fs"); let n = 0
    for (const it of inv.items) for (const c of it.chunks ?? []) {
      const fd = fs.openSync(inv.path + "/" + c.file, "r"); const b = Buffer.alloc(c.byteLength)
      fs.readSync(fd, b, 0, c.byteLength, c.byteOffset); fs.closeSync(fd)
      fs.writeFileSync(`fuzz/corpus/torch_save/${Buffer.from(inv.path).toString("hex").slice(-24)}_${n++}`, b)
    }'
done
# whole folders for the checkpoint target: [u32 len][.metadata][u32 len][__0_0.distcp][__1_0.distcp]
for ck in $(find fixtures -name .metadata -printf '%h\n'); do
  [ -f "$ck/__0_0.distcp" ] || continue
  node -e '
    const fs = require("fs"); const [ck, out] = process.argv.slice(1)
    const len = (b) => { const h = Buffer.alloc(4); h.writeUInt32LE(b.length); return h }
    const md = fs.readFileSync(ck + "/.metadata"), r0 = fs.readFileSync(ck + "/__0_0.distcp")
    const r1 = fs.existsSync(ck + "/__1_0.distcp") ? fs.readFileSync(ck + "/__1_0.distcp") : Buffer.alloc(0)
    fs.writeFileSync(out, Buffer.concat([len(md), md, len(r0), r0, r1]))' "$ck" "fuzz/corpus/checkpoint/$(echo "$ck" | tr / _)"
done
# safetensors-based folders for the safetensors target: [u8 layout][u32 len][file]...[last file], the layouts and
# their file names as in fuzz_targets/safetensors.rs (an absent file is an empty one)
for ck in $(find fixtures -path '*/layout-*/ckpt' -type d); do
  node -e '
    const fs = require("fs"); const [ck, out] = process.argv.slice(1)
    const layouts = [
      [".metadata", "__0_0.distcp", "__1_0.distcp", "__2_0.distcp"],
      [1, 2, 3].map((r) => `shard-0000${r}-model-00001-of-00001.safetensors`),
      ["model.safetensors.index.json", "model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors"],
      ["model.safetensors"],
      ["model.safetensors.index.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
        ...["00001-model-00001", "00001-model-00002", "00002-model-00001", "00002-model-00002"].map((s) => `sharded/shard-${s}-of-00002.safetensors`)],
    ]
    const have = (n) => fs.existsSync(ck + "/" + n)
    const which = layouts.findIndex((names) => names.every((n, i) => i > 0 || have(n)) && names.some(have) && fs.readdirSync(ck).every((n) => n === "sharded" || names.includes(n)))
    if (which < 0) process.exit(0)
    const parts = [Buffer.from([which])]
    layouts[which].forEach((n, i) => {
      const b = have(n) ? fs.readFileSync(ck + "/" + n) : Buffer.alloc(0)
      if (i + 1 < layouts[which].length) { const h = Buffer.alloc(4); h.writeUInt32LE(b.length); parts.push(h) }
      parts.push(b)
    })
    fs.writeFileSync(out, Buffer.concat(parts))' "$ck" "fuzz/corpus/safetensors/$(echo "$ck" | tr / _)"
done
echo "seeded: $(ls fuzz/corpus/metadata | wc -l) metadata files, $(ls fuzz/corpus/torch_save | wc -l) records, $(ls fuzz/corpus/checkpoint | wc -l) folders, $(ls fuzz/corpus/safetensors | wc -l) safetensors folders"
