#!/usr/bin/env bash
# Seeds the fuzz corpora from the committed torch fixtures: every .metadata for the pickle/metadata targets, and
# every record of every .distcp (split at the offsets .metadata gives, via distcp inspect --json) for torch_save.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p fuzz/corpus/unpickle fuzz/corpus/metadata fuzz/corpus/torch_save
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
echo "seeded: $(ls fuzz/corpus/metadata | wc -l) metadata files, $(ls fuzz/corpus/torch_save | wc -l) records"
