#!/bin/bash
# bench/convert/ab.sh: one native build against another on the same checkpoints, runs interleaved (old, new, old, …)
# so that a noisy shared machine bills both alike; prints every time, sorted, per case (warm page cache).
# usage: OLD=/path/to/old.node bash bench/convert/ab.sh [reps]
#   OLD: a distcp .node built from the commit to compare against (e.g. `git archive <commit> crates Cargo.toml
#        Cargo.lock | tar x -C /tmp/old && cd /tmp/old && cargo build --release -p distcp-node`, then copy
#        target/release/libdistcp_node.so); NEW defaults to this tree's distcp.linux-x64-gnu.node.
#   Checkpoints: `node bench/convert/run.mjs --layers 8 --ranks 3 [--tp] --keep` generates them (bench/data).
set -e
cd "$(dirname "$0")/../.."
reps=${1:-5}
S0=bench/data/convert-llama-8L-3rank; TP=bench/data/convert-llama-8L-3rank-tp; CFG=bench/data/convert-llama-8L-config
O=bench/out/ab; NEW=${NEW:-$PWD/distcp.linux-x64-gnu.node}
: "${OLD:?set OLD to the .node to compare against}"
one() { rm -rf $O; sync; NAPI_RS_NATIVE_LIBRARY_PATH=$1 node bench/convert/distcp_convert.mjs $2 $O $CFG $3 \
  | node -e 'console.log(JSON.parse(require("fs").readFileSync(0,"utf8").trim()).seconds.toFixed(3))'; }
cpsync() { rm -rf $O; sync; local s e; s=$(date +%s.%N); cp -r $1 $O && sync $O/* $O/.metadata $O; e=$(date +%s.%N)
  node -e "console.log(($e-$s).toFixed(3))"; }
for i in $(seq $reps); do
  for c in "s0 $S0 float16" "s0 $S0 float32" "s0 $S0 nocast" "tp $TP nocast" "tp $TP float16"; do
    set -- $c; dt=$3; [ $dt = nocast ] && dt=""
    echo "$1-$3 old $(one $OLD $2 "$dt")"; echo "$1-$3 new $(one $NEW $2 "$dt")"
  done
  echo "s0-cp+sync - $(cpsync $S0)"; echo "tp-cp+sync - $(cpsync $TP)"
done | sort -k1,2 -k3n | awk '{k=$1" "$2; a[k]=a[k]" "$3} END {for (k in a) print k":", a[k]}' | sort
rm -rf $O
