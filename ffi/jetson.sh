#!/usr/bin/env bash
# Cross-build Cairn's C library for aarch64 Linux (Jetson and other arm64 boards) with
# Debian's cross toolchain, and with --test run the C tests on it under qemu-aarch64.
#   apt-get install gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user
#   rustup target add aarch64-unknown-linux-gnu
#   ffi/jetson.sh [--test [MODEL.gguf]]
# Output: target/aarch64-unknown-linux-gnu/release/libcairn_ffi.{so,a}; copy the .so (or
# link the .a) with ffi/include/cairn.h into the app. On the board itself a native
# `cargo build -p cairn-ffi --release` does the same without any of this.
set -euo pipefail
cd "$(dirname "$0")/.."
target=aarch64-unknown-linux-gnu
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
if command -v rustup >/dev/null && ! rustup target list --installed | grep -qx "$target"; then
    rustup target add "$target"
fi
cargo build -p cairn-ffi --release --target "$target"
lib=${CARGO_TARGET_DIR:-target}/$target/release
echo "built $lib/libcairn_ffi.so and $lib/libcairn_ffi.a"
[ "${1:-}" = "--test" ] || exit 0

model=${2:-${CAIRN_HOME:-$HOME/.cache/cairn}/models/SmolLM2-135M-Instruct.Q4_1.gguf}
[ -f "$model" ] || { echo "no model at $model (run cargo test or cairn pull first)" >&2; exit 1; }
cflags=(-std=c11 -Wall -Wextra -Werror -O1 -Iffi/include)
aarch64-linux-gnu-gcc "${cflags[@]}" ffi/tests/c/test_cairn.c -o "$lib/test_cairn_shared" \
    -L"$lib" -lcairn_ffi -Wl,-rpath,'$ORIGIN' -lpthread
aarch64-linux-gnu-gcc "${cflags[@]}" ffi/tests/c/test_cairn.c -o "$lib/test_cairn_static" \
    "$lib/libcairn_ffi.a" -lpthread -ldl -lm -lrt -lutil -lgcc_s
for t in shared static; do
    echo "== C tests, $t library, aarch64 under qemu"
    qemu-aarch64 -L /usr/aarch64-linux-gnu "$lib/test_cairn_$t" "$model" ffi/tests/c/test_cairn.c
done
