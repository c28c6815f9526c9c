#!/usr/bin/env bash
# The FineQuant / RTN comparison table of the README (issue: .cairn + FineQuant):
# converts the default model to every format, then measures linear-weight bytes,
# perplexity on the reference text (both conventions) and, with `bench`, pp512/tg128.
#
#   benches/formats_table.sh [ppl|bench|all]   (default all; outputs go to $OUT)
#
# MODEL=gemma3-270m picks another model, ONLY="source fq4-g64" a subset of the
# formats, WINDOWS=N limits perplexity to N windows of 512 tokens.
set -euo pipefail
cd "$(dirname "$0")/.."
PHASE=${1:-all}
MODEL=${MODEL:-smollm2-135m-instruct}
OUT=${OUT:-target/formats-table/$MODEL}
TEXT=${TEXT:-/usr/share/common-licenses/GPL-3}
THREADS=${THREADS:-2}
mkdir -p "$OUT"
cargo build --release -q
CAIRN=target/release/cairn
CONFIGS=(
  "source|"
  "f16|f16"
  "fq8-g64|fq8 -g 64"
  "fq8-auto|fq8-auto"
  "fq4-g32|fq4 -g 32"
  "fq4-g64|fq4 -g 64"
  "fq4-g128|fq4 -g 128"
  "fq4-auto|fq4-auto"
  "rtn4-g32|rtn4 -g 32"
  "rtn4-g128|rtn4 -g 128"
  "rtn3-g32|rtn3 -g 32"
  "rtn3-g128|rtn3 -g 128"
  "rtn2-g32|rtn2 -g 32"
  "rtn2-g128|rtn2 -g 128"
)
SRC=$($CAIRN pull "$MODEL" | tail -1)
PPL_ARGS=()
if [ -n "${WINDOWS:-}" ]; then PPL_ARGS=(--windows "$WINDOWS"); fi
if [ -n "${ONLY:-}" ]; then
  KEEP=()
  for c in "${CONFIGS[@]}"; do
    case " $ONLY " in *" ${c%%|*} "*) KEEP+=("$c") ;; esac
  done
  CONFIGS=("${KEEP[@]}")
fi
for c in "${CONFIGS[@]}"; do
  name=${c%%|*}; args=${c#*|}
  if [ "$name" = source ]; then model=$SRC; else model=$OUT/$name.cairn; fi
  if [ "$name" != source ] && [ ! -f "$model" ]; then
    # shellcheck disable=SC2086
    $CAIRN convert -m "$SRC" -q $args -o "$model" 2> "$OUT/$name.convert.log"
  fi
  $CAIRN info -m "$model" | grep '^linear weights' > "$OUT/$name.info"
  if [ "$PHASE" != bench ]; then
    $CAIRN perplexity -m "$model" -t "$THREADS" -f "$TEXT" "${PPL_ARGS[@]}" 2>/dev/null | tail -1 > "$OUT/$name.ppl"
  fi
  if [ "$PHASE" != ppl ]; then
    $CAIRN bench -m "$model" -t "$THREADS" -p 512 -n 128 -r 3 -o json 2>/dev/null > "$OUT/$name.bench.json"
  fi
  echo "$name: $(cat "$OUT/$name.info") | $(cat "$OUT/$name.ppl" 2>/dev/null)" >&2
done
python3 - "$OUT" "${CONFIGS[@]}" <<'PY'
import json, re, sys, os
out, configs = sys.argv[1], [c.split('|')[0] for c in sys.argv[2:]]
print("| weights | linear bytes | bits/param | ppl (all) | ppl (second half) | pp512 t/s | tg128 t/s |")
print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
for n in configs:
    info = open(f"{out}/{n}.info").read()
    b, bits = re.search(r"(\d+) bytes, \d+ params, ([\d.]+) bits", info).groups()
    ppl = open(f"{out}/{n}.ppl").read() if os.path.exists(f"{out}/{n}.ppl") else ""
    m = re.search(r"ppl = ([\d.]+) \(second half: ([\d.]+)\)", ppl)
    p1, p2 = m.groups() if m else ("", "")
    pp = tg = ""
    if os.path.exists(f"{out}/{n}.bench.json"):
        j = json.load(open(f"{out}/{n}.bench.json"))
        pp, tg = f"{j['pp_tps']['mean']:.1f}", f"{j['tg_tps']['mean']:.1f}"
    print(f"| {n} | {int(b):,} | {bits} | {p1} | {p2} | {pp} | {tg} |")
PY
