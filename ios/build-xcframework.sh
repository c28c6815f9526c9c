#!/usr/bin/env bash
# Build build/CairnFFI.xcframework: libcairn_ffi.a for iOS devices (arm64) and the
# simulator (arm64 + x86_64, joined with lipo), each with cairn.h and the module map.
# Needs macOS with Xcode and:
#   rustup target add aarch64-apple-ios aarch64-apple-ios-sim x86_64-apple-ios
set -euo pipefail
cd "$(dirname "$0")/.."
for t in aarch64-apple-ios aarch64-apple-ios-sim x86_64-apple-ios; do
    cargo build -p cairn-ffi --release --target "$t"
done
out=ios/build
rm -rf "$out" && mkdir -p "$out/headers" "$out/sim"
cp ffi/include/cairn.h ios/module/module.modulemap "$out/headers/"
lipo -create target/aarch64-apple-ios-sim/release/libcairn_ffi.a target/x86_64-apple-ios/release/libcairn_ffi.a \
    -output "$out/sim/libcairn_ffi.a"
xcodebuild -create-xcframework \
    -library target/aarch64-apple-ios/release/libcairn_ffi.a -headers "$out/headers" \
    -library "$out/sim/libcairn_ffi.a" -headers "$out/headers" \
    -output "$out/CairnFFI.xcframework"
echo "built $out/CairnFFI.xcframework"
