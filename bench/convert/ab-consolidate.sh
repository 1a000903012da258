#!/bin/bash
# bench/convert/ab-consolidate.sh: cold-cache consolidation of HuggingFaceStorageWriter(save_distributed=True) shards
# into one Hugging Face folder, one native build against another and against `cp -r` + `sync` of the same bytes,
# interleaved (old, new, cp+sync, old, …) so that a noisy shared machine bills all alike. Before every run the
# inputs are evicted from the page cache (bench/lib/evict.py) and the previous output deleted and synced.
# Prints every run's seconds and peak RSS (KiB, /usr/bin/time), then per contestant: sorted seconds and the median
# ratio to cp -r + sync (its seconds / this one's: > 1 is faster than the copy).
# usage: OLD=/path/to/old.node bash bench/convert/ab-consolidate.sh [reps] [shards-dir]
#   shards-dir defaults to bench/data/convert-llama-18L-3rank-hf-sharded (`node bench/convert/run.mjs --layers 18
#   --ranks 3 --only 'distcp (hf shards)' --keep` generates it with torch, and the config beside it).
#
# Session 3 (2-CPU shared VM, load 6–9, 2.11 GB from 3 ranks): a cold run spends ~73% of its data phase in
# copy_file_range (strace -c -f: 4.08 s of 5.56 s; sync_file_range 0.31 s, fadvise WILLNEED 0.26 s, the final fsyncs
# 0.03 s, the rest between calls). Tried against the build of 74417f9, none kept: WILLNEED 64 MiB ahead instead of
# one tensor, POSIX_FADV_SEQUENTIAL on the sources (what cp does), write-back started per 256 MiB instead of per
# tensor, no write-back before the fsync. The 5-run exploration suggested 10–20% cold; three campaigns of this script
# (5, 5, 6 runs) gave medians old/new 7.58/6.82, 5.14/5.76, 4.60/5.54 s — no reproducible gain, and no-write-back
# was slower warm. The same runs put the unchanged build at 1.56–2.28× cp -r + sync (medians).
set -e
cd "$(dirname "$0")/../.."
reps=${1:-3}
HF=${2:-bench/data/convert-llama-18L-3rank-hf-sharded}; CFG=${CFG:-bench/data/convert-llama-18L-config}
O=bench/out/ab-consolidate; NEW=${NEW:-$PWD/distcp.linux-x64-gnu.node}; PY=${DISTCP_PYTHON:-.venv/bin/python}
: "${OLD:?set OLD to the .node to compare against}"
mkdir -p bench/out
prep() { rm -rf $O; sync; $PY bench/lib/evict.py $HF/*.safetensors; }
one() { prep; NAPI_RS_NATIVE_LIBRARY_PATH=$1 /usr/bin/time -f '%M' -o $O.rss node bench/convert/distcp_convert.mjs $HF $O $CFG \
  | node -e 'process.stdout.write(JSON.parse(require("fs").readFileSync(0,"utf8").trim()).seconds.toFixed(3))'; echo " $(cat $O.rss)"; }
cpsync() { prep; local s e; s=$(date +%s.%N); cp -r $HF $O && sync $O/* $O; e=$(date +%s.%N)
  node -e "process.stdout.write(($e-$s).toFixed(3))"; echo " 0"; }
for i in $(seq $reps); do
  echo "old $(one $OLD)"; echo "new $(one $NEW)"; echo "cp+sync $(cpsync)"
done | tee $O.log
rm -rf $O $O.rss
node -e '
  const rows = require("fs").readFileSync(process.argv[1], "utf8").trim().split("\n").map((l) => l.split(" "))
  const by = {}; for (const [k, s, rss] of rows) (by[k] ??= []).push([Number(s), Number(rss)])
  const med = (a) => { const v = a.map((x) => x[0]).sort((x, y) => x - y); return v[(v.length - 1) >> 1] }
  for (const [k, v] of Object.entries(by))
    console.log(`${k.padEnd(8)} ${v.map((x) => x[0].toFixed(2)).sort((a, b) => a - b).join(" ")} s; median ${med(v).toFixed(2)} s = ${(med(by["cp+sync"]) / med(v)).toFixed(2)}x cp -r + sync; peak RSS ${(Math.max(...v.map((x) => x[1])) / 1024).toFixed(0)} MiB`)' $O.log
