#!/usr/bin/env bash
# Builds llama.cpp's llama-server and llama-bench as the peer for `cairn serve`
# benchmarks, from the same llama.cpp that llama-cpp-python 0.3.36 vendors (the peer of
# benches/side_by_side.sh). A benchmark tool: never run by CI. Usage:
#
#   benches/peer_server.sh            # build once (~15 min on 2 cores), then a no-op
#   FORCE=1 benches/peer_server.sh    # rebuild
#
# Fetches the llama-cpp-python sdist from PyPI (no llama.cpp code lives in this repo),
# configures its vendor/llama.cpp with cmake from a venv (target/peer-server/venv), CPU
# only, native SIMD, static, no web UI assets (they would be downloaded), and installs
# the binaries to target/peer-server/bin/. The build log goes to target/peer-server.log.
set -euo pipefail
cd "$(dirname "$0")/.."

PEER_VERSION=0.3.36
LLAMA_COMMIT=0c1e57098      # llama.cpp commit that llama-cpp-python 0.3.36 vendors (its CHANGELOG)
ROOT=$PWD/target/peer-server
BIN=$ROOT/bin
LOG=$PWD/target/peer-server.log
PY=${PYTHON:-python3}

if [[ -z "${FORCE:-}" && -x $BIN/llama-server && -x $BIN/llama-bench ]]; then
    echo "peer already built: $BIN/llama-server" >&2
    "$BIN/llama-server" --version 2>&1 | grep -E '^version|^built' >&2 || true
    exit 0
fi

mkdir -p "$ROOT" "$BIN"
: >"$LOG"
run() { echo "+ $*" >>"$LOG"; if ! nice -n 19 "$@" >>"$LOG" 2>&1; then tail -n 40 "$LOG" >&2; echo "failed: $*; log in $LOG" >&2; exit 1; fi; }

if [[ ! -x $ROOT/venv/bin/cmake ]]; then
    echo "setting up $ROOT/venv with cmake and ninja" >&2
    run "$PY" -m venv "$ROOT/venv"
    run "$ROOT/venv/bin/pip" install cmake ninja
fi

SRC=$ROOT/src/llama_cpp_python-$PEER_VERSION/vendor/llama.cpp
if [[ ! -f $SRC/CMakeLists.txt ]]; then
    echo "fetching the llama-cpp-python==$PEER_VERSION sdist" >&2
    # --no-binary for this package only: its build deps (cmake...) may come as wheels.
    run "$ROOT/venv/bin/pip" download --no-binary llama-cpp-python --no-deps \
        "llama-cpp-python==$PEER_VERSION" -d "$ROOT/dl"
    mkdir -p "$ROOT/src"
    run tar -xzf "$ROOT/dl/llama_cpp_python-$PEER_VERSION.tar.gz" -C "$ROOT/src"
fi

echo "building llama-server and llama-bench (log: $LOG)" >&2
export PATH=$ROOT/venv/bin:$PATH
# The commit is passed in: the sdist has no git metadata, and git must not report the
# repository the sdist is extracted into (this one).
export GIT_CEILING_DIRECTORIES=$ROOT/src
run cmake -S "$SRC" -B "$ROOT/build" -G Ninja \
    -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
    -DLLAMA_BUILD_COMMIT=$LLAMA_COMMIT
run cmake --build "$ROOT/build" --target llama-server llama-bench -j2
install -m 755 "$ROOT/build/bin/llama-server" "$ROOT/build/bin/llama-bench" "$BIN/"
echo "installed to $BIN" >&2
"$BIN/llama-server" --version 2>&1 | grep -E '^version|^built' >&2 || true
