"""Live memory budget of a BitStack model under `cairn serve --parallel 4 --memory MID`
(run by runtime/tests/serve.rs, CAIRN_EXPECT = {"min": bytes, "mid": bytes}).

While five streams run (four in slots, one waiting), POST /v1/cairn/memory lowers the
budget, raises it, and tries one under the minimum: the block count must move the right
way, the refusal must be a 4xx that changes nothing, the endpoint must need the key, and
every stream must finish cleanly.
"""

import threading
import time

from common import API_KEY, EXPECT, SseStream, client, error_of, metrics, model_id, note, post, print_summary, wait_until

C = client()
MODEL = model_id()
MIN, MID = EXPECT["min"], EXPECT["mid"]
LOW = MIN + 2_000_000
HIGH = MIN + 200_000_000
STREAMS = 5
# A step of four BitStack rows takes about a second here (see the throughput check).
TOKENS = 24


def memory(b, key=None):
    return post("/v1/cairn/memory", {"bytes": b}, key=key)


def plan(b):
    r = memory(b)
    assert r.status == 200, f"budget {b}: {r}"
    v = r.json()
    for k in ("budget", "blocks", "total_blocks", "stack_bytes", "plan"):
        assert k in v, f"memory reply lacks {k}: {v}"
    assert v["budget"] == b and 0 < v["blocks"] <= v["total_blocks"], v
    return v


def main():
    t0 = time.monotonic()
    # Without the key (and with a wrong one) the endpoint refuses, changing nothing.
    for key in ("", API_KEY + "x"):
        r = memory(LOW, key=key)
        assert r.status == 401, f"memory with key {key!r}: {r}"
        error_of(r)
    m = metrics()
    assert m["cairn_memory_budget_bytes"] == MID, f"budget at start {m['cairn_memory_budget_bytes']} != --memory {MID}"
    start = plan(MID)
    total = start["total_blocks"]
    assert start["blocks"] < total, f"the mid budget already keeps every block: {start}"
    note("start", f"budget {MID} B: {start['blocks']} of {total} blocks")

    results, errors = [None] * STREAMS, []
    progress = [0] * STREAMS

    def run(i):
        try:
            s = SseStream("/v1/chat/completions", {
                "model": MODEL, "max_tokens": TOKENS, "temperature": 0.5, "seed": i,
                "messages": [{"role": "user", "content": f"Tell a long story about island number {i}."}],
                "stream_options": {"include_usage": True},
            }, timeout=120)
            assert s.status == 200, f"stream {i}: HTTP {s.status}"
            text, finish, usage, done = "", None, None, False
            for ev in s.events():
                if ev == "[DONE]":
                    done = True
                    break
                assert "error" not in ev, f"stream {i} got an error event: {ev}"
                if ev.get("usage"):
                    usage = ev["usage"]
                for ch in ev["choices"]:
                    text += ch["delta"].get("content") or ""
                    finish = ch.get("finish_reason") or finish
                    progress[i] += 1
            s.close()
            results[i] = (text, finish, usage, done)
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(f"stream {i}: {e!r}")

    ts = [threading.Thread(target=run, args=(i,)) for i in range(STREAMS)]
    for t in ts:
        t.start()
    wait_until(lambda: metrics()["cairn_slots_busy"] == 4, 10, "4 busy slots")
    wait_until(lambda: sum(1 for p in progress if p > 3) >= 4, 20, "4 streams producing")

    low = plan(LOW)
    assert low["blocks"] < start["blocks"], f"a smaller budget must keep fewer blocks: {start['blocks']} -> {low}"
    busy = metrics()["cairn_slots_busy"]
    p1 = sum(progress)
    wait_until(lambda: sum(progress) > p1, 20, "the streams to progress after the budget went down")
    # Under the minimum: a 4xx naming the minimum, nothing changed.
    r = memory(MIN - 5_000_000)
    assert 400 <= r.status < 500, f"a budget under the minimum must be refused with a 4xx: {r}"
    e = error_of(r)
    assert e["param"] == "bytes" and "minimum" in e["message"], e
    assert metrics()["cairn_memory_budget_bytes"] == LOW, "a refused budget changed the budget"
    p2 = sum(progress)
    wait_until(lambda: sum(progress) > p2, 20, "the streams to progress after a refused budget")
    high = plan(HIGH)
    assert high["blocks"] > low["blocks"] and high["blocks"] > start["blocks"], f"a larger budget: {low} -> {high}"
    assert high["blocks"] == total, f"a budget far above the stack must keep every block: {high}"
    again = plan(LOW)
    assert again["blocks"] == low["blocks"], f"the same budget twice: {low['blocks']} then {again['blocks']}"
    note("plans", f"mid {start['blocks']} -> low {low['blocks']} -> high {high['blocks']} -> low {again['blocks']} of {total} "
         f"(slots busy {busy:.0f} at the change)")

    for t in ts:
        t.join(180)
    assert not any(t.is_alive() for t in ts), "a stream never finished"
    assert not errors, f"streams failed: {errors}"
    for i, (text, finish, usage, done) in enumerate(results):
        assert done, f"stream {i} ended without [DONE]"
        assert finish in ("stop", "length"), f"stream {i} finish_reason {finish!r}"
        assert usage and usage["completion_tokens"] > 0 and text, f"stream {i}: {usage} {text!r}"
    note("streams", f"{STREAMS} completed: " + ", ".join(f"{r[2]['completion_tokens']} tok/{r[1]}" for r in results))

    m = metrics()
    assert m["cairn_slots_busy"] == 0 and m["cairn_queue_depth"] == 0, m
    # Still serving after everything, at the low budget.
    r = C.chat.completions.create(model=MODEL, max_tokens=8, temperature=0, messages=[{"role": "user", "content": "Hi."}])
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens > 0, r
    # Per-request budget knob ("cairn": {"memory": N}) goes through the same path.
    r = post("/v1/chat/completions", {"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "Hi."}],
                                      "cairn": {"memory": MIN - 5_000_000}})
    assert r.status == 400, f"a per-request budget (cairn.memory) under the minimum must be a 400: {r}"
    assert "minimum" in error_of(r)["message"], r
    assert metrics()["cairn_memory_budget_bytes"] == LOW, "a refused per-request budget changed the budget"
    throughput()
    note("total", f"{time.monotonic() - t0:.1f}s")
    print_summary("cairn serve, live memory")


def timed_stream(i, n, out):
    """Decode speed of one greedy stream: tokens after the first over the time they took."""
    s = SseStream("/v1/chat/completions", {
        "model": MODEL, "max_tokens": n, "temperature": 0,
        "messages": [{"role": "user", "content": f"Describe the harbour of town number {i}."}],
        "stream_options": {"include_usage": True},
    }, timeout=120)
    first = last = None
    usage = None
    for ev in s.events():
        if ev == "[DONE]":
            break
        if ev.get("usage"):
            usage = ev["usage"]
        if ev["choices"] and ev["choices"][0]["delta"].get("content"):
            last = time.monotonic()
            first = first or last
    s.close()
    out[i] = (usage["completion_tokens"], first, last)


def throughput():
    """Four streams decoded together against one alone on a BitStack model: reported,
    not asserted (timings belong to benchmarks; on a shared two-core machine the ratio
    swings with whatever else runs). Row by row they cost four matvecs a step, so the
    aggregate should be about the single stream's."""
    n = 16
    out = {}
    timed_stream(100, n, out)
    toks, first, last = out[100]
    alone = (toks - 1) / (last - first)
    out = {}
    ts = [threading.Thread(target=timed_stream, args=(200 + i, n, out)) for i in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(180)
    assert len(out) == 4, f"streams failed: {out}"
    span = max(v[2] for v in out.values()) - min(v[1] for v in out.values())
    together = sum(v[0] - 1 for v in out.values()) / span
    note(
        "BitStack decode",
        f"one stream {alone:.1f} tok/s; four together {together:.1f} tok/s in aggregate ({together / alone:.2f}x)",
    )


if __name__ == "__main__":
    main()
