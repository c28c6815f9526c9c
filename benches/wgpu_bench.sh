#!/usr/bin/env bash
# The wgpu backend against the CPU backend on one machine: `cairn bench` pp512/tg128 on
# each, A B A B, then the per-adapter details. Usage: benches/wgpu_bench.sh [MODEL] [REPS]
# Needs a GPU adapter (`cairn info --devices`); on lavapipe the numbers only show the
# backend works, not how fast a GPU is.
set -euo pipefail
cd "$(dirname "$0")/.."
model="${1:-smollm2-135m-instruct}"
reps="${2:-3}"
cargo build --release -q
bin=target/release/cairn
$bin info --devices
for round in 1 2; do
    for backend in cpu wgpu; do
        echo "== round $round: $backend"
        $bin bench -m "$model" --backend "$backend" -p 512 -n 128 -r "$reps"
    done
done
