#!/usr/bin/env bash
# Test the Jetson release here, without a Jetson: build (or reuse) the tarball, then
#  (a) greedy `generate` of the aarch64 binary under qemu-aarch64 gives the same token
#      ids as the x86 binary on the same prompt;
#  (b) the aarch64 `cairn serve` under qemu answers a chat completion, and /metrics
#      shows the board power of a fixture Jetson (INA3221) sysfs tree;
#  (c) install.sh into a scratch root (twice, keeping an edited serve.env), the files
#      in place, `systemd-analyze verify` of the installed unit without a warning, and
#      --uninstall / --purge.
#   apt-get install gcc-aarch64-linux-gnu libc6-dev-arm64-cross binutils-aarch64-linux-gnu qemu-user systemd curl
#   release/jetson/check.sh [MODEL.gguf]
# CAIRN_JETSON_TARBALL=path skips the build and tests that tarball.
set -euo pipefail
cd "$(dirname "$0")/../.."
repo=$PWD
t0=$(date +%s)
step() { echo "== [$(( $(date +%s) - t0 ))s] $*"; }
fail() { echo "check.sh: FAIL: $*" >&2; exit 1; }
for tool in qemu-aarch64 curl python3 systemd-analyze; do
    command -v "$tool" >/dev/null || fail "$tool is missing (apt-get install qemu-user curl python3 systemd)"
done
export QEMU_LD_PREFIX=/usr/aarch64-linux-gnu
[ -d "$QEMU_LD_PREFIX" ] || fail "no $QEMU_LD_PREFIX (apt-get install libc6-dev-arm64-cross)"

scratch=$(mktemp -d "${TMPDIR:-/tmp}/cairn-jetson-check.XXXXXX")
serve_pid=
cleanup() {
    if [ -n "$serve_pid" ] && kill -0 "$serve_pid" 2>/dev/null; then
        kill -KILL "$serve_pid" 2>/dev/null || true
        wait "$serve_pid" 2>/dev/null || true
    fi
    rm -rf "$scratch"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# The tarball, and the x86 binary to compare with.
tdir=${CARGO_TARGET_DIR:-target}
if [ -n "${CAIRN_JETSON_TARBALL:-}" ]; then
    tarball=$CAIRN_JETSON_TARBALL
else
    step "build the tarball (release/jetson/build.sh)"
    timeout 3600 release/jetson/build.sh
    tarball=$(ls -t "$tdir"/release-jetson/cairn-*-aarch64-jetson.tar.gz | head -n 1)
fi
[ -f "$tarball" ] || fail "no tarball at $tarball"
step "x86 binary (cargo build --release -p cairn --bin cairn)"
timeout 3600 cargo build --release --locked -p cairn --bin cairn
x86=$tdir/release/cairn

mkdir -p "$scratch/pkg"
tar -C "$scratch/pkg" -xzf "$tarball"
pkg=$(echo "$scratch"/pkg/cairn-*-aarch64-jetson)
[ -d "$pkg" ] || fail "the tarball holds no cairn-*-aarch64-jetson/ directory"
for f in cairn cairn-serve.service serve.env install.sh README.md; do
    [ -f "$pkg/$f" ] || fail "the tarball lacks $f"
done
arm=$pkg/cairn
file -b "$arm" 2>/dev/null | grep -q 'ARM aarch64' || aarch64-linux-gnu-readelf -h "$arm" | grep -q AArch64 \
    || fail "$arm is not an aarch64 binary"
echo "tarball $tarball: $(cat "$pkg/BUILD" 2>/dev/null)"

model=${1:-${CAIRN_HOME:-$HOME/.cache/cairn}/models/SmolLM2-135M-Instruct.Q4_1.gguf}
if [ ! -f "$model" ] && [ $# -eq 0 ]; then
    step "pull the default model"
    model=$(timeout 900 "$x86" pull)
fi
[ -f "$model" ] || fail "no model at $model"

# (a) Greedy decoding, same ids on both architectures.
prompt="The three primary colors are"
gen=(generate -m "$model" -p "$prompt" -n 16 --temp 0 --seed 1 --json)
step "(a) x86: cairn ${gen[*]:3}"
timeout 300 "$x86" "${gen[@]}" > "$scratch/x86.json" 2> "$scratch/x86.err" || { cat "$scratch/x86.err" >&2; fail "x86 generate"; }
step "(a) aarch64 under qemu-aarch64: the same"
ta=$(date +%s)
timeout 900 qemu-aarch64 "$arm" "${gen[@]}" > "$scratch/arm.json" 2> "$scratch/arm.err" || { cat "$scratch/arm.err" >&2; fail "aarch64 generate under qemu"; }
echo "aarch64 generate took $(( $(date +%s) - ta ))s under qemu"
python3 - "$scratch/x86.json" "$scratch/arm.json" <<'PY' || fail "(a) the token ids differ"
import json, sys
x, a = (json.load(open(p)) for p in sys.argv[1:3])
for k in ("prompt_ids", "ids"):
    print(f"x86     {k}: {x[k]}")
    print(f"aarch64 {k}: {a[k]}")
print(f"text: {x['text']!r}")
if len(x["ids"]) != 16:
    sys.exit(f"expected 16 generated ids, got {len(x['ids'])}")
if x["prompt_ids"] != a["prompt_ids"] or x["ids"] != a["ids"]:
    n = next((i for i, (p, q) in enumerate(zip(x["ids"], a["ids"])) if p != q), min(len(x["ids"]), len(a["ids"])))
    sys.exit(f"first difference at generated token {n}")
print("ids equal")
PY

# (b) `cairn serve` under qemu, on a fixture Orin Nano sysfs tree (VDD_IN 5 V × 1.2 A).
sysfs=$scratch/sysfs
hw=$sysfs/sys/bus/i2c/drivers/ina3221/1-0040/hwmon/hwmon3
mkdir -p "$hw"
printf 'VDD_IN\n' > "$hw/in1_label"; printf '5000\n' > "$hw/in1_input"; printf '1200\n' > "$hw/curr1_input"
printf 'VDD_CPU_GPU_CV\n' > "$hw/in2_label"; printf '5000\n' > "$hw/in2_input"; printf '400\n' > "$hw/curr2_input"
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
base=http://127.0.0.1:$port
step "(b) aarch64 cairn serve under qemu on $base"
CAIRN_SYSFS_ROOT=$sysfs timeout 900 qemu-aarch64 "$arm" serve -m "$model" --host 127.0.0.1 --port "$port" \
    --parallel 1 --drain 2 > "$scratch/serve.log" 2>&1 &
serve_pid=$!
deadline=$(( $(date +%s) + 300 ))
until curl -fsS --max-time 5 "$base/health" > /dev/null 2>&1; do
    kill -0 "$serve_pid" 2>/dev/null || { cat "$scratch/serve.log" >&2; fail "cairn serve exited before it was ready"; }
    [ "$(date +%s)" -lt "$deadline" ] || { cat "$scratch/serve.log" >&2; fail "cairn serve not ready within 300s"; }
    sleep 1
done
echo "ready after $(( $(date +%s) - t0 ))s since the start of check.sh"
tb=$(date +%s)
curl -fsS --max-time 300 "$base/v1/chat/completions" -H 'Content-Type: application/json' \
    -d '{"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 12, "temperature": 0}' \
    > "$scratch/answer.json" || { cat "$scratch/serve.log" >&2; fail "the chat completion request failed"; }
echo "chat completion took $(( $(date +%s) - tb ))s under qemu"
python3 - "$scratch/answer.json" <<'PY' || fail "(b) the answer is not a chat completion"
import json, sys
a = json.load(open(sys.argv[1]))
print(json.dumps(a))
assert a["object"] == "chat.completion", a.get("object")
c = a["choices"][0]
assert c["message"]["role"] == "assistant" and isinstance(c["message"]["content"], str) and c["message"]["content"].strip(), c
assert c["finish_reason"] in ("stop", "length"), c["finish_reason"]
u = a["usage"]
assert 1 <= u["completion_tokens"] <= 12 and u["prompt_tokens"] > 0, u
print(f"answer: {c['message']['content']!r} ({u['completion_tokens']} tokens, {c['finish_reason']})")
PY
curl -fsS --max-time 30 "$base/metrics" > "$scratch/metrics.txt" || fail "GET /metrics"
grep -E '^cairn_(requests_total\{status="200"\}|generated_tokens_total|energy_joules_total|request_energy_joules_count|power_watts)' "$scratch/metrics.txt"
grep -q '^cairn_power_watts{source="ina3221"} 6\.000$' "$scratch/metrics.txt" || fail "(b) /metrics lacks the board power (6 W) of the INA3221 fixture"
grep -q '^cairn_request_energy_joules_count{source="ina3221",estimate="false"} 1$' "$scratch/metrics.txt" \
    || fail "(b) /metrics lacks the request's energy from ina3221"
kill -TERM "$serve_pid"
for _ in $(seq 30); do kill -0 "$serve_pid" 2>/dev/null || break; sleep 1; done
kill -0 "$serve_pid" 2>/dev/null && fail "cairn serve did not stop within 30s of SIGTERM"
rc=0; wait "$serve_pid" || rc=$?
serve_pid=
[ "$rc" = 0 ] || { cat "$scratch/serve.log" >&2; fail "cairn serve exited with $rc after SIGTERM"; }
echo "serve stopped on SIGTERM (exit 0)"

# (c) install.sh into a scratch root, systemd-analyze verify, uninstall.
root=$scratch/root
step "(c) install.sh --root $root"
timeout 60 sh "$pkg/install.sh" --root "$root"
for f in usr/local/bin/cairn etc/systemd/system/cairn-serve.service etc/cairn/serve.env; do
    [ -f "$root/$f" ] || fail "install.sh did not install /$f"
done
[ -x "$root/usr/local/bin/cairn" ] || fail "the installed binary is not executable"
cmp -s "$arm" "$root/usr/local/bin/cairn" || fail "the installed binary differs from the tarball's"
echo "CAIRN_PORT=9999" >> "$root/etc/cairn/serve.env"
DESTDIR=$root timeout 60 sh "$pkg/install.sh"
grep -qx 'CAIRN_PORT=9999' "$root/etc/cairn/serve.env" || fail "a second install overwrote the edited serve.env"
[ -z "$(find "$root" -name '*.new')" ] || fail "install.sh left a temporary file"
echo "installed (twice; the edited serve.env kept):"
(cd "$root" && find . -type f | sort)

# The scratch root gets this machine's system units (sysinit.target and the rest of
# the default dependencies) beside ours; verify resolves ExecStart under the root.
verify() {
    timeout 120 systemd-analyze verify --man=no --generators=no --root="$root" \
        /etc/systemd/system/cairn-serve.service > "$1" 2>&1
}
step "(c) systemd-analyze verify --root $root /etc/systemd/system/cairn-serve.service"
mkdir -p "$root/usr/lib/systemd"
cp -a /usr/lib/systemd/system "$root/usr/lib/systemd/"
vrc=0
verify "$scratch/verify.txt" || vrc=$?
cat "$scratch/verify.txt"
[ "$vrc" = 0 ] || fail "systemd-analyze verify exited with $vrc"
# verify exits 0 on unknown keys and bad values: any output at all fails.
[ ! -s "$scratch/verify.txt" ] || fail "systemd-analyze verify warned about the unit"
echo "verify: exit 0, no output"
# Negative controls: a missing binary and a bad setting must be reported.
rm "$root/usr/local/bin/cairn"
verify "$scratch/verify-neg.txt" || true
grep -q 'is not executable' "$scratch/verify-neg.txt" || fail "verify did not notice a missing /usr/local/bin/cairn"
cp "$arm" "$root/usr/local/bin/cairn"
cp "$root/etc/systemd/system/cairn-serve.service" "$scratch/unit.orig"
sed -i 's/^MemoryMax=.*/MemoryMax=lots/' "$root/etc/systemd/system/cairn-serve.service"
verify "$scratch/verify-neg2.txt" || true
grep -q "Invalid memory limit" "$scratch/verify-neg2.txt" || fail "verify did not notice MemoryMax=lots"
cp "$scratch/unit.orig" "$root/etc/systemd/system/cairn-serve.service"
echo "verify negative controls: $(sed 's|.*/||' "$scratch/verify-neg.txt" | head -n 1) / $(sed 's|.*/||' "$scratch/verify-neg2.txt" | head -n 1)"
rm -rf "$root/usr/lib/systemd"

step "(c) install.sh --uninstall, then --uninstall --purge"
timeout 60 sh "$pkg/install.sh" --root "$root" --uninstall
[ ! -e "$root/usr/local/bin/cairn" ] && [ ! -e "$root/etc/systemd/system/cairn-serve.service" ] \
    || fail "--uninstall left the binary or the unit"
[ -f "$root/etc/cairn/serve.env" ] || fail "--uninstall removed serve.env (only --purge should)"
timeout 60 sh "$pkg/install.sh" --root "$root" --uninstall --purge
[ ! -e "$root/etc/cairn" ] || fail "--purge left /etc/cairn"
step "all Jetson release checks passed"
