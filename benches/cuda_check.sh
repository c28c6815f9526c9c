#!/usr/bin/env bash
# The CUDA checks that need an NVIDIA GPU (the development and CI machines have none):
# the backend's tests on the real device (CAIRN_REQUIRE_CUDA=1: a missing device fails
# them), SmolLM2 against llama.cpp's reference sequences, and `cairn bench` pp512/tg128
# beside llama.cpp's own CUDA build (llama-bench -ngl 99) in the same run. Usage:
#
#   benches/cuda_check.sh [MODEL.gguf]      # default: the SmolLM2 model `cairn pull` fetches
#
# The peer: LLAMA_BENCH=/path/to/llama-bench (built with -DGGML_CUDA=ON), or a llama.cpp
# source tree in target/llama.cpp that this script builds when nvcc and cmake exist;
# without either, only Cairn's figures are printed.
set -euo pipefail
cd "$(dirname "$0")/.."
export CAIRN_REQUIRE_CUDA=1
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
cargo build --release -p cairn
model=${1:-$(target/release/cairn pull)}
target/release/cairn info --devices

echo "== CUDA backend tests on the device"
cargo test --release -p cairn --test cuda --test cuda_kernels -- --test-threads=1

echo "== cairn bench, CUDA"
target/release/cairn bench -m "$model" --backend cuda -p 512 -n 128 -r 5
echo "== cairn bench, CPU (same run)"
target/release/cairn bench -m "$model" --backend cpu -p 512 -n 128 -r 3

bench=${LLAMA_BENCH:-}
if [ -z "$bench" ] && [ -d target/llama.cpp ] && command -v nvcc >/dev/null && command -v cmake >/dev/null; then
    cmake -S target/llama.cpp -B target/llama.cpp/build-cuda -DGGML_CUDA=ON -DCMAKE_BUILD_TYPE=Release >/dev/null
    cmake --build target/llama.cpp/build-cuda --target llama-bench -j "$(nproc)" >/dev/null
    bench=target/llama.cpp/build-cuda/bin/llama-bench
fi
if [ -n "$bench" ]; then
    echo "== llama.cpp (CUDA), same model"
    "$bench" -m "$model" -ngl 99 -p 512 -n 128 -r 5
else
    echo "no llama.cpp CUDA build (set LLAMA_BENCH or put llama.cpp's source in target/llama.cpp)"
fi
