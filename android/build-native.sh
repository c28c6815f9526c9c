#!/usr/bin/env bash
# Build libcairn_jni.so (the JNI glue with Cairn's C ABI inside) for the Android ABIs
# the library ships, into cairn/src/main/jniLibs/<abi>/. Needs the Android NDK
# ($ANDROID_NDK_HOME) and cargo-ndk:
#   cargo install cargo-ndk
#   rustup target add aarch64-linux-android x86_64-linux-android
# Usage: android/build-native.sh [--debug]
set -euo pipefail
cd "$(dirname "$0")/.."
profile=(--release)
[ "${1:-}" = "--debug" ] && profile=()
: "${ANDROID_NDK_HOME:?set ANDROID_NDK_HOME to the NDK (r26 or newer)}"
cargo ndk -t arm64-v8a -t x86_64 --platform 24 -o android/cairn/src/main/jniLibs \
    build -p cairn-jni "${profile[@]}"
ls -l android/cairn/src/main/jniLibs/*/libcairn_jni.so
