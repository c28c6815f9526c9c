#!/usr/bin/env python3
"""Cairn against llama.cpp (llama-cpp-python) on the same GGUF, same threads, same
workload: pp/tg speed, peak RSS, load time, decode bandwidth, time to first token.

Run through benches/side_by_side.sh, which sets up the llama.cpp virtual environment
and builds Cairn; this file is the orchestration (standard library only, system
python3). Every measurement is printed as it comes; a markdown summary comes last.
"""
import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

CLK_TCK = os.sysconf("SC_CLK_TCK")
NCPU = os.cpu_count() or 1

# A plain English sentence; its word prefixes are tried until one is exactly
# --ttft-tokens tokens long for the model's tokenizer.
PASSAGE = ("The quick brown fox jumps over the lazy dog near the old river bank today again "
           "while the farmer watches from the hill and the children run home for supper before "
           "the rain begins to fall on the quiet village")


def log(*a):
    print(*a, flush=True)


def cpu_busy_seconds():
    """Busy CPU time of the whole machine so far (all cores), from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return None
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return (sum(v[:8]) - idle) / CLK_TCK


def wait_quiet(limit, share):
    """Wait (up to `limit` seconds) until other processes use at most `share` of the
    CPU over a one-second window; returns the share last seen."""
    deadline = time.monotonic() + limit
    said = False
    while True:
        b0 = cpu_busy_seconds()
        time.sleep(1.0)
        b1 = cpu_busy_seconds()
        if b0 is None:
            return 0.0
        busy = (b1 - b0) / NCPU
        if busy <= share or time.monotonic() > deadline:
            if said:
                log(f"    (machine quiet enough: {busy:.0%} busy)" if busy <= share else
                    f"    (gave up waiting: {busy:.0%} busy)")
            return busy
        if not said:
            log(f"    (other processes use {busy:.0%} of the CPU; waiting up to {limit:.0f} s for them)")
            said = True


class Run:
    """One child process: its stdout, exit status, wall time, time until its stdout
    grew past `skip` bytes, peak RSS (wait4) and the CPU time other processes took
    meanwhile (machine busy time − this child's CPU time)."""

    def __init__(self, cmd, skip=None, env=None):
        self.cmd = cmd
        env = dict(os.environ if env is None else env)
        busy0 = cpu_busy_seconds()
        with tempfile.TemporaryFile() as err:
            t0 = time.monotonic()
            env["CAIRN_SPAWN_T0"] = repr(t0)
            p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=env)
            out = bytearray()
            self.first_output = None
            fd = p.stdout.fileno()
            while True:
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                out += chunk
                if skip is not None and self.first_output is None and len(out) > skip:
                    self.first_output = time.monotonic() - t0
            _, status, ru = os.wait4(p.pid, 0)
            self.wall = time.monotonic() - t0
            p.returncode = os.waitstatus_to_exitcode(status)
            p.stdout.close()
            err.seek(0)
            self.stderr = err.read().decode(errors="replace")
        busy1 = cpu_busy_seconds()
        self.rc = p.returncode
        self.stdout = out.decode(errors="replace")
        self.maxrss = ru.ru_maxrss * 1024
        self.cpu = ru.ru_utime + ru.ru_stime
        self.foreign = None if busy0 is None else max(0.0, busy1 - busy0 - self.cpu) / (self.wall * NCPU)

    def check(self):
        if self.rc != 0:
            sys.exit(f"command failed ({self.rc}): {shlex.join(self.cmd)}\n{self.stderr[-4000:]}")
        return self

    def json(self):
        self.check()
        lines = [l for l in self.stdout.splitlines() if l.strip().startswith("{")]
        if not lines:
            sys.exit(f"no JSON from {shlex.join(self.cmd)}:\n{self.stdout[-2000:]}\n{self.stderr[-2000:]}")
        return json.loads(lines[-1])


def rel_sd(s):
    return s["stddev"] / s["mean"] if s and s["mean"] else 0.0


def fmt_rate(s):
    return f"{s['mean']:.2f} ± {s['stddev']:.2f}" if s else "-"


def mib(b):
    return f"{b / 2**20:.1f} MiB" if b else "-"


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", default=None, help="registry name or .gguf path (default: cairn pull's default)")
    ap.add_argument("-t", "--threads", default="1 2", help='thread counts, e.g. "1 2"')
    ap.add_argument("-r", "--reps", type=int, default=3, help="repetitions per run (after one warm-up)")
    ap.add_argument("-p", type=int, default=512, help="prompt tokens (one batch)")
    ap.add_argument("-n", type=int, default=128, help="generated tokens")
    ap.add_argument("--rounds", type=int, default=2, help="A B rounds per thread count")
    ap.add_argument("--ttft-runs", type=int, default=5, help="time-to-first-token runs per engine (0 skips)")
    ap.add_argument("--ttft-tokens", type=int, default=16)
    ap.add_argument("--ttft-threads", type=int, default=0, help="threads for the TTFT runs (default: all cores)")
    ap.add_argument("--ttft-ctx", type=int, default=512, help="context length of both engines in the TTFT runs")
    ap.add_argument("--retries", type=int, default=2,
                    help="rerun a measurement while other processes took > --busy of the CPU during it")
    ap.add_argument("--busy", type=float, default=0.05, help="foreign CPU share that marks a run as disturbed")
    ap.add_argument("--wait-quiet", type=float, default=120,
                    help="before each measurement, wait up to this many seconds for other processes to go quiet")
    ap.add_argument("--cairn", default="target/release/cairn")
    ap.add_argument("--python", default="target/peer-venv/bin/python", help="python with llama_cpp installed")
    ap.add_argument("--peer-script", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "llama_cpp_bench.py"))
    ap.add_argument("--json-out", default=None, help="also write every raw result here")
    a = ap.parse_args()
    threads = [int(t) for t in a.threads.replace(",", " ").split()]
    cairn, py = a.cairn, a.python
    raw = {"args": vars(a), "runs": [], "ttft": []}

    # ------------------------------------------------------------------ setup
    if a.model and os.path.isfile(a.model):
        model = a.model
    else:
        pull = Run([cairn, "pull"] + ([a.model] if a.model else [])).check()
        model = pull.stdout.strip().splitlines()[-1].strip()
    with open(model, "rb") as f:  # into the page cache
        while f.read(1 << 24):
            pass
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    git = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True).stdout.strip()
    log(f"model     {model} ({os.path.getsize(model) / 1e6:.1f} MB)")
    log(f"machine   {cpu}, {NCPU} cores, {platform.system()} {platform.release()}")
    log(f"cairn     {Run([cairn, '--version']).check().stdout.strip()} ({git or 'no git'})")
    peer = Run([py, "-c", "import llama_cpp; print(llama_cpp.__version__); "
                          "print(llama_cpp.llama_print_system_info().decode().strip())"]).check()
    pv = peer.stdout.splitlines()
    log(f"llama.cpp llama-cpp-python {pv[0]}; {pv[1] if len(pv) > 1 else ''}")
    log(f"workload  pp{a.p} tg{a.n}, {a.reps} reps after 1 warm-up, {a.rounds} rounds A B, threads {threads}")
    log(f"load avg  {open('/proc/loadavg').read().split()[:3]}")

    def measured(kind, cmd, skip=None):
        """Run, rerunning while other processes disturbed it."""
        for attempt in range(a.retries + 1):
            if a.wait_quiet > 0:
                wait_quiet(a.wait_quiet, a.busy)
            r = Run(cmd, skip=skip)
            r.check()
            if r.foreign is None or r.foreign <= a.busy or attempt == a.retries:
                return r
            log(f"    ({kind}: other processes took {r.foreign:.0%} of the CPU meanwhile; rerunning)")
        return r

    # Streaming-read bandwidth per thread count, measured by cairn bench alone.
    read_gbps = {}
    for t in threads:
        r = measured("read bandwidth", [cairn, "bench", "-m", model, "-t", str(t), "-p", "0", "-n", "0", "-r", "0",
                                        "-o", "json"])
        read_gbps[t] = r.json()["read_gbps"]
        log(f"read bandwidth, {t} thread(s): {read_gbps[t]:.1f} GB/s")

    # Resident memory of the interpreter with llama_cpp imported, nothing loaded.
    base = sorted(Run([py, "-c", "import llama_cpp"]).check().maxrss for _ in range(3))[1]
    log(f"python + import llama_cpp, peak RSS: {mib(base)}")

    # ------------------------------------------------------------------ pp / tg
    res = {t: {"cairn": [], "llama.cpp": []} for t in threads}
    wbpt = None
    for t in threads:
        for rnd in range(1, a.rounds + 1):
            for engine in ("cairn", "llama.cpp"):
                if engine == "cairn":
                    cmd = [cairn, "bench", "-m", model, "-t", str(t), "-p", str(a.p), "-n", str(a.n), "-r", str(a.reps),
                           "-o", "json"]
                else:
                    cmd = [py, a.peer_script, "-m", model, "-t", str(t), "-p", str(a.p), "-n", str(a.n), "-r", str(a.reps)]
                r = measured(engine, cmd)
                j = r.json()
                j["foreign_cpu"] = r.foreign
                j["wall_seconds"] = r.wall
                if engine == "cairn":
                    wbpt = j["weight_bytes_per_token"]
                    read_gbps[t] = max(read_gbps[t], j["read_gbps"])
                res[t][engine].append(j)
                raw["runs"].append(j)
                noisy = [k for k in ("pp_tps", "tg_tps") if rel_sd(j.get(k)) > 0.10]
                log(f"t={t} round {rnd} {engine:9s}  pp{a.p} {fmt_rate(j.get('pp_tps')):>18s}  "
                    f"tg{a.n} {fmt_rate(j.get('tg_tps')):>16s}  load {j['load_seconds']:.3f} s  "
                    f"peak RSS {mib(j.get('peak_rss_bytes'))}  others' CPU {r.foreign or 0:.0%}"
                    + (f"  [stddev > 10%: {', '.join(noisy)}]" if noisy else ""))

    # ------------------------------------------------------------------ TTFT
    ttft = {"cairn": [], "llama.cpp": []}
    prompt = None
    if a.ttft_runs > 0:
        words = PASSAGE.split()
        for k in range(1, len(words) + 1):
            text = " ".join(words[:k])
            n = len(Run([cairn, "tokenize", "-m", model, "--json", text]).json()["ids"])
            if n == a.ttft_tokens:
                prompt = text
                break
            if n > a.ttft_tokens:
                break
        if prompt is None:
            log(f"no prefix of the passage is exactly {a.ttft_tokens} tokens; TTFT skipped")
        else:
            tt = a.ttft_threads or NCPU
            log(f"\nTTFT prompt ({a.ttft_tokens} tokens): {prompt!r}; {tt} threads, context {a.ttft_ctx}")
            ccmd = [cairn, "generate", "-m", model, "-p", prompt, "-n", "1", "--temp", "0", "-t", str(tt),
                    "-c", str(a.ttft_ctx)]
            lcmd = [py, a.peer_script, "-m", model, "-t", str(tt), "--ctx", str(a.ttft_ctx),
                    "--ttft-prompt", str(a.ttft_tokens), "--ttft-text", prompt]
            # `cairn generate` echoes the prompt, then streams the tokens.
            cskip = len(prompt.encode())
            Run(ccmd).check()  # one unmeasured run each
            Run(lcmd).check()
            for i in range(a.ttft_runs):
                rc = measured("cairn ttft", ccmd, skip=cskip)
                rl = measured("llama.cpp ttft", lcmd, skip=0)
                jl = rl.json()
                if jl["prompt_tokens"] != a.ttft_tokens:
                    log(f"llama.cpp tokenized the prompt to {jl['prompt_tokens']} tokens")
                ttft["cairn"].append({"first_output": rc.first_output, "wall": rc.wall, "foreign_cpu": rc.foreign,
                                      "text": rc.stdout[cskip:].strip()})
                ttft["llama.cpp"].append({"first_output": rl.first_output, "wall": rl.wall, "foreign_cpu": rl.foreign,
                                          "in_process": jl["ttft_seconds_in_process"],
                                          "since_spawn": jl.get("ttft_seconds_since_spawn"),
                                          "import": jl["import_seconds"], "load": jl["load_seconds"],
                                          "text": jl["first_piece"]})
                log(f"ttft run {i + 1}: cairn first token on stdout {rc.first_output * 1e3:.1f} ms, exit "
                    f"{rc.wall * 1e3:.1f} ms, token {rc.stdout[cskip:].strip()!r} | llama.cpp first token "
                    f"{jl.get('ttft_seconds_since_spawn', float('nan')) * 1e3:.1f} ms since spawn "
                    f"({jl['ttft_seconds_in_process'] * 1e3:.1f} ms after the script's first line; import "
                    f"{jl['import_seconds'] * 1e3:.0f} ms, load {jl['load_seconds'] * 1e3:.0f} ms), on stdout "
                    f"{rl.first_output * 1e3:.1f} ms, exit {rl.wall * 1e3:.1f} ms, token {jl['first_piece']!r}")
            raw["ttft"] = ttft
    log(f"load avg  {open('/proc/loadavg').read().split()[:3]}")

    # ------------------------------------------------------------------ summary
    def agg(runs, key):
        xs = [r[key]["mean"] for r in runs if r.get(key)]
        return (statistics.mean(xs), min(xs), max(xs)) if xs else None

    def cell(v):
        return f"{v[0]:.2f} ({v[1]:.2f}–{v[2]:.2f})" if v else "-"

    out = []
    out.append(f"\n### Cairn vs llama.cpp: {os.path.basename(model)}, pp{a.p} / tg{a.n}\n")
    out.append(f"{cpu}, {NCPU} cores; mean over {a.rounds} rounds of each run's mean of {a.reps} reps "
               f"(min–max of the run means in brackets). Decode bandwidth = {wbpt / 1e6:.1f} MB of weights per "
               f"token × tg t/s ÷ the streaming-read bandwidth at the same thread count. llama.cpp's RSS includes "
               f"the Python interpreter: `python -c 'import llama_cpp'` alone peaks at {mib(base)}.\n")
    out.append(f"| threads | engine | pp{a.p} t/s | tg{a.n} t/s | peak RSS | load s | read GB/s | decode BW |")
    out.append("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for t in threads:
        rows = {}
        for engine in ("cairn", "llama.cpp"):
            runs = res[t][engine]
            pp, tg = agg(runs, "pp_tps"), agg(runs, "tg_tps")
            rss = max(r.get("peak_rss_bytes") or 0 for r in runs)
            load = statistics.mean(r["load_seconds"] for r in runs)
            bw = f"{wbpt * tg[0] / 1e9 / read_gbps[t]:.0%}" if tg and wbpt else "-"
            rss_s = mib(rss) if engine == "cairn" else f"{mib(rss)} ({mib(rss - base)} w/o python)"
            name = "Cairn" if engine == "cairn" else "llama.cpp"
            out.append(f"| {t} | {name} | {cell(pp)} | {cell(tg)} | {rss_s} | {load:.3f} | {read_gbps[t]:.1f} | {bw} |")
            rows[engine] = (pp, tg)
        ratio = lambda i: (f"**{rows['cairn'][i][0] / rows['llama.cpp'][i][0]:.2f}×**"  # noqa: E731
                           if rows["cairn"][i] and rows["llama.cpp"][i] else "-")
        out.append(f"| {t} | Cairn / llama.cpp | {ratio(0)} | {ratio(1)} | | | | |")
    disturbed = [r for r in raw["runs"] if (r.get("foreign_cpu") or 0) > a.busy]
    noisy = [r for r in raw["runs"] if rel_sd(r.get("pp_tps")) > 0.10 or rel_sd(r.get("tg_tps")) > 0.10]
    out.append("")
    out.append(f"Runs with a within-run stddev > 10%: {len(noisy)} of {len(raw['runs'])}; runs during which other "
               f"processes took > {a.busy:.0%} of the CPU (after {a.retries} retries): {len(disturbed)}.")
    if prompt is not None and ttft["cairn"]:
        c, l = ttft["cairn"], ttft["llama.cpp"]

        def ms(xs):
            xs = [x for x in xs if x is not None]
            return f"{median(xs) * 1e3:.1f} ({min(xs) * 1e3:.1f}–{max(xs) * 1e3:.1f})" if xs else "-"

        out.append(f"\n### Time to first token: {a.ttft_tokens}-token prompt, model in the page cache, "
                   f"{a.ttft_threads or NCPU} threads, context {a.ttft_ctx}\n")
        out.append(f"Median (min–max) of {len(c)} alternating runs, ms from spawning the process. Cairn: "
                   f"`cairn generate -n 1 --temp 0`; llama.cpp: `llama_cpp_bench.py --ttft-prompt` (import, load, "
                   f"tokenize, one batch, argmax). \"on stdout\" is when the parent read the first token's bytes.\n")
        out.append("| engine | first token (in process) | first token on stdout | process exit |")
        out.append("| --- | ---: | ---: | ---: |")
        out.append(f"| Cairn | - | {ms([x['first_output'] for x in c])} | {ms([x['wall'] for x in c])} |")
        out.append(f"| llama.cpp | {ms([x['since_spawn'] for x in l])} | {ms([x['first_output'] for x in l])} | "
                   f"{ms([x['wall'] for x in l])} |")
        out.append(f"\nllama.cpp's in-process figure, from the script's first line instead of the spawn: "
                   f"{ms([x['in_process'] for x in l])} ms, of which `import llama_cpp` "
                   f"{ms([x['import'] for x in l])} ms and `Llama(...)` {ms([x['load'] for x in l])} ms.")
    log("\n".join(out))
    if a.json_out:
        raw["summary_markdown"] = "\n".join(out)
        with open(a.json_out, "w") as f:
            json.dump(raw, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
