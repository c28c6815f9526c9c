#!/usr/bin/env bash
# Load time of two model files, page cache warm, interleaved A B A B, medians:
#   benches/load_time.sh A.gguf B.cairn [ROUNDS=9] [THREADS=2]
# Each sample is a fresh process (`cairn bench -p 0 -n 0`: map, parse, verify, load,
# repack); its `load_seconds` (wall) is what is compared.
set -euo pipefail
cd "$(dirname "$0")/.."
A=$1; B=$2; ROUNDS=${3:-9}; THREADS=${4:-2}
cargo build --release -q
CAIRN=target/release/cairn
cat "$A" "$B" > /dev/null   # warm the page cache
sample() { $CAIRN bench -m "$1" -t "$THREADS" -p 0 -n 0 -r 1 -o json 2>/dev/null |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["load_seconds"])'; }
sample "$A" > /dev/null; sample "$B" > /dev/null
TA=(); TB=()
for _ in $(seq "$ROUNDS"); do TA+=("$(sample "$A")"); TB+=("$(sample "$B")"); done
python3 - "$A" "$B" "${TA[*]}" "${TB[*]}" <<'PY'
import statistics as st, sys
a, b, ta, tb = sys.argv[1], sys.argv[2], [float(x) for x in sys.argv[3].split()], [float(x) for x in sys.argv[4].split()]
ma, mb = st.median(ta), st.median(tb)
print(f"{a}: median {ma*1000:.1f} ms  {sorted(round(x*1000,1) for x in ta)}")
print(f"{b}: median {mb*1000:.1f} ms  {sorted(round(x*1000,1) for x in tb)}")
print(f"B / A = {mb/ma:.3f}")
PY
