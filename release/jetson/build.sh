#!/usr/bin/env bash
# Cross-build the `cairn` binary (CLI and `cairn serve`) for Jetson boards running
# JetPack 6 (Ubuntu 22.04, aarch64, glibc 2.35) with Debian's cross gcc, check that it
# needs no newer glibc, and pack the release tarball:
#   target/release-jetson/cairn-<version>-aarch64-jetson.tar.gz
# holding the binary, cairn-serve.service, serve.env, install.sh and README.md.
#   apt-get install gcc-aarch64-linux-gnu libc6-dev-arm64-cross binutils-aarch64-linux-gnu
#   rustup target add aarch64-unknown-linux-gnu
#   release/jetson/build.sh
# Features: the defaults, wgpu, and cuda once runtime/Cargo.toml has it. glibc rather
# than musl: the CUDA driver (libcuda.so) is a glibc library, loaded at run time.
# On the board a native `cargo build --release -p cairn` gives the same binary.
set -euo pipefail
cd "$(dirname "$0")/../.."
target=aarch64-unknown-linux-gnu
max_glibc=2.35          # JetPack 6 = Ubuntu 22.04
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
export AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar
for tool in aarch64-linux-gnu-gcc aarch64-linux-gnu-objdump aarch64-linux-gnu-objcopy; do
    command -v "$tool" >/dev/null || {
        echo "build.sh: $tool is missing: apt-get install gcc-aarch64-linux-gnu libc6-dev-arm64-cross binutils-aarch64-linux-gnu" >&2
        exit 1
    }
done
if command -v rustup >/dev/null && ! rustup target list --installed | grep -qx "$target"; then
    rustup target add "$target"
fi

# `cuda` joins the features when the crate declares it (a line `cuda = ...` in [features]).
features=wgpu
if awk '/^\[/ { f = ($0 == "[features]") } f && /^cuda[ \t]*=/ { found = 1 } END { exit !found }' runtime/Cargo.toml; then
    features=wgpu,cuda
fi
echo "== cargo build --release -p cairn --bin cairn --features $features --target $target"
cargo build --release --locked -p cairn --bin cairn --features "$features" --target "$target"
tdir=${CARGO_TARGET_DIR:-target}
bin=$tdir/$target/release/cairn

# The glibc gate: every versioned symbol the binary imports must exist in 2.35.
newest=$(aarch64-linux-gnu-objdump -T "$bin" | grep -o 'GLIBC_[0-9][0-9.]*' | sed 's/^GLIBC_//' | sort -uV | tail -n 1)
[ -n "$newest" ] || { echo "build.sh: no GLIBC symbol versions in $bin: not a glibc binary?" >&2; exit 1; }
if [ "$(printf '%s\n%s\n' "$newest" "$max_glibc" | sort -V | tail -n 1)" != "$max_glibc" ]; then
    echo "build.sh: FAIL: $bin needs GLIBC_$newest, newer than JetPack 6's $max_glibc:" >&2
    aarch64-linux-gnu-objdump -T "$bin" | grep -E "GLIBC_($(printf '%s\n' "$newest" | sed 's/\./\\./g'))[^0-9.]" >&2 || true
    exit 1
fi
echo "glibc gate: newest symbol version GLIBC_$newest (JetPack 6 has $max_glibc): ok"
echo "needs: $(aarch64-linux-gnu-objdump -p "$bin" | awk '/NEEDED/ { printf "%s ", $2 }')"

version=$(cargo pkgid -p cairn | sed 's/.*[#@]//')
name=cairn-$version-aarch64-jetson
out=$tdir/release-jetson
stage=$out/$name
rm -rf "$stage"
mkdir -p "$stage"
# Debug info off (a tenth of the size); the symbol table stays for backtraces.
aarch64-linux-gnu-objcopy --strip-debug "$bin" "$stage/cairn"
cp release/jetson/cairn-serve.service release/jetson/serve.env release/jetson/README.md "$stage/"
install -m 0755 release/jetson/install.sh "$stage/install.sh"
chmod 0644 "$stage/cairn-serve.service" "$stage/serve.env" "$stage/README.md"
echo "$version $(git rev-parse --short HEAD 2>/dev/null || echo unknown) features=$features glibc<=$newest" > "$stage/BUILD"
tar -C "$out" --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -czf "$out/$name.tar.gz" "$name"
rm -rf "$stage"
echo "packed $out/$name.tar.gz ($(du -h "$out/$name.tar.gz" | cut -f1)):"
tar -tzvf "$out/$name.tar.gz"
