#!/usr/bin/env bash
# distcp's GPU proof. Runs unchanged on the GPU machine (NVIDIA driver, python3 + torch with CUDA; no Node, no Rust)
# from the release binary in bench/gpu/bin/ (built here, see bench/gpu/README.md) and prints ONE table.
#
#   bench/gpu/run.sh            the whole bench (< 6 minutes): torch writes a 3-rank checkpoint, then correctness
#                               (GPU read == host read == torch dcp.load) and speed (warm and cold page cache)
#   bench/gpu/run.sh --smoke    cuda_info and a 1 GB pinned upload only (seconds)
#   bench/gpu/run.sh --node     cuda_info and the Node API checks only (bench/gpu/node-checks.mjs, about a minute)
#
# Environment: GB (size of the big checkpoint, default 8.6), WORK (default /tmp/distcp-gpu), PYTHON (python3).
# A failing step prints what it has and the table still shows every row measured.
set -u
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
BIN="${GPU_BENCH:-$HERE/bin/gpu_bench}"
PY="${PYTHON:-python3}"
WORK="${WORK:-/tmp/distcp-gpu}"
GB="${GB:-8.6}"
DEADLINE="${DEADLINE:-345}" # seconds: every step's time limit is cut so the whole run ends before this
# only for the binary: a python linked against its own libpython must not pick up the system's
BIN_LD_PATH="/usr/local/nvidia/lib64:/usr/local/nvidia/lib:/usr/lib/x86_64-linux-gnu:/usr/lib64:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
bench() { LD_LIBRARY_PATH="$BIN_LD_PATH" "$BIN" "$@"; }
LOG="$WORK/logs"
mkdir -p "$LOG"
T0=$(date +%s)

declare -A R=()
step() { echo; echo "== [$(( $(date +%s) - T0 ))s] $*"; }
# run NAME TIMEOUT CMD...: runs a step with a time limit, keeps its log, records its RESULT lines
run() {
  local name=$1 limit=$2; shift 2
  local left=$(( DEADLINE - ($(date +%s) - T0) ))
  if [ "$left" -lt 10 ]; then echo "!! skipping $name: the ${DEADLINE}s budget is spent"; R["$name.failed"]="skipped (time)"; return 1; fi
  [ "$limit" -le "$left" ] || limit=$left
  echo "\$ $*"
  if [ "$(type -t "$1")" = function ]; then
    timeout "$limit" env LD_LIBRARY_PATH="$BIN_LD_PATH" "$BIN" "${@:2}" > >(tee "$LOG/$name.log") 2>&1
  else
    timeout "$limit" "$@" > >(tee "$LOG/$name.log") 2>&1
  fi
  local rc=$?
  sleep 0.2 # let tee finish
  while read -r _ k v; do R["$name.$k"]="$v"; done < <(grep '^RESULT ' "$LOG/$name.log" 2>/dev/null)
  [ $rc -eq 0 ] || { echo "!! step $name failed (exit $rc)"; R["$name.failed"]="exit $rc"; }
  return $rc
}
drop_caches() {
  sync
  if echo 3 > /proc/sys/vm/drop_caches 2>/dev/null; then R[drop]=yes; else R[drop]="no (not root?)"; fi
  echo "drop_caches: ${R[drop]}"
}
g() { echo "${R[$1]:-n/a}"; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a+0 > 0 && b+0 > 0) printf "%.2fx", a / b; else printf "n/a" }'; }
minof() { awk -v a="$1" -v b="$2" 'BEGIN { if (a+0 <= 0) print b; else if (b+0 <= 0) print a; else print (a < b ? a : b) }'; }

table() {
  local ceil disk warm cold tw tc
  ceil=$(g ceiling.ceiling_gbps); disk=$(g disk.disk_gbps); warm=$(g best_warm); cold=$(g cold.load_gbps)
  tw=$(g torch.torch_warm_gbps); tc=$(g torch.torch_cold_gbps)
  echo
  echo "================ distcp GPU bench ($(hostname), $(date -u +%FT%TZ), $(( $(date +%s) - T0 )) s) ================"
  printf '| %-46s | %-14s | %-40s |\n' "row" "value" "vs"
  printf '|%s|%s|%s|\n' "$(printf -- '-%.0s' {1..48})" "$(printf -- '-%.0s' {1..16})" "$(printf -- '-%.0s' {1..42})"
  row() { printf '| %-46s | %-14s | %-40s |\n' "$1" "$2" "$3"; }
  row "GPU" "$(g gpu)" "driver $(g driver)"
  row "checkpoint (torch dcp.save, 3 ranks, bf16)" "$(g ckpt_gb) GB" "$(g ckpt_note)"
  row "pinned H2D ceiling (GB/s)" "$ceil" "256 MiB copies, one stream"
  row "disk read, cold cache (GB/s)" "$disk" "8 threads pread, drop_caches: $(g drop)"
  row "distcp -> GPU, warm (GB/s)" "$warm" "$(ratio "$warm" "$ceil") ceiling (target >= 0.8x), $(g best_cfg)"
  row "distcp -> GPU, cold (GB/s)" "$cold" "$(ratio "$cold" "$(minof "$disk" "$ceil")") min(disk, ceiling) (target >= 0.9x)"
  row "torch dcp.load -> CUDA, warm (GB/s)" "$tw" "distcp is $(ratio "$warm" "$tw") (target >= 3x)"
  row "torch dcp.load -> CUDA, cold (GB/s)" "$tc" "distcp is $(ratio "$cold" "$tc")"
  row "big: GPU read == host read" "$(g verify_big.verify_gpu_eq_host)" "tensors, bit for bit"
  row "big: GPU read sha256 == torch dcp.load" "$(g verify_big.verify_sha_eq_torch)" "host read: $(g hostsums_big.host_sha_eq_torch)"
  row "big: random boxes GPU == host" "$(g verify_big.verify_boxes)" ""
  row "Shard(1): GPU read == host read" "$(g verify_shard1.verify_gpu_eq_host)" ""
  row "Shard(1): GPU sha256 == torch dcp.load" "$(g verify_shard1.verify_sha_eq_torch)" "host read: $(g hostsums_shard1.host_sha_eq_torch)"
  row "Shard(1): random boxes GPU == host" "$(g verify_shard1.verify_boxes)" ""
  row "save from device == host save (files)" "$(g savecheck.save_device_eq_host)" "D2H via pinned staging $(g savecheck.download_gbps) GB/s"
  row "castcheck: Shard(1) as fp32 == host cast" "$(g castcheck.castcheck_eq_host)" "bf16 widened on the GPU (PTX), bit for bit"
  row "Node API: checks passed / failed" "$(g node.node_checks_passed) / $(g node.node_checks_failed)" "node-checks.mjs, $(g node.node_tensors) tensors vs host reads"
  row "castcheck: sha256 == torch CUDA .to(fp32)" "$(g castcheck.castcheck_sha_eq_torch)" "all 65536 bf16/fp16: $(g castcheck.castcheck_patterns)"
  local failed=""
  for k in "${!R[@]}"; do case $k in *.failed) failed="$failed ${k%.failed}(${R[$k]})";; esac; done
  echo "failed steps: ${failed:-none}"
  echo "logs: $LOG"
  if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then cp -r "$LOG" "$OUT/" 2>/dev/null; fi
}
trap 'if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then table | tee "$OUT/table.txt"; else table; fi' EXIT

step "binary and driver"
if [ ! -x "$BIN" ]; then echo "!! $BIN is missing (build it: see bench/gpu/README.md)"; R[bin.failed]=missing; exit 1; fi
run info 60 bench info
R[gpu]=$(sed -n 's/^cuda_info: device 0: \(.*\) pci.*/\1/p' "$LOG/info.log" | head -1)
R[driver]=$(sed -n 's/^cuda_info: available=[a-z]* driver=\(.*\)/\1/p' "$LOG/info.log" | head -1)
[ -n "${R[gpu]}" ] || R[gpu]="none"
R[driver]="${R[driver]} $(sed -n 's/^cuda_info: reason: //p' "$LOG/info.log" | head -1)"
if [ "${1:-}" = "--smoke" ]; then
  step "smoke: 1 GB pinned upload"
  run ceiling 60 bench ceiling --gb 1
  exit
fi

# distcp's Node API on the GPU (node-checks.mjs), with the Node binary pack-node.sh packed (this machine has none)
# and the carried dist/ + release addon; skipped when they were not carried
NODE_XZ="$HERE/node/node.xz"
ROOT="$(cd "$HERE/../.." && pwd)"
if [ -f "$NODE_XZ" ] && [ -d "$ROOT/dist" ] && ls "$ROOT"/distcp.*.node >/dev/null 2>&1; then
  step "Node API on the GPU (bench/gpu/node-checks.mjs)"
  "$PY" -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' "$NODE_XZ" "$WORK/node" \
    && chmod +x "$WORK/node" && run node 240 env LD_LIBRARY_PATH="$BIN_LD_PATH" "$WORK/node" "$HERE/node-checks.mjs"
else
  echo "(no Node checks: carry bench/gpu/node, dist and the addon; see bench/gpu/README.md)"; R[node.failed]="not carried"
fi
[ "${1:-}" = "--node" ] && exit

step "pinned H2D ceiling"
run ceiling 60 bench ceiling --gb 16

step "torch writes the checkpoints ($GB GB on 3 ranks + Shard(1)) into $WORK"
if run make 300 "$PY" "$HERE/make_ckpt.py" --out "$WORK" --gb "$GB"; then
  R[ckpt_gb]=$(du -sb "$WORK/big" | awk '{ printf "%.2f", $1 / 1e9 }')
  R[ckpt_note]="$(ls "$WORK/big" | grep -c distcp) files, Shard(0), on $(df -T "$WORK" | awk 'NR==2 { print $2 }')"
fi
[ -f "$WORK/big/.metadata" ] || { echo "!! no checkpoint, stopping"; exit 1; }

step "disk read rate, cold cache"
drop_caches
run disk 120 bench disk --ckpt "$WORK/big" --threads 8

step "distcp -> GPU, cold cache"
drop_caches
run cold 120 bench load --ckpt "$WORK/big" --runs 1

step "distcp -> GPU, warm cache (threads x staging sweep)"
best=""
for cfg in "8 16" "4 16" "16 16" "8 32" "8 8"; do
  set -- $cfg
  if run "warm_t$1_s$2" 120 bench load --ckpt "$WORK/big" --runs 3 --threads "$1" --slot-mb "$2"; then
    v=$(g "warm_t$1_s$2.load_gbps")
    if awk -v a="$v" -v b="${best:-0}" 'BEGIN { exit !(a > b) }'; then best=$v; R[best_cfg]="$1 threads x 2 x $2 MiB"; fi
  fi
done
[ -n "$best" ] && R[best_warm]=$best

step "torch dcp.load -> CUDA (cold, warm) and torch's sha256 of every tensor"
run torch 300 "$PY" "$HERE/torch_load.py" --ckpt "$WORK/big" --runs cold,warm --sums "$WORK/big.sha256"
run torch_shard1 120 "$PY" "$HERE/torch_load.py" --ckpt "$WORK/shard1" --runs warm --sums "$WORK/shard1.sha256" \
  --fp32-sums "$WORK/shard1.fp32.sha256"

step "correctness: GPU read == host read == torch"
run hostsums_big 300 bench hostsums --ckpt "$WORK/big" --sums "$WORK/big.sha256"
run verify_big 300 bench verify --ckpt "$WORK/big" --sums "$WORK/big.sha256" --boxes 2
run hostsums_shard1 120 bench hostsums --ckpt "$WORK/shard1" --sums "$WORK/shard1.sha256"
run verify_shard1 120 bench verify --ckpt "$WORK/shard1" --sums "$WORK/shard1.sha256" --boxes 4

step "castcheck: Shard(1) read to the GPU as float32 (device widening) == host cast == torch CUDA .to(float32)"
run castcheck 120 bench castcheck --ckpt "$WORK/shard1" --out "$WORK/cast" --sums "$WORK/shard1.fp32.sha256"

step "save from device memory == host save (Shard(1) checkpoint's tensors)"
run savecheck 180 bench savecheck --ckpt "$WORK/shard1" --out "$WORK/saves"
