#!/usr/bin/env bash
# Cairn against llama.cpp on the same model, same threads, same workload. A benchmark:
# never run by CI. Usage:
#
#   benches/side_by_side.sh [-m MODEL] [-t "1 2"] [-r REPS] [-p 512] [-n 128] [--rounds N]
#                           [--ttft-runs 5] [--json-out FILE] ...   (see side_by_side.py -h)
#
# Sets up target/peer-venv with llama-cpp-python (which compiles llama.cpp for this
# CPU's SIMD: ~7 minutes the first time; its log goes to target/peer-install.log),
# builds cairn in release mode, then hands over to side_by_side.py (system python3,
# standard library only), which prints every figure and a markdown summary.
set -euo pipefail
cd "$(dirname "$0")/.."

PEER_VERSION=0.3.36
VENV=target/peer-venv
PY=${PYTHON:-python3}

if ! "$VENV/bin/python" -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$PEER_VERSION')" 2>/dev/null; then
    echo "setting up $VENV with llama-cpp-python==$PEER_VERSION (builds llama.cpp from source, several minutes)" >&2
    mkdir -p target
    "$PY" -m venv "$VENV"
    if ! "$VENV/bin/pip" install "llama-cpp-python==$PEER_VERSION" >target/peer-install.log 2>&1; then
        tail -n 40 target/peer-install.log >&2
        echo "pip install failed; full log in target/peer-install.log (a C/C++ compiler and cmake are needed)" >&2
        exit 1
    fi
fi

cargo build --release -p cairn
exec "$PY" benches/side_by_side.py --cairn target/release/cairn --python "$VENV/bin/python" "$@"
