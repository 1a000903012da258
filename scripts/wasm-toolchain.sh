#!/usr/bin/env bash
# Unpacks, under .wasm-toolchain/ (gitignored, no system install), what a wasm32-wasip1 build of the binding needs on
# a Debian 12 machine where rustup cannot install Rust's std for wasm targets:
#   - Debian's rustc-web 1.96 (a rustc whose LLVM has the wasm backend) + its host std, and rust-web-src, so cargo can
#     build std for wasm32-wasip1 itself (-Zbuild-std, RUSTC_BOOTSTRAP=1);
#   - wasi-libc (the C library and sysroot for wasm32-wasi) and clang-19 with the wasm32 compiler-rt builtins, for the
#     C code of zstd-sys.
#   - the JS side of napi-rs's WASI flavour (emnapi, @emnapi/core, @emnapi/runtime, @napi-rs/wasm-runtime) under
#     .wasm-toolchain/js, apart from the project's node_modules.
# Linking uses rustup's rust-lld, which every rustup toolchain ships. Idempotent: a second run does nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=.wasm-toolchain
[ -f "$dir/.done" ] && { echo "wasm toolchain: $dir is ready"; exit 0; }
mkdir -p "$dir/debs" "$dir/root"
pkgs=(rustc-web libstd-rust-web-dev libstd-rust-web-1.96 rust-web-src wasi-libc
      libllvm22 clang-19 libclang-cpp19 libllvm19 libclang1-19 libclang-common-19-dev libclang-rt-19-dev-wasm32 llvm-19-linker-tools llvm-19)
# a fresh container has no package lists yet: fetch them once (as root) and try again
(cd "$dir/debs" && apt-get download "${pkgs[@]}") || { apt-get update -qq && (cd "$dir/debs" && apt-get download "${pkgs[@]}"); }
for deb in "$dir"/debs/*.deb; do dpkg -x "$deb" "$dir/root"; done
# napi-build links the reactor start file from where rustup's std for the target would put it
sc="$dir/root/usr/lib/rustlib/wasm32-wasip1/lib/self-contained"
mkdir -p "$sc" && cp "$dir"/root/usr/lib/wasm32-wasi/crt1-{reactor,command}.o "$sc"/
mkdir -p "$dir/js"
echo '{"name":"distcp-wasm-toolchain","private":true}' > "$dir/js/package.json"
(cd "$dir/js" && npm install --no-audit --no-fund --ignore-scripts \
  emnapi@2.0.0-beta.2 @emnapi/core@2.0.0-beta.2 @emnapi/runtime@2.0.0-beta.2 @napi-rs/wasm-runtime@1.2.7 @napi-rs/cli@3.10.12)
touch "$dir/.done"
echo "wasm toolchain: unpacked into $dir/root"
