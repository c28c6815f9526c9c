#!/usr/bin/env python3
"""Time llama.cpp (through llama-cpp-python) as llama-bench does: pp = one batch of
random tokens, tg = single-token steps from an empty context; tokenization and
sampling excluded; one warm-up of each, then -r repetitions. Prints one JSON object
with the fields of `cairn bench -o json` that apply (pp_tps/tg_tps {mean, stddev},
load_seconds, peak_rss_bytes, threads).

With --ttft-prompt N (and optionally --ttft-text TEXT of exactly N tokens), it instead
times the path to the first token of an N-token prompt: import, load, tokenize,
one batched pass, greedy pick; prints one JSON object as soon as the token is known:
  ttft_seconds_in_process   from this script's first statement (interpreter start-up
                            before it is not included)
  ttft_seconds_since_spawn  from the parent's spawn, when the parent put its
                            time.monotonic() in $CAIRN_SPAWN_T0 (CLOCK_MONOTONIC is
                            system-wide, so the two clocks agree)
"""
import time

T_SCRIPT = time.monotonic()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("-p", type=int, default=512)
    ap.add_argument("-n", type=int, default=128)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-r", "--reps", type=int, default=5)
    ap.add_argument("--flash-attn", type=int, default=1)
    ap.add_argument("--ctx", type=int, default=0, help="context length (default: what the test needs + 16)")
    ap.add_argument("--ttft-prompt", type=int, default=0,
                    help="instead of pp/tg: time from process start to the first token of a prompt of this many tokens")
    ap.add_argument("--ttft-text", default=None,
                    help="the prompt text for --ttft-prompt (tokenized in the timed path; must give that many "
                         "tokens); default: random token ids")
    a = ap.parse_args()
    t_import = time.monotonic()
    import llama_cpp

    imported = time.monotonic() - t_import
    n_ctx = a.ctx or (max(a.ttft_prompt, 16) if a.ttft_prompt else max(a.p, a.n)) + 16
    t0 = time.monotonic()
    llm = llama_cpp.Llama(model_path=a.model, n_threads=a.threads, n_threads_batch=a.threads,
                          n_ctx=n_ctx, n_batch=512, n_ubatch=512,
                          flash_attn=bool(a.flash_attn), verbose=False)
    load = time.monotonic() - t0
    vocab = llm.n_vocab()
    rng = random.Random(0xBE7C)
    if a.ttft_prompt or a.ttft_text is not None:
        if a.ttft_text is not None:
            # BOS only where the model asks for it (add_bos=True defers to its metadata),
            # special tokens parsed: as `cairn tokenize` does.
            ids = llm.tokenize(a.ttft_text.encode(), add_bos=True, special=True)
        else:
            ids = [rng.randrange(vocab) for _ in range(a.ttft_prompt)]
        llm.eval(ids)
        # Without logits_all, Llama.eval no longer copies logits into llm.scores: read
        # the last position's row from the context.
        import numpy as np

        logits = np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(vocab,))
        first = int(logits.argmax())
        t_first = time.monotonic()
        out = {
            "engine": "llama.cpp", "version": llama_cpp.__version__, "threads": a.threads, "n_ctx": n_ctx,
            "prompt_tokens": len(ids), "first_token": first,
            "first_piece": llm.detokenize([first]).decode("utf-8", "replace"),
            "ttft_seconds_in_process": t_first - T_SCRIPT,
            "import_seconds": imported, "load_seconds": load,
        }
        spawn = os.environ.get("CAIRN_SPAWN_T0")
        if spawn:
            out["ttft_seconds_since_spawn"] = t_first - float(spawn)
        print(json.dumps(out), flush=True)
        if a.ttft_prompt and len(ids) != a.ttft_prompt:
            print(f"prompt is {len(ids)} tokens, not {a.ttft_prompt}", file=sys.stderr)
            return 1
        return 0
    pp, tg = [], []
    for rep in range(a.reps + 1):
        if a.p:
            ids = [rng.randrange(vocab) for _ in range(a.p)]
            llm.reset()  # eval() drops the KV cells past n_tokens, so the context starts empty
            t = time.perf_counter()
            llm.eval(ids)
            if rep:
                pp.append(a.p / (time.perf_counter() - t))
        if a.n:
            ids = [rng.randrange(vocab) for _ in range(a.n)]
            llm.reset()
            t = time.perf_counter()
            for tok in ids:
                llm.eval([tok])
            if rep:
                tg.append(a.n / (time.perf_counter() - t))

    def stat(xs):
        return {"mean": statistics.mean(xs), "stddev": statistics.stdev(xs) if len(xs) > 1 else 0.0} if xs else None

    print(json.dumps({
        "engine": "llama.cpp", "version": llama_cpp.__version__, "threads": a.threads,
        "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip(),
        "load_seconds": load, "import_seconds": imported, "n_ctx": n_ctx,
        "pp_tokens": a.p, "pp_tps": stat(pp), "pp_runs": pp, "tg_tokens": a.n, "tg_tps": stat(tg), "tg_runs": tg,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
