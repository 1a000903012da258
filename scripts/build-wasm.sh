#!/usr/bin/env bash
# The WASM fallback: the binding crate for wasm32-wasip1 (napi-rs's single-threaded WASI flavour, run by
# @napi-rs/wasm-runtime / emnapi). Uses the toolchain that scripts/wasm-toolchain.sh unpacks (Debian's rustc-web +
# rust-web-src with -Zbuild-std, clang-19 + wasi-libc for zstd-sys's C, rustup's rust-lld to link).
#   bash scripts/build-wasm.sh check   type-check the workspace for wasm32-wasip1 (where a port stops)
#   bash scripts/build-wasm.sh         build distcp.wasm32-wasip1.wasm + the generated WASI loader (napi build)
# Output: npm/wasm32-wasip1/ (the package distcp-wasm32-wasip1, napi-rs's name for the single-threaded WASI flavour):
# distcp.wasm32-wasip1.wasm and napi's generated loaders (distcp.wasip1.cjs, ...); the folder's package.json and
# README.md are tracked, the build is not. src/native.ts loads it where no native binary fits, or with
# DISTCP_FORCE_WASM=1; `npm test` runs this script, then a subset of the suites through it (scripts/test.mjs).
# Measured here (2 cores, shared): the toolchain 30 s (203 MB of .debs + the JS runtime from npm), a clean build
# 4 min 09 s (std, every dependency and the binding, release), a rebuild after a binding change about 1 min.
# What differs on wasm32-wasip1 (all cfg'd in the crates): no mmap (heap buffers), no pread/pwrite (seek + read/write,
# crates/distcp-core/src/pio.rs), no copy_file_range / fadvise / flock (plain writes, unlocked folders), no threads
# (work runs on the calling thread; saves are staged fully before the write), no CUDA (cudaInfo() says so), no pid
# (Node's, passed as DISTCP_NODE_PID). Debian 12's wasi-libc predates symbols Rust 1.96's std links: see
# crates/distcp-node/src/wasi_libc.rs. A panic aborts the module (panic=abort): it cannot become a JS error there.
# On Node 20 and 22, node:wasi's fast API callbacks can start a garbage collection inside the fast call and corrupt
# V8's heap (SIGSEGV after a few hundred MB of reads): npm/wasm32-wasip1/wasi-fast-api.cjs has the root cause and
# turns those calls off; this script makes napi's generated loader require it before the module is instantiated.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/wasm-toolchain.sh
tc="$PWD/.wasm-toolchain/root"
target=wasm32-wasip1
export LD_LIBRARY_PATH="$tc/usr/lib/x86_64-linux-gnu:$tc/usr/lib/llvm-22/lib:$tc/usr/lib/llvm-19/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export RUSTC="$tc/usr/bin/rustc"
export RUSTC_BOOTSTRAP=1 # -Zbuild-std on a stable rustc and cargo
# rustc-web has no wasm std: cargo builds it from rust-web-src (found through the rustc's sysroot, lib/rustlib/src/rust)
rust_lld="$(ls "$HOME"/.rustup/toolchains/*/lib/rustlib/x86_64-unknown-linux-gnu/bin/rust-lld | head -1)"
export CARGO_TARGET_WASM32_WASIP1_LINKER="$rust_lld"
# link against Debian's wasi-libc instead of the self-contained copy rustup would ship with the target's std
export CARGO_TARGET_WASM32_WASIP1_RUSTFLAGS="-C link-self-contained=no -L $tc/usr/lib/wasm32-wasi"
export CC_wasm32_wasip1="$tc/usr/bin/clang-19"
export CFLAGS_wasm32_wasip1="--target=wasm32-wasi --sysroot=$tc/usr -resource-dir=$tc/usr/lib/llvm-19/lib/clang/19"
export AR_wasm32_wasip1="$tc/usr/lib/llvm-19/bin/llvm-ar"
export CARGO_TARGET_DIR="$PWD/target/wasm"
# napi-build links emnapi's archive for the target (napi build sets this itself from its own emnapi)
export EMNAPI_LINK_DIR="${EMNAPI_LINK_DIR:-$PWD/.wasm-toolchain/js/node_modules/emnapi/lib/$target}"
build_std=(-Zbuild-std=std,panic_abort)

if [ "${1:-}" = check ]; then
  cargo check --locked --target "$target" "${build_std[@]}" -p distcp-core
  exec cargo check --locked --target "$target" "${build_std[@]}" -p distcp-node
fi
# Built into the package folder of the fallback (npm/wasm32-wasi, published as distcp-wasm32-wasi). napi build checks
# that @emnapi/core and @emnapi/runtime, resolved from its --cwd, match the emnapi it links: the toolchain's JS folder
# is linked there as node_modules, which also lets the dev tree load the module from that folder.
out=npm/wasm32-wasip1
ln -sfn ../../.wasm-toolchain/js/node_modules "$out/node_modules"
cd "$out"
# napi reads package.json's `dtsHeaderFile` (the TaggedValue union the typings need) relative to its --cwd, which is
# this folder here: the header is linked where it looks for it, for the build only (the folder is gitignored and
# the package's `files` list does not ship it)
header=crates/distcp-node/binding-header.d.ts
mkdir -p "$(dirname "$header")"
ln -sfn "$(cd ../.. && pwd)/$header" "$header"
../../.wasm-toolchain/js/node_modules/.bin/napi build --platform --release --target "$target" \
  --manifest-path ../../crates/distcp-node/Cargo.toml --package-json-path ../../package.json -o . \
  --no-js --dts ../../target/wasm/binding.d.cts -- --locked "${build_std[@]}"
rm "$header" && rmdir "$(dirname "$header")" crates
grep -q 'export type TaggedValue' distcp.wasip1.d.cts || { echo "build-wasm.sh: the typings lack the header ($header)" >&2; exit 1; }
# the generated loader requires wasi-fast-api.cjs (tracked) just before it loads node:wasi; fails loudly when a
# newer napi generates a loader without that line, rather than shipping one that crashes on Node 20 and 22
loader=distcp.wasip1.cjs
anchor="const { WASI: __nodeWASI } = require('node:wasi')"
guard="require('./wasi-fast-api.cjs') // before node:wasi: see that file (Node 20 and 22)"
if ! grep -qF "$guard" "$loader"; then
  grep -qxF "$anchor" "$loader" || { echo "build-wasm.sh: $loader has no line \"$anchor\" to guard" >&2; exit 1; }
  tmp="$(mktemp "$loader.XXXXXX")"
  awk -v anchor="$anchor" -v guard="$guard" '$0 == anchor { print guard } { print }' "$loader" > "$tmp"
  mv "$tmp" "$loader"
fi
