#!/usr/bin/env bash
# MoE² end to end, the numbers of the README's routing section: five experts
#   smollm2      SmolLM2-135M Q4_1, local ("phone")
#   gemma        Gemma-3-270M Q4_K_M, local ("phone")
#   smol-bs-lo   BitStack SmolLM2 (rank 4) under a small memory budget, local ("phone")
#   smol-bs-hi   the same file under a larger budget, local ("phone")
#   edge-gemma   Gemma-3-270M behind `cairn serve` in a network namespace across a veth
#                link shaped to 100 Mbit/s with tc tbf ("edge-box")
# profiled (`cairn route profile`), gated (`cairn route train`) and evaluated (`cairn
# route eval`, curves and a measured trace). The "phone" and the "edge box" share this
# machine's two cores, so their costs are those of one process each on it; energy is
# the CPU-time estimate at CAIRN_CPU_WATTS (2 W per busy core on the phone, 8 on the
# edge box: stated, not measured, since this machine has no counter).
#   benches/route_eval.sh            (root: it makes the namespace)
# WINDOWS (per category, default 12), TRACE (requests, default 40), OUT (default
# target/route-eval), CAIRN (default target/release/cairn).
set -euo pipefail
cd "$(dirname "$0")/.."
cairn=${CAIRN:-target/release/cairn}
out=${OUT:-target/route-eval}
windows=${WINDOWS:-12}
trace=${TRACE:-40}
mkdir -p "$out"
[ -x "$cairn" ] || cargo build --release -p cairn --bin cairn
export CAIRN_CPU_WATTS=2

smol=$("$cairn" pull)
gemma=$("$cairn" pull gemma3-270m)
stack=$out/smollm2-r4.cairn
if [ ! -f "$stack" ]; then
    echo "== cairn stack (rank 4, 8 levels) -> $stack"
    "$cairn" stack -m "$smol" -o "$stack" --levels 8 --rank 4 --calib /usr/share/common-licenses/Apache-2.0
fi

ns=cairn-route-eval
host_if=cre0a
peer=cre0b
cleanup() {
    [ -n "${serve_pid:-}" ] && kill "$serve_pid" 2>/dev/null || true
    ip link del "$host_if" 2>/dev/null || true
    ip netns del "$ns" 2>/dev/null || true
}
trap cleanup EXIT
cleanup
ip netns add "$ns"
ip link add "$host_if" type veth peer name "$peer"
ip link set "$peer" netns "$ns"
ip addr add 10.214.0.1/24 dev "$host_if"
ip link set "$host_if" up
ip netns exec "$ns" ip addr add 10.214.0.2/24 dev "$peer"
ip netns exec "$ns" ip link set "$peer" up
ip netns exec "$ns" ip link set lo up
tc qdisc add dev "$host_if" root tbf rate 100mbit burst 32kbit latency 50ms
CAIRN_CPU_WATTS=8 ip netns exec "$ns" "$cairn" serve -m "$gemma" --host 10.214.0.2 --port 8080 \
    --parallel 2 -c 2048 -t 1 > "$out/serve.log" 2>&1 &
serve_pid=$!
for _ in $(seq 120); do
    curl -fsS --max-time 2 http://10.214.0.2:8080/health > /dev/null 2>&1 && break
    sleep 1
done
curl -fsS --max-time 2 http://10.214.0.2:8080/health > /dev/null || { cat "$out/serve.log"; exit 1; }

reg=$out/edge.toml
cat > "$reg" <<EOF
embedder = "smollm2"

[[expert]]
name = "smollm2"
model = "$smol"
device = "phone"
threads = 1

[[expert]]
name = "gemma"
model = "$gemma"
device = "phone"
threads = 1

[[expert]]
name = "smol-bs-lo"
model = "$PWD/$stack"
memory = "${BS_LO:-110MB}"
context = 1024
device = "phone"
threads = 1

[[expert]]
name = "smol-bs-hi"
model = "$PWD/$stack"
memory = "${BS_HI:-150MB}"
context = 1024
device = "phone"
threads = 1

[[expert]]
name = "edge-gemma"
url = "http://10.214.0.2:8080"
tokenizer = "gemma"
device = "edge-box"
EOF
echo "== registry $reg"
t0=$(date +%s)
echo "== cairn route profile"
"$cairn" route profile "$reg" --reps 3 | tee "$out/profile.txt"
echo "== cairn route train --windows $windows"
"$cairn" route train "$reg" --windows "$windows" | tee "$out/train.txt"
echo "== cairn route eval --trace $trace"
"$cairn" route eval "$reg" --points 8 --trace "$trace" --json "$out/eval.json" --plot "$out/curves" | tee "$out/eval.txt"
echo "== done in $(( $(date +%s) - t0 ))s; $out/{profile,train,eval}.txt, eval.json, curves-*.svg"
