#!/usr/bin/env bash
# Time to first token and peak RSS of every long-prompt method at several prompt lengths:
# one `cairn generate --stats` process per measurement (so that each peak is its own),
# methods interleaved within each repetition, the same haystack prefix for all.
#   LENGTHS="2048 4096 8192" REPS=1 LAYER=21 FAST_LAYER=10 benches/longctx.sh > out.jsonl
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release/cairn}
LENGTHS=${LENGTHS:-"2048 4096 8192"}
REPS=${REPS:-1}
LAYER=${LAYER:-auto}
FAST_LAYER=${FAST_LAYER:-}
THREADS=${THREADS:-2}
HAY=$(mktemp)
trap 'rm -f "$HAY"' EXIT
for f in GPL-3 GPL-2 Apache-2.0 LGPL-2.1 MPL-2.0; do cat "/usr/share/common-licenses/$f" >> "$HAY"; done
methods=("" "--gemfilter k=1024,layer=$LAYER" "--gemfilter k=512,layer=$LAYER" "--baseline snapkv,k=1024" "--baseline h2o,k=1024")
[ -n "$FAST_LAYER" ] && methods+=("--gemfilter k=1024,layer=$FAST_LAYER")
for n in $LENGTHS; do
    for rep in $(seq 1 "$REPS"); do
        for m in "${methods[@]}"; do
            # shellcheck disable=SC2086
            line=$("$BIN" generate -t "$THREADS" --prompt-file "$HAY" --head-tokens "$n" -n 1 --temp 0 --stats $m \
                2>&1 >/dev/null | grep '^{')
            echo "{\"rep\":$rep,\"args\":\"$m\",${line#\{}"
        done
    done
done
