#!/usr/bin/env bash
# Seeds the fuzz corpora from the committed torch fixtures: every .metadata for the pickle/metadata targets, and
# every record of every .distcp (split at the offsets .metadata gives, via distcp inspect --json) for torch_save.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p fuzz/corpus/unpickle fuzz/corpus/metadata fuzz/corpus/torch_save fuzz/corpus/checkpoint
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
echo "seeded: $(ls fuzz/corpus/metadata | wc -l) metadata files, $(ls fuzz/corpus/torch_save | wc -l) records, $(ls fuzz/corpus/checkpoint | wc -l) folders"
