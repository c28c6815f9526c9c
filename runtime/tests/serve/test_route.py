"""`cairn serve --route REGISTRY`: a served router, through the official `openai` client.

CAIRN_EXPECT holds:
  prompt, tokens   the completion asked below (greedy)
  text             `cairn generate --route` of it with the same budgets: the served
                   answer must be the same text
  experts          the registry's expert names
"""

import concurrent.futures
import sys

import openai

from common import EXPECT, SseStream, client, error_of, model_id, note, post, print_summary, proc_status

PROMPT, TOKENS, EXPERTS = EXPECT["prompt"], EXPECT["tokens"], EXPECT["experts"]
LOOSE = {"latency_budget": "60s", "energy_budget": "1000J"}


def route_of(resp):
    extra = resp.model_extra or {}
    r = (extra.get("cairn") or {}).get("route")
    assert r, f"no cairn.route in the answer: {resp}"
    assert r["chosen"] and set(r["chosen"]) <= set(EXPERTS), r
    assert set(r["answered"]) <= set(EXPERTS), r
    for k in ("latency_s", "energy_j"):
        assert r["predicted"][k] > 0 and r["measured"][k] >= 0, r
    return r


def test_same_as_the_cli():
    c = client()
    mid = model_id()
    r = c.completions.create(
        model=mid, prompt=PROMPT, max_tokens=TOKENS, temperature=0, extra_body={"cairn": LOOSE}
    )
    route = route_of(r)
    assert r.choices[0].text == EXPECT["text"], f"served {r.choices[0].text!r} != cli {EXPECT['text']!r}"
    assert r.usage.completion_tokens == route["new_tokens"] and r.usage.completion_tokens > 0, r.usage
    note("completion", f"{r.choices[0].text!r} by {route['answered']} (chosen {route['chosen']})")
    note("predicted / measured", f"{route['predicted']} / {route['measured']}")


def test_stream_and_chat():
    c = client()
    chunks = list(
        c.completions.create(
            model=model_id(), prompt=PROMPT, max_tokens=TOKENS, temperature=0, stream=True, extra_body={"cairn": LOOSE}
        )
    )
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert text == EXPECT["text"], f"streamed {text!r} != {EXPECT['text']!r}"
    assert len([ch for ch in chunks if ch.choices and ch.choices[0].text]) > 1, "the answer came in one piece"
    last = [ch for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert last and route_of(last[-1]), "the last chunk carries no route report"
    r = c.chat.completions.create(
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        model=model_id(),
        max_tokens=24,
        temperature=0,
        extra_body={"cairn": LOOSE},
    )
    assert r.choices[0].message.content.strip(), r
    route_of(r)
    note("chat", repr(r.choices[0].message.content))
    # A stop string ends the answer before it.
    cut = EXPECT["text"][len(EXPECT["text"]) // 2 :].strip()[:3]
    if cut:
        s = c.completions.create(
            model=model_id(), prompt=PROMPT, max_tokens=TOKENS, temperature=0, stop=[cut], extra_body={"cairn": LOOSE}
        )
        t = s.choices[0].text
        assert cut not in t and EXPECT["text"].startswith(t), f"stop {cut!r}: {t!r}"
        assert s.choices[0].finish_reason == "stop", s
        note("stop", f"{cut!r} -> {t!r}")


def test_budgets_and_fallbacks():
    c = client()
    try:
        c.completions.create(
            model=model_id(),
            prompt=PROMPT,
            max_tokens=8,
            extra_body={"cairn": {"latency_budget": "1ms", "fallback": "refuse"}},
        )
        raise AssertionError("an impossible budget with fallback refuse was answered")
    except openai.BadRequestError as e:
        assert "refused" in str(e) and "no set of experts fits" in str(e), e
        note("refused", str(e)[:160])
    r = c.completions.create(
        model=model_id(), prompt=PROMPT, max_tokens=8, extra_body={"cairn": {"latency_budget": 0.001}}
    )
    route = route_of(r)
    assert route["fallback"] and "no set of experts fits" in route["fallback"], route
    assert len(route["chosen"]) == 1, route
    note("fallback", route["fallback"])


def test_bad_requests():
    bad = [
        ({"cairn": {"latency_budget": 0}}, "more than 0"),
        ({"cairn": {"energy_budget": "-3J"}}, "more than 0"),
        ({"cairn": {"latency_budget": "fast"}}, "not a number"),
        ({"cairn": {"fallback": "maybe"}}, "unknown fallback"),
        ({"cairn": {"gemfilter": True}}, "routed server"),
        ({"cairn": {"budget": 1}}, "not a cairn option"),
        ({"logprobs": 2}, "routed server"),
        ({"echo": True}, "routed server"),
    ]
    for extra, want in bad:
        r = post("/v1/completions", dict({"prompt": PROMPT, "max_tokens": 4}, **extra))
        assert r.status == 400, f"{extra}: {r}"
        e = error_of(r)
        assert want in e["message"], f"{extra}: {e}"
    r = post("/v1/completions", {"prompt": [1, 2, 3], "max_tokens": 4})
    assert r.status == 400 and "token ids" in error_of(r)["message"], r
    r = post("/v1/cairn/memory", {"bytes": "90MB"})
    assert r.status == 400 and "registry" in error_of(r)["message"], r
    note("bad requests", f"{len(bad) + 2} refused with 400 and a reason")


def test_many_callers_and_memory():
    c = client()

    def one(k):
        r = c.completions.create(
            model=model_id(), prompt=f"{PROMPT} {k}", max_tokens=12, temperature=0, extra_body={"cairn": LOOSE}
        )
        return r.choices[0].text, route_of(r)

    rss = []
    for rnd in range(3):
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            out = list(pool.map(one, range(4)))
        assert all(t.strip() for t, _ in out), out
        rss.append(proc_status()["VmRSS"])
    grew = rss[2] - rss[1]
    note("rss after rounds (KiB)", rss)
    assert grew < 8 * 1024, f"the routed server grew {grew} KiB from round 2 to 3: {rss}"
    # The stream of a client that leaves does not stop the server.
    s = SseStream("/v1/completions", {"prompt": PROMPT, "max_tokens": 64, "cairn": LOOSE})
    for ev in s.events():
        if ev != "[DONE]" and ev["choices"] and ev["choices"][0]["text"]:
            break
    s.close()
    t, _ = one("after")
    assert t.strip()


if __name__ == "__main__":
    for name, f in list(globals().items()):
        if name.startswith("test_") and callable(f):
            print(f"-- {name}", flush=True)
            f()
    print_summary("routed serve")
    sys.exit(0)
