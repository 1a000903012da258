#!/usr/bin/env bash
# The WASM fallback: the binding crate for wasm32-wasip1 (napi-rs's single-threaded WASI flavour, run by
# @napi-rs/wasm-runtime / emnapi). Uses the toolchain that scripts/wasm-toolchain.sh unpacks (Debian's rustc-web +
# rust-web-src with -Zbuild-std, clang-19 + wasi-libc for zstd-sys's C, rustup's rust-lld to link).
#   bash scripts/build-wasm.sh check   type-check the workspace for wasm32-wasip1 (where a port stops)
#   bash scripts/build-wasm.sh         build distcp.wasm32-wasip1.wasm + the generated WASI loader (napi build)
# STATUS (measured with napi-rs 3.10.12 / napi-build 2.6.0 / emnapi 1.11.3; nothing is shipped yet):
#   1. The toolchain works: std, core, alloc and every dependency (zstd-sys's C through clang-19 + wasi-libc included)
#      compile for wasm32-wasip1.
#   2. `check` on this tree stops in distcp-core: 14 errors, all unix-only file APIs (std::os::unix FileExt pread /
#      pwrite in source.rs and convert/job.rs, FileTypeExt and OpenOptionsExt::custom_flags in source.rs), then 2 in
#      distcp-node (memmap2's `advise` is unix-only, checkpoint.rs alloc_output).
#      scripts/wasm/distcp-wasip1.patch (a core `pio` module: pread/pwrite on unix, seek + read/write elsewhere; the
#      unix-only calls under cfg(unix)) makes both crates type-check clean for wasm32-wasip1:
#        git apply scripts/wasm/distcp-wasip1.patch && bash scripts/build-wasm.sh check
#      (memmap2's anonymous maps still compile to a stub that fails at run time on wasi: alloc_output needs a heap
#      fallback there.)
#   3. Linking stops in napi-build 2.6.0's build script: it links emnapi's `libemnapi-basic-napi-rs.a` ("Install
#      emnapi v2"), and the newest emnapi on the registry, 1.11.3, ships only libemnapi-basic.a / libemnapi.a, whose
#      napi_* imports use another wasm import module (`check` passes with EMNAPI_LINK_DIR pointing at a folder where
#      libemnapi-basic.a is copied under that name; a link would not be right). napi build also resolves emnapi
#      from the napi CLI's own folder, so the CLI must be installed beside it (.wasm-toolchain/js).
#      Next: an emnapi release with the napi-rs archives (or napi-build/CLI versions matching emnapi 1.x).
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
exec ../../.wasm-toolchain/js/node_modules/.bin/napi build --platform --release --target "$target" \
  --manifest-path ../../crates/distcp-node/Cargo.toml --package-json-path ../../package.json -o . \
  --no-js --dts ../../target/wasm/binding.d.cts -- --locked "${build_std[@]}"
