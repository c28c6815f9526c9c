"""The bounded queue of `cairn serve --parallel 1 --queue 1` (run by runtime/tests/serve.rs).

One long stream holds the only slot, a second request waits in the queue, and a third
must get 503 with Retry-After at once (never wait, never be dropped silently); once the
slot frees, the waiting one runs to its end and the server accepts again.
"""

import threading
import time

import openai

from common import SseStream, client, error_of, metrics, model_id, note, post, print_summary, wait_until

C = client()
MODEL = model_id()


def main():
    t0 = time.monotonic()
    # The long one, in the slot once a token has come.
    a = SseStream("/v1/chat/completions", {
        "model": MODEL, "max_tokens": 300, "temperature": 0,
        "messages": [{"role": "user", "content": "Write a long story about a lighthouse."}],
    })
    assert a.status == 200, a.status
    ea = a.events()
    got = 0
    for ev in ea:
        if ev != "[DONE]" and ev["choices"] and ev["choices"][0]["delta"].get("content"):
            got += 1
            if got >= 2:
                break
    assert got >= 2, "the long stream produced no tokens"
    assert metrics()["cairn_slots_busy"] == 1, "the slot is not busy"

    # The waiting one (non-streamed, on a thread).
    waiting = {}

    def b():
        try:
            waiting["r"] = client(timeout=120).chat.completions.create(
                model=MODEL, max_tokens=8, temperature=0, messages=[{"role": "user", "content": "Say hello."}]
            )
        except Exception as e:  # noqa: BLE001 (checked below)
            waiting["e"] = e

    tb = threading.Thread(target=b)
    tb.start()
    wait_until(lambda: metrics()["cairn_queue_depth"] == 1, 5, "the second request to wait in the queue")
    n503 = metrics().get('cairn_requests_total{status="503"}', 0)

    # The third: 503 at once, with Retry-After, through the client and raw.
    t = time.monotonic()
    try:
        C.chat.completions.create(model=MODEL, max_tokens=4, messages=[{"role": "user", "content": "Hi."}])
        raise AssertionError("a third request was accepted with the slot busy and the queue full")
    except openai.APIStatusError as e:
        took = time.monotonic() - t
        assert e.status_code == 503, f"queue full must be 503, got {e.status_code}: {e}"
        ra = e.response.headers.get("retry-after")
        assert ra is not None and ra.strip().isdigit() and int(ra) >= 1, f"503 without a usable Retry-After: {ra!r}"
        v = e.response.json()
        assert set(v) == {"error"} and set(v["error"]) == {"message", "type", "param", "code"}, v
        assert v["error"]["code"] == "queue_full", v
        assert took < 2, f"the 503 took {took:.2f}s: it must not wait for a slot"
    r = post("/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 4})
    assert r.status == 503 and "retry-after" in r.headers, f"raw: {r} {r.headers}"
    error_of(r)
    # A stream is refused the same way (before any event).
    s = SseStream("/v1/chat/completions", {"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "x"}]})
    assert s.status == 503, f"a streamed request with the queue full: {s.status}"
    s.close()
    m = metrics()
    assert m['cairn_requests_total{status="503"}'] >= n503 + 3, m
    assert m["cairn_queue_depth"] == 1, f"refused requests must not stay queued: {m['cairn_queue_depth']}"
    note("queue full", f"503 in {took * 1000:.0f} ms, Retry-After {ra}, code queue_full (client, raw, stream)")

    # Free the slot: the waiting request runs to its end.
    a.close()
    tb.join(60)
    assert not tb.is_alive(), "the waiting request never finished"
    assert "e" not in waiting, f"the waiting request failed: {waiting.get('e')!r}"
    r = waiting["r"]
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens > 0, r
    # The gauges change before the loop answers: no waiting for them.
    m = metrics()
    assert m["cairn_slots_busy"] == 0 and m["cairn_queue_depth"] == 0, f"gauges right after the last answer: {m}"
    # And the server accepts again.
    r = C.chat.completions.create(model=MODEL, max_tokens=4, temperature=0, messages=[{"role": "user", "content": "Hi."}])
    assert r.choices[0].finish_reason in ("stop", "length"), r
    m = metrics()
    assert m["cairn_queue_depth"] == 0 and m["cairn_slots_busy"] == 0, m

    # A waiting client that leaves gives its place back (its stream is idle, so the server
    # only notices when it next writes: the keep-alive, at most ~10 s).
    a = SseStream("/v1/chat/completions", {
        "model": MODEL, "max_tokens": 300, "temperature": 0,
        "messages": [{"role": "user", "content": "Write a long story about a lighthouse."}],
    })
    ea = a.events()
    next(ea)
    next(ea)
    b = SseStream("/v1/chat/completions", {"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": "x"}]})
    wait_until(lambda: metrics()["cairn_queue_depth"] == 1, 5, "the stream to wait")
    c0 = metrics()["cairn_requests_cancelled_total"]
    t = time.monotonic()
    b.close()
    wait_until(lambda: metrics()["cairn_queue_depth"] == 0, 15, "the departed waiting client to leave the queue")
    left = time.monotonic() - t
    a.close()
    wait_until(lambda: metrics()["cairn_slots_busy"] == 0, 5, "the slot to free")
    note("waiting client left", f"queue freed {left:.2f}s later; cancelled {c0:.0f} -> {metrics()['cairn_requests_cancelled_total']:.0f}")
    # --timeout 3: a request that would run longer ends with finish_reason "length".
    t = time.monotonic()
    r = client(timeout=60).completions.create(
        model=MODEL, prompt="1, 2, 3, 4, 5, 6, 7, 8,", max_tokens=1000, temperature=0
    )
    took = time.monotonic() - t
    assert r.choices[0].finish_reason == "length", r.choices[0]
    assert 2.5 <= took < 8 and r.usage.completion_tokens < 1000, f"--timeout 3: {took:.1f}s, {r.usage}"
    # The slot the departed clients used was really free (this one got it), and is again.
    m = metrics()
    assert m["cairn_slots_busy"] == 0 and m["cairn_queue_depth"] == 0, f"gauges after the last request: {m}"
    note("--timeout 3", f"a 1000-token request ended after {took:.1f}s with {r.usage.completion_tokens} tokens, finish length")

    # Energy per request (`crate::energy::detect`: a real counter, else the CPU-time
    # estimate, labelled so): one source, every finished request counted, and their
    # shares never more than the passes' total.
    m = metrics()
    total = [k for k in m if k.startswith("cairn_energy_joules_total{")]
    assert len(total) == 1, f"one energy source expected: {total}"
    labels = total[0][len("cairn_energy_joules_total"):]
    assert 'estimate="true"' in labels or 'estimate="false"' in labels, labels
    count, esum = m["cairn_request_energy_joules_count" + labels], m["cairn_request_energy_joules_sum" + labels]
    assert count == m["cairn_requests_finished_total"] and count >= 3, f"{count} requests with energy, {m['cairn_requests_finished_total']} finished"
    assert 0 < esum <= m[total[0]] + 1e-3, f"request energy {esum} J, passes {m[total[0]]} J"
    note("energy", f"{labels}: {m[total[0]]:.2f} J over passes, {esum:.2f} J over {count:.0f} finished requests")
    note("total", f"{time.monotonic() - t0:.1f}s")
    print_summary("cairn serve, queue")


if __name__ == "__main__":
    main()
