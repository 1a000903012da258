#!/usr/bin/env bash
# Builds the fuzz targets with the stable toolchain (libFuzzer through libfuzzer-sys, coverage instrumentation by
# -C passes=sancov-module, overflow checks and debug assertions on; no ASan, which needs nightly), seeds the corpora
# from the torch-written fixtures and runs every target for SECONDS (default 60). Exits non-zero on any crash,
# panic, overflow, timeout or out-of-memory; the input that did it is left in fuzz/artifacts/<target>/.
# `npm test` runs it with a short budget so a regression fails CI; longer campaigns: `bash fuzz/run.sh 3600`
# (DISTCP_FUZZ_TARGETS="safetensors checkpoint" to run only some).
set -euo pipefail
cd "$(dirname "$0")"
SECONDS_EACH="${1:-60}"
TARGET=x86_64-unknown-linux-gnu
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 -Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table -Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions -Coverflow-checks"
cargo build --release --locked --target "$TARGET" --target-dir ../target/fuzz
(cd .. && bash fuzz/seed-corpus.sh)
status=0
for t in ${DISTCP_FUZZ_TARGETS:-unpickle metadata torch_save checkpoint safetensors}; do
  mkdir -p "artifacts/$t"
  echo "fuzz: $t for ${SECONDS_EACH}s"
  if ! "../target/fuzz/$TARGET/release/$t" "corpus/$t" -max_total_time="$SECONDS_EACH" -rss_limit_mb=2048 -timeout=10 \
      -artifact_prefix="artifacts/$t/" -print_final_stats=1 2>"artifacts/$t.log"; then
    echo "fuzz: $t FAILED"; tail -40 "artifacts/$t.log"; status=1
  else
    grep -E "stat::number_of_executed_units|Done [0-9]+ runs" "artifacts/$t.log" | tail -1
  fi
done
exit $status
