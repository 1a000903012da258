#!/usr/bin/env bash
# The WASM fallback: the binding crate for wasm32-wasip1 (napi-rs's single-threaded WASI flavour, run by
# @napi-rs/wasm-runtime / emnapi). Uses the toolchain that scripts/wasm-toolchain.sh unpacks (Debian's rustc-web +
# rust-web-src with -Zbuild-std, clang-19 + wasi-libc for zstd-sys's C, rustup's rust-lld to link).
#   bash scripts/build-wasm.sh check   type-check the workspace for wasm32-wasip1 (where a port stops)
#   bash scripts/build-wasm.sh         build distcp.wasm32-wasip1.wasm + the generated WASI loader (napi build)
# STATUS (see README "Install"): `check` stops in distcp-core/distcp-node, which use unix-only APIs
# (std::os::unix FileExt pread/pwrite, libc::madvise/copy_file_range/flock, memmap2); nothing is shipped yet.
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
build_std=(-Zbuild-std=std,panic_abort)

if [ "${1:-}" = check ]; then
  exec cargo check --locked --target "$target" "${build_std[@]}" -p distcp-core -p distcp-node
fi
exec npx napi build --platform --release --target "$target" --manifest-path crates/distcp-node/Cargo.toml -o . \
  --js false --dts wasm-binding.d.cts -- --locked "${build_std[@]}"
