#!/bin/bash
# bench/convert/ab-moe.sh: the MoE-shaped conversion (6,144 bf16 tensors of 64×64, 1 rank) of this tree against
# another distcp checkout and against `cp -r` + sync, runs interleaved (old, new, cp+sync, …) so that a noisy shared
# machine bills all alike; prints every time in ms, sorted, per contestant (warm page cache; distcp timed in-process
# as bench/convert/run.mjs times it, cp+sync as a process).
# usage: OLD=/path/to/other/checkout bash bench/convert/ab-moe.sh [reps] [dtype]
#   OLD: a built distcp checkout (dist/ and its .node), e.g. /work/main; without it only this tree and cp+sync run.
#   The checkpoint: `node bench/convert/run.mjs --moe --keep` generates it (bench/data/convert-moe-6144).
set -e
cd "$(dirname "$0")/../.."
reps=${1:-5}; dt=${2:-}
M=bench/data/convert-moe-6144; CFG=bench/data/convert-moe-config; O=bench/out/ab-moe
mkdir -p $CFG; echo '{"model_type": "llama", "tie_word_embeddings": false}' > $CFG/config.json
one() { rm -rf $O; sync; node $1/bench/convert/distcp_convert.mjs $M $O $CFG $dt \
  | node -e 'console.log((JSON.parse(require("fs").readFileSync(0,"utf8").trim()).seconds*1000).toFixed(0))'; }
cpsync() { rm -rf $O; sync; local s e; s=$(date +%s%N); cp -r $M $O && sync $O/* $O/.metadata $O; e=$(date +%s%N)
  echo $(( (e - s) / 1000000 )); }
for i in $(seq $reps); do
  [ -n "$OLD" ] && echo "old $(one $OLD)"
  echo "new $(one $PWD)"
  echo "cp+sync $(cpsync)"
done | sort -k1,1 -k2n | awk '{a[$1]=a[$1]" "$2} END {for (k in a) print k":", a[k]}' | sort
rm -rf $O
