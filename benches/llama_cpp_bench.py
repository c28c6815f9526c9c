#!/usr/bin/env python3
"""Time llama.cpp (through llama-cpp-python) as llama-bench does: pp = one batch of
random tokens, tg = single-token steps from an empty context; tokenization and
sampling excluded. Prints one JSON object like `cairn bench -o json`."""
import argparse
import json
import random
import resource
import statistics
import sys
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("-p", type=int, default=512)
    ap.add_argument("-n", type=int, default=128)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-r", "--reps", type=int, default=5)
    ap.add_argument("--flash-attn", type=int, default=1)
    ap.add_argument("--ttft-prompt", type=int, default=0,
                    help="instead of pp/tg: time from process start to the first token of a prompt of this many tokens")
    a = ap.parse_args()
    t_start = time.perf_counter()
    import llama_cpp

    t0 = time.perf_counter()
    llm = llama_cpp.Llama(model_path=a.model, n_threads=a.threads, n_threads_batch=a.threads,
                          n_ctx=max(a.p, a.n, a.ttft_prompt) + 16, n_batch=512, n_ubatch=512,
                          flash_attn=bool(a.flash_attn), verbose=False)
    load = time.perf_counter() - t0
    vocab = llm.n_vocab()
    rng = random.Random(0xBE7C)
    if a.ttft_prompt:
        ids = [rng.randrange(vocab) for _ in range(a.ttft_prompt)]
        llm.eval(ids)
        _first = int(max(range(vocab), key=lambda i: llm.scores[llm.n_tokens - 1][i]))
        print(json.dumps({"engine": "llama.cpp", "ttft_seconds_in_process": time.perf_counter() - t_start,
                          "load_seconds": load}))
        return
    pp, tg = [], []
    for rep in range(a.reps + 1):
        if a.p:
            ids = [rng.randrange(vocab) for _ in range(a.p)]
            llm.reset()
            llm._ctx.kv_cache_clear() if hasattr(llm._ctx, "kv_cache_clear") else None
            t = time.perf_counter()
            llm.eval(ids)
            if rep:
                pp.append(a.p / (time.perf_counter() - t))
        if a.n:
            ids = [rng.randrange(vocab) for _ in range(a.n)]
            llm.reset()
            llm._ctx.kv_cache_clear() if hasattr(llm._ctx, "kv_cache_clear") else None
            t = time.perf_counter()
            for tok in ids:
                llm.eval([tok])
            if rep:
                tg.append(a.n / (time.perf_counter() - t))

    def stat(xs):
        return {"mean": statistics.mean(xs), "stddev": statistics.stdev(xs) if len(xs) > 1 else 0.0} if xs else None

    print(json.dumps({
        "engine": "llama.cpp", "version": llama_cpp.__version__, "threads": a.threads,
        "load_seconds": load, "pp_tokens": a.p, "pp_tps": stat(pp), "tg_tokens": a.n, "tg_tps": stat(tg),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }))


if __name__ == "__main__":
    sys.exit(main())
