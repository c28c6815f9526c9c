#!/usr/bin/env bash
# `cairn serve` against llama.cpp's llama-server under the same concurrent streamed chat
# load (benches/serve_load.rs), same GGUF, same threads. A benchmark: never run by CI.
# Usage:
#
#   benches/serve_bench.sh [-m MODEL_GGUF] [-t THREADS] [-c "1 4 8"] [-n MAX_TOKENS]
#                          [-r REQUESTS_PER_CLIENT] [--ctx 2048] [--rounds N]
#                          [--servers "llama-server cairn"]
#
# Defaults: cairn pull's default model, 2 threads, concurrency "1 4 8", 128 tokens,
# 4 requests per client, 2048 context per slot, 1 round, both servers.
#
# For each concurrency C, each server is started with C slots, /health is awaited, C
# clients send C*R streamed requests in all (serve-load), and the server is stopped;
# the order of the servers alternates between rounds. llama-server's -c is the total
# context its slots share (so it gets CTX*C); cairn's -c is per slot. The table shows,
# per C and server, the round with the highest aggregate tok/s.
#
# The load comes from benches/serve_load.rs (target/release/serve-load): a thread per
# client and a minimal HTTP/SSE reader, about 0.02 of a core at 600 tok/s, where the
# Python openai client (LOAD=python: benches/serve_load.py, same prompts and JSON) takes
# about 0.3: on two cores a co-runner that size preempts a decode thread and stalls
# every barrier of the step (a 30%-duty busy loop cuts `cairn bench --parallel 8` by
# about 37%), so it measured the client as much as the server.
#
# Builds the peer (benches/peer_server.sh), target/serve-venv (openai) and cairn
# (NO_BUILD=1 skips cargo; CAIRN=path picks another binary); cairn is skipped with a
# note when `cairn serve --help` fails. Before each run it waits (QUIET_WAIT s at most,
# default 120) until other processes use <= 10% of the CPU, and it reports the share
# they took during the run ("foreign CPU"): on a shared machine, trust only runs where
# that is near 0. Server logs and raw results go to target/serve-bench/.
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL="" THREADS=2 CONC="1 4 8" NTOK=128 REQS=4 CTX=2048 ROUNDS=1 SERVERS="llama-server cairn"
while [[ $# -gt 0 ]]; do
    case $1 in
        -m) MODEL=$2; shift 2 ;;
        -t) THREADS=$2; shift 2 ;;
        -c) CONC=$2; shift 2 ;;
        -n) NTOK=$2; shift 2 ;;
        -r) REQS=$2; shift 2 ;;
        --ctx) CTX=$2; shift 2 ;;
        --rounds) ROUNDS=$2; shift 2 ;;
        --servers) SERVERS=$2; shift 2 ;;
        -h|--help) sed -n '2,/^set /{/^#/p}' "$0"; exit 0 ;;
        *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done

PEER=target/peer-server/bin/llama-server
CAIRN=${CAIRN:-target/release/cairn}
VENV=target/serve-venv
OUTDIR=target/serve-bench
RESULTS=$OUTDIR/results.jsonl
mkdir -p "$OUTDIR"
: >"$RESULTS"

HAVE_CAIRN=1 HAVE_PEER=1
[[ " $SERVERS " == *" llama-server "* ]] || HAVE_PEER=0
[[ " $SERVERS " == *" cairn "* ]] || HAVE_CAIRN=0
[[ $HAVE_PEER == 0 ]] || benches/peer_server.sh
if ! "$VENV/bin/python" -c "import openai" 2>/dev/null; then
    echo "setting up $VENV with openai" >&2
    python3 -m venv "$VENV" && "$VENV/bin/pip" install -q openai==3.57.0   # as .ci/run
fi
[[ -n "${NO_BUILD:-}" ]] || nice -n 19 cargo build --release -p cairn -p cairn-benches --bin cairn --bin serve-load
if [[ ${LOAD:-rust} == python ]]; then
    LOADGEN=("$VENV/bin/python" benches/serve_load.py)
else
    LOADGEN=(target/release/serve-load)
    [[ -x ${LOADGEN[0]} ]] || cargo build --release -p cairn-benches --bin serve-load
fi
if [[ $HAVE_CAIRN == 1 ]] && ! "$CAIRN" serve --help >/dev/null 2>&1; then
    echo "note: '$CAIRN serve --help' fails: cairn serve is skipped, llama-server runs alone" >&2
    HAVE_CAIRN=0
fi
if [[ -z $MODEL ]]; then
    MODEL=${CAIRN_HOME:-$HOME/.cache/cairn}/models/SmolLM2-135M-Instruct.Q4_1.gguf
    [[ -f $MODEL ]] || MODEL=$("$CAIRN" pull | tail -n 1)
fi
[[ -f $MODEL ]] || { echo "model not found: $MODEL" >&2; exit 1; }
WEBUI_FLAG=""
[[ $HAVE_PEER == 1 && $("$PEER" --help 2>&1) == *--no-webui* ]] && WEBUI_FLAG=--no-webui
echo "model $MODEL, $THREADS threads, concurrency $CONC, $NTOK tokens, $REQS requests/client" >&2

free_port() { "$VENV/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# cpu [PID]: wall clock, the machine's busy CPU ticks, and PID's CPU ticks.
cpu() { echo "$(date +%s.%N) $(awk '/^cpu /{print $2+$3+$4+$7+$8+$9}' /proc/stat) $(awk '{print $14+$15}' /proc/${1:-self}/stat 2>/dev/null || echo 0)"; }
# wait_quiet: up to QUIET_WAIT s (120) until other processes use <= 10% of the CPU.
wait_quiet() {
    local a b
    for _ in $(seq "${QUIET_WAIT:-120}"); do
        a=($(cpu)); sleep 1; b=($(cpu))
        awk -v t="$(( b[1] - a[1] ))" -v n="$(nproc)" 'BEGIN{exit !(t / 100 / n <= 0.10)}' && return 0
    done
    echo "   (machine still busy; running anyway)" >&2
}

# bench NAME C CMD...: starts the server (its port is $PORT), waits for /health (up to
# 180 s), runs the load, stops the server; a server that dies or never gets healthy is
# recorded as a run with every request failed. Each result gets `server_cores` (the
# server's CPU time over the run's wall time) and `foreign`: the share of the machine's
# CPU that other processes (not the server, not the client) took meanwhile.
bench() {
    local name=$1 c=$2; shift 2
    local log=$OUTDIR/$name-c$c.log url=http://127.0.0.1:$PORT
    wait_quiet
    echo "== $name, C=$c: $*" >&2
    "$@" >"$log" 2>&1 &
    local pid=$! ok=0
    for _ in $(seq 360); do
        kill -0 $pid 2>/dev/null || break
        if [[ $(curl -s -o /dev/null -w '%{http_code}' "$url/health") == 200 ]]; then ok=1; break; fi
        sleep 0.5
    done
    if [[ $ok == 1 ]]; then
        local model t0 t1
        model=$(curl -s "$url/v1/models" | "$VENV/bin/python" -c 'import json,sys; print(json.load(sys.stdin)["data"][0]["id"])' || echo default)
        t0=$(cpu $pid)
        "${LOADGEN[@]}" --base-url "$url/v1" --model "$model" \
            --concurrency "$c" --requests $((c * REQS)) --max-tokens "$NTOK" \
            --json-out "$OUTDIR/$name-c$c.json" >"$OUTDIR/last.json" || true
        t1=$(cpu $pid)
        "$VENV/bin/python" - "$name" "$t0" "$t1" "$(nproc)" "$OUTDIR/last.json" >>"$RESULTS" <<'PY' || true
import json, sys
d = json.loads(open(sys.argv[5]).readline())
(w0, b0, s0), (w1, b1, s1) = (map(float, a.split()) for a in sys.argv[2:4])
other = (b1 - b0 - (s1 - s0)) / 100 - d.get("client_cpu_s", 0)
d.update(server=sys.argv[1], server_cores=round((s1 - s0) / 100 / (w1 - w0), 2),
         foreign=round(max(0.0, other) / ((w1 - w0) * int(sys.argv[4])), 3))
print(json.dumps(d))
PY
    else
        echo "$name did not become healthy; last lines of $log:" >&2; tail -n 15 "$log" >&2
        echo "{\"server\": \"$name\", \"concurrency\": $c, \"agg_tok_s\": 0, \"errors\": $((c * REQS))}" >>"$RESULTS"
    fi
    kill $pid 2>/dev/null || true
    wait $pid 2>/dev/null || true
}

run_peer() {
    [[ $HAVE_PEER == 1 ]] || return 0
    PORT=$(free_port)
    bench llama-server "$1" "$PEER" -m "$MODEL" --host 127.0.0.1 --port "$PORT" \
        -np "$1" -t "$THREADS" -tb "$THREADS" -c $((CTX * $1)) $WEBUI_FLAG
}
run_cairn() {
    [[ $HAVE_CAIRN == 1 ]] || return 0
    PORT=$(free_port)
    bench cairn "$1" "$CAIRN" serve -m "$MODEL" --host 127.0.0.1 --port "$PORT" \
        --parallel "$1" -t "$THREADS" -c "$CTX"
}

for round in $(seq "$ROUNDS"); do
    for c in $CONC; do
        if (( round % 2 )); then run_peer "$c"; run_cairn "$c"; else run_cairn "$c"; run_peer "$c"; fi
    done
done

# Per concurrency and server, the round with the highest aggregate (noise only slows).
"$VENV/bin/python" - "$RESULTS" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
by = {}
for r in rows:
    by.setdefault((r["concurrency"], r["server"]), []).append(r)
best = {k: max(v, key=lambda r: r["agg_tok_s"]) for k, v in by.items()}
agg = {k: r["agg_tok_s"] for k, r in best.items()}
fmt = lambda r, k, f: format(r[k], f) if r.get(k) is not None else "-"
print(f"\n(best of {max(len(v) for v in by.values())} round(s); errors summed over rounds)\n")
print("| concurrency | server | agg tok/s | p50 TTFT ms | p95 TTFT ms | errors | server cores | foreign CPU |")
print("|---:|---|---:|---:|---:|---:|---:|---:|")
for (c, s), r in sorted(best.items()):
    print(f"| {c} | {s} | {r['agg_tok_s']:.1f} | {fmt(r, 'ttft_p50_ms', '.0f')} | {fmt(r, 'ttft_p95_ms', '.0f')} "
          f"| {sum(x['errors'] for x in by[c, s])} | {fmt(r, 'server_cores', '.2f')} | {fmt(r, 'foreign', '.0%')} |")
cs = sorted({c for c, _ in by})
print()
for c in cs:
    if agg.get((c, "llama-server")) and (c, "cairn") in agg:
        print(f"C={c}: cairn / llama-server aggregate = {agg[c, 'cairn'] / agg[c, 'llama-server']:.2f}")
for s in ("cairn", "llama-server"):
    lo, hi = cs[0], cs[-1]
    if hi != lo and agg.get((lo, s)) and (hi, s) in agg:
        print(f"{s}: aggregate at C={hi} / at C={lo} = {agg[hi, s] / agg[lo, s]:.2f}")
EOF
