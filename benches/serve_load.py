#!/usr/bin/env python3
"""Load generator for OpenAI-compatible chat servers (`cairn serve`, llama-server).

    serve_load.py --base-url http://127.0.0.1:8080/v1 --model NAME --concurrency 4 \
                  --requests 16 --max-tokens 128 [--api-key K] [--json-out FILE]

After one untimed short warm-up request (--warmup), C workers each send streamed chat
completions one after another (temperature 0, prompts taken in a fixed order from
PROMPTS) until R requests are done in total. Per request it measures the time to the
first chunk with content, completion tokens (from the usage chunk; the count of content
chunks when a server sends none) and total time. Prints one
line of JSON, then a human line. Needs the `openai` package (benches/serve_bench.sh
sets up target/serve-venv). A benchmark: never run by CI.
"""
import argparse
import asyncio
import json
import math
import statistics
import sys
import time

import openai

try:  # the HTTP library under openai: httpx2 in openai 3.x, httpx before
    import httpx2 as httpx
except ImportError:
    import httpx

PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a refrigerator works.",
    "What is the capital of France?",
    "List five tips for staying productive when working from home.",
    "Describe the water cycle to a ten-year-old.",
    "Why is the sky blue?",
    "Write a haiku about autumn leaves.",
    "Compare cats and dogs as pets, giving pros and cons for each.",
    "How do I make a simple tomato pasta sauce?",
    "Summarize the plot of Romeo and Juliet in a few sentences.",
    "What are the main differences between a virus and a bacterium?",
    "Give me three ideas for a birthday party for a seven-year-old.",
    "Explain what a black hole is.",
    "Write a polite email asking my landlord to fix a leaking tap.",
    "What is photosynthesis and why does it matter?",
    "Tell me a fun fact about octopuses.",
]


def pct(xs, p):
    """Nearest-rank percentile of a non-empty list."""
    xs = sorted(xs)
    k = max(0, min(len(xs) - 1, math.ceil(p / 100 * len(xs)) - 1))
    return xs[k]


async def one_request(client, args, i, prompt=None, max_tokens=None):
    r = {"prompt": i % len(PROMPTS), "ttft": None, "tokens": 0, "chunks": 0,
         "usage": False, "total": None, "error": None}
    t0 = time.perf_counter()

    async def consume():
        stream = await client.chat.completions.create(
            model=args.model,
            messages=[{"role": "user", "content": prompt or PROMPTS[i % len(PROMPTS)]}],
            stream=True, stream_options={"include_usage": True},
            temperature=0, max_tokens=max_tokens or args.max_tokens)
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta and chunk.choices[0].delta.content:
                if r["ttft"] is None:
                    r["ttft"] = time.perf_counter() - t0
                r["chunks"] += 1
            if chunk.usage is not None and chunk.usage.completion_tokens is not None:
                r["tokens"], r["usage"] = chunk.usage.completion_tokens, True

    try:  # a bound on the whole request, not only on each read
        await asyncio.wait_for(consume(), args.timeout)
        if not r["usage"]:
            r["tokens"] = r["chunks"]
    except Exception as e:  # any failure is a counted error, never a crash of the run
        r["error"] = f"{type(e).__name__}: {e}"[:300]
    r["total"] = time.perf_counter() - t0
    return r


async def run(args):
    # A fresh connection per request: a pooled keep-alive connection that the server
    # closes while idle (llama-server after 5 s) fails the next request that picks it.
    timeout = httpx.Timeout(args.timeout, connect=10.0)
    http = openai.DefaultAsyncHttpxClient(
        limits=httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=0),
        timeout=timeout)
    client = openai.AsyncOpenAI(base_url=args.base_url, api_key=args.api_key,
                                http_client=http, timeout=timeout, max_retries=0)
    for _ in range(args.warmup):  # untimed: first-request costs (page faults, allocations)
        w = await one_request(client, args, 0, prompt="Say hello.", max_tokens=8)
        if w["error"]:
            print(f"warm-up failed: {w['error']}", file=sys.stderr)
    next_i, results = 0, []

    async def worker():
        nonlocal next_i
        while next_i < args.requests:
            i, next_i = next_i, next_i + 1
            results.append(await one_request(client, args, i))

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    wall = time.perf_counter() - t0
    await client.close()
    return results, wall


def summarize(args, results, wall):
    ok = [r for r in results if r["error"] is None]
    ttfts = [r["ttft"] for r in ok if r["ttft"] is not None]
    # Per-stream decode rate: tokens after the first over the time after the first token.
    rates = [(r["tokens"] - 1) / (r["total"] - r["ttft"]) for r in ok
             if r["ttft"] is not None and r["tokens"] > 1 and r["total"] > r["ttft"]]
    errors = [r["error"] for r in results if r["error"] is not None]
    tokens = sum(r["tokens"] for r in ok)
    return {
        "base_url": args.base_url, "model": args.model, "concurrency": args.concurrency,
        "requests": len(results), "max_tokens": args.max_tokens, "wall_s": round(wall, 3),
        "completion_tokens": tokens,
        "agg_tok_s": round(tokens / wall, 2) if wall > 0 else 0.0,
        "ttft_p50_ms": round(pct(ttfts, 50) * 1e3, 1) if ttfts else None,
        "ttft_p95_ms": round(pct(ttfts, 95) * 1e3, 1) if ttfts else None,
        "decode_tok_s_mean": round(statistics.mean(rates), 2) if rates else None,
        "usage_reported": all(r["usage"] for r in ok) if ok else False,
        "client_cpu_s": round(time.process_time(), 3),
        "errors": len(errors), "error_messages": sorted(set(errors))[:5],
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8080/v1")
    ap.add_argument("--model", required=True)
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument("--requests", type=int, default=4, help="total over all workers")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=1, help="untimed short requests sent first")
    ap.add_argument("--api-key", default="none")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    ap.add_argument("--json-out", help="also write the JSON summary (with per-request data) here")
    args = ap.parse_args()

    results, wall = asyncio.run(run(args))
    s = summarize(args, results, wall)
    print(json.dumps(s))
    print(f"C={s['concurrency']} requests={s['requests']} agg={s['agg_tok_s']} tok/s "
          f"ttft p50={s['ttft_p50_ms']} ms p95={s['ttft_p95_ms']} ms "
          f"decode/stream={s['decode_tok_s_mean']} tok/s errors={s['errors']}", file=sys.stderr)
    for m in s["error_messages"]:
        print(f"  error: {m}", file=sys.stderr)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({**s, "per_request": results}, f, indent=1)
    return 1 if s["errors"] == len(results) else 0


if __name__ == "__main__":
    sys.exit(main())
