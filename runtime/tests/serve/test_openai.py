"""The main end-to-end suite of `cairn serve`, through the official `openai` client.

Run by runtime/tests/serve.rs against `cairn serve --parallel 8 --api-key K -c 1024`;
CAIRN_EXPECT carries what the `cairn` CLI answers for the same prompts:
  chat:     [{"prompt", "max_tokens", "text"}]    `cairn chat -p P --temp 0 -n N`
  generate: {"prompt", "max_tokens", "prompt_ids", "ids", "text"}
                                                   `cairn generate -p P --temp 0 -n N --json`
  eval_top: [[[id, logit] x 6] per position]       `cairn eval --ids prompt_ids+ids --top 6`
Every check is a plain assert with a message; the script exits non-zero on the first
failure. Sections print what they measure; a summary closes the run.
"""

import asyncio
import math
import threading
import time

import openai

from common import (
    API_KEY,
    EXPECT,
    SseStream,
    async_client,
    client,
    error_of,
    metrics,
    note,
    post,
    print_summary,
    proc_status,
    raw,
    wait_until,
)

C = client()
MODEL = None
CTX = 1024  # the harness's -c


def section(name):
    print(f"\n--- {name}", flush=True)


def chat(prompt, max_tokens, **kw):
    return C.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0, **kw
    )


def stream_chat(prompt, max_tokens, include_usage=True, **kw):
    """Streamed greedy chat: (text, chunks)."""
    extra = {"stream_options": {"include_usage": True}} if include_usage else {}
    s = C.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        **extra,
        **kw,
    )
    chunks = list(s)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


def check_usage(u, what):
    assert u is not None, f"{what}: no usage"
    assert u.prompt_tokens > 0 and u.completion_tokens >= 0, f"{what}: usage {u}"
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens, f"{what}: total != prompt + completion: {u}"


# ---------------------------------------------------------------------------------------


def test_models_health_auth():
    global MODEL
    section("models, /health, API key")
    r = raw("GET", "/health", key="")
    assert r.status == 200, f"/health without a key must answer 200: {r}"
    ms = C.models.list().data
    assert len(ms) == 1, f"models.list() must list exactly the one model: {ms}"
    MODEL = ms[0].id
    assert ms[0].object == "model" and MODEL, f"bad model entry {ms[0]}"
    note("model", MODEL)

    msgs = [{"role": "user", "content": "hi"}]
    wrong = client(key=API_KEY + "-wrong")
    for what, call in [
        ("chat", lambda: wrong.chat.completions.create(model=MODEL, messages=msgs, max_tokens=2)),
        ("completions", lambda: wrong.completions.create(model=MODEL, prompt="hi", max_tokens=2)),
        ("models", lambda: wrong.models.list()),
    ]:
        try:
            call()
            raise AssertionError(f"{what} with a wrong API key succeeded")
        except openai.AuthenticationError as e:
            assert e.status_code == 401, e
            error_of_response(e)
    # The client refuses to send no key at all, so the missing key goes raw.
    for method, path, body in [
        ("POST", "/v1/chat/completions", {"model": MODEL, "messages": msgs, "max_tokens": 2}),
        ("POST", "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 2}),
        ("GET", "/v1/models", None),
        ("GET", "/metrics", None),
        ("POST", "/tokenize", {"content": "hi"}),
        ("POST", "/detokenize", {"tokens": [1]}),
        ("POST", "/v1/cairn/memory", {"bytes": 1}),
    ]:
        for key in ("", API_KEY + "x", "k"):
            r = raw(method, path, body, key=key)
            assert r.status == 401, f"{method} {path} with key {key!r} must be 401: {r}"
            error_of(r)
    r = raw("GET", "/v1/models", headers={"Authorization": f"Basic {API_KEY}"}, key="")
    assert r.status == 401, f"a non-Bearer Authorization must be 401: {r}"
    note("auth", "wrong key -> 401 (openai.AuthenticationError), missing key -> 401, /health open")


def error_of_response(e):
    """The OpenAI error shape of an openai APIStatusError's raw body."""
    v = e.response.json()
    assert set(v) == {"error"}, f"error body {v}"
    assert set(v["error"]) == {"message", "type", "param", "code"}, f"error keys {v}"
    return v["error"]


# Greedy answers by prompt: (first answer, answer once the slot caches the prompt).
FIRST = {}
# The first completion of the generate prompt (with logprobs=5), on a slot that had
# nothing of it cached: its rows come from the same kernels as `cairn eval`'s.
FRESH_COMPLETION = None


def test_greedy_equals_cli():
    section("greedy chat equals `cairn chat --temp 0`; streamed equals non-streamed")
    # Each prompt's first request finds at most the chat template's system prefix cached;
    # the later ones repeat it exactly and start from the logits its first evaluation
    # stored (nothing of the prompt evaluated again), so they must agree exactly.
    for case in EXPECT["chat"]:
        p, n, want = case["prompt"], case["max_tokens"], case["text"].rstrip()
        r = chat(p, n)
        got = r.choices[0].message.content
        assert got.rstrip() == want, f"greedy chat differs from the CLI for {p!r}:\n server {got!r}\n cli    {want!r}"
        assert r.choices[0].message.role == "assistant", r
        assert r.choices[0].finish_reason in ("stop", "length"), r
        check_usage(r.usage, "chat")
        if r.choices[0].finish_reason == "length":
            assert r.usage.completion_tokens == n, f"finish length but {r.usage.completion_tokens} of {n} tokens"
        assert r.object == "chat.completion" and r.id and r.model == MODEL, r

        text, chunks = stream_chat(p, n)
        text2, chunks2 = stream_chat(p, n, include_usage=False)
        r4 = chat(p, n)
        again = r4.choices[0].message.content
        FIRST[("chat", p)] = (got, again, r4.usage.prompt_tokens_details.cached_tokens)
        assert text == again, f"streamed text differs from non-streamed for {p!r}:\n stream {text!r}\n whole  {again!r}"
        assert text2 == again, "stream without usage differs from non-streamed"
        first = chunks[0]
        assert first.choices and first.choices[0].delta.role == "assistant", f"first chunk has no role: {first}"
        assert all(c.object == "chat.completion.chunk" for c in chunks), "chunk object"
        assert len({c.id for c in chunks}) == 1, "chunks of one answer must share an id"
        last = chunks[-1]
        assert last.choices == [] and last.usage is not None, f"last chunk must have empty choices and usage: {last}"
        assert all(c.usage is None for c in chunks[:-1]), "usage only in the last chunk"
        fin = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert fin == [r4.choices[0].finish_reason], f"one finish_reason, equal to non-streamed: {fin}"
        check_usage(last.usage, "stream usage")
        assert last.usage.prompt_tokens == r4.usage.prompt_tokens, f"{last.usage} vs {r4.usage}"
        assert last.usage.completion_tokens == r4.usage.completion_tokens, f"{last.usage} vs {r4.usage}"
        assert all(c.usage is None for c in chunks2) and all(c.choices for c in chunks2), "usage not asked"
    note("greedy chat == CLI", f"{len(EXPECT['chat'])} prompts (streamed and not)")

    global FRESH_COMPLETION
    g = EXPECT["generate"]
    r = C.completions.create(model=MODEL, prompt=g["prompt"], max_tokens=g["max_tokens"], temperature=0, logprobs=5)
    assert r.usage.prompt_tokens_details.cached_tokens == 0, f"the first completion found a cache: {r.usage}"
    FRESH_COMPLETION = r
    first = r.choices[0].text
    assert first == g["text"], f"completion differs from `cairn generate`:\n {first!r}\n {g['text']!r}"
    assert r.object == "text_completion", r
    assert r.usage.prompt_tokens == len(g["prompt_ids"]), f"prompt tokens {r.usage} vs {len(g['prompt_ids'])}"
    assert r.usage.completion_tokens == len(g["ids"]), f"completion tokens {r.usage} vs {len(g['ids'])}"
    check_usage(r.usage, "completions")
    s = C.completions.create(
        model=MODEL,
        prompt=g["prompt"],
        max_tokens=g["max_tokens"],
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(s)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(g["ids"]), chunks[-1]
    # A prompt of token ids, in the same cache state as the stream.
    r2 = C.completions.create(model=MODEL, prompt=g["prompt_ids"], max_tokens=g["max_tokens"], temperature=0)
    again = r2.choices[0].text
    FIRST[("completion", g["prompt"])] = (first, again, r2.usage.prompt_tokens_details.cached_tokens)
    assert text == again, f"streamed completion differs from non-streamed: {text!r} vs {again!r}"
    note("greedy completion == `cairn generate`", f"{len(g['ids'])} tokens (text, ids, streamed)")


def test_prefix_cache_determinism():
    section("a greedy answer does not depend on what the slot had cached")
    bad = []
    for (kind, p), (first, again, cached) in FIRST.items():
        if first != again:
            bad.append(f"{kind} {p!r} (second time {cached} prompt tokens cached):\n   first  {first!r}\n   cached {again!r}")
    # The slot holds all of the prompt but its last token (a prompt that differed only
    # there came before): the answer must still be the fresh one.
    g = EXPECT["generate"]
    P = g["prompt_ids"]
    C.completions.create(model=MODEL, prompt=P[:-1] + [P[-1] + 1], max_tokens=4, temperature=0)
    r = C.completions.create(model=MODEL, prompt=P, max_tokens=g["max_tokens"], temperature=0)
    cached = r.usage.prompt_tokens_details.cached_tokens
    # The slot reuses all but the last two tokens: those are evaluated in one batched pass,
    # as in a fresh prefill (one token alone would go through the decode kernels).
    assert cached == len(P) - 2, f"{cached} prompt tokens cached of {len(P)}, expected {len(P) - 2}: {r.usage}"
    if r.choices[0].text != g["text"]:
        bad.append(
            f"completion ids {P} after {P[:-1] + [P[-1] + 1]} ({cached} prompt tokens cached):\n"
            f"   fresh  {g['text']!r}\n   cached {r.choices[0].text!r}"
        )
    n = len(FIRST) + 1
    note("prefix-cache determinism", f"{n - len(bad)} of {n} cases answer as they do fresh")
    assert not bad, (
        "SERVER BUG: the same greedy request answers differently once its prompt is in the slot's cache "
        "(the prompt's last token is then evaluated alone, through the decode kernels, instead of in the "
        "prefill batch):\n  " + "\n  ".join(bad)
    )


def piece(i):
    r = post("/detokenize", {"tokens": [i]})
    assert r.status == 200, r
    return r.json()["content"]


def test_logprobs():
    section("logprobs")
    # Chat: 5 alternatives everywhere, sorted, the greedy choice is the top one.
    p = EXPECT["chat"][0]["prompt"]
    r = chat(p, 24, logprobs=True, top_logprobs=5)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens, f"{len(content)} logprob entries for {r.usage}"
    for k, t in enumerate(content):
        tops = t.top_logprobs
        assert len(tops) == 5, f"token {k}: {len(tops)} top_logprobs, not 5"
        lps = [a.logprob for a in tops]
        assert lps == sorted(lps, reverse=True), f"token {k}: top_logprobs not sorted: {lps}"
        assert all(x <= 0 for x in lps), f"token {k}: positive logprob {lps}"
        assert abs(t.logprob - tops[0].logprob) < 1e-6, f"token {k}: greedy choice {t.logprob} != top-1 {lps[0]}"
        assert t.token == tops[0].token, f"token {k}: {t.token!r} is not the top-1 {tops[0].token!r}"
        assert bytes(t.bytes).decode("utf-8", "replace") == t.token, f"token {k}: bytes vs token"
    joined = "".join(t.token for t in content)
    text = r.choices[0].message.content
    if "\ufffd" not in joined:
        assert joined == text, f"logprob tokens do not spell the text: {joined!r} vs {text!r}"
    # Streamed: the same entries, spread over the chunks.
    s = C.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": p}],
        max_tokens=24,
        temperature=0,
        logprobs=True,
        top_logprobs=5,
        stream=True,
    )
    streamed = [t for c in s if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [(t.token, round(t.logprob, 5)) for t in streamed] == [
        (t.token, round(t.logprob, 5)) for t in content
    ], "streamed logprobs differ from non-streamed"
    # logprobs=True alone: the chosen tokens, no alternatives.
    r0 = chat(p, 4, logprobs=True)
    assert all(len(t.top_logprobs) == 0 for t in r0.choices[0].logprobs.content), r0
    assert r.choices[0].logprobs is not None and chat(p, 2).choices[0].logprobs is None, "logprobs only when asked"



def test_logprobs_eval():
    """Completions' logprobs against `cairn eval` over the prompt and the generated ids."""
    section("logprobs against `cairn eval`")
    g = EXPECT["generate"]
    P, ids, top = g["prompt_ids"], g["ids"], EXPECT["eval_top"]
    assert len(top) == len(P) + len(ids), f"eval rows {len(top)} != {len(P)} + {len(ids)}"
    r = FRESH_COMPLETION or C.completions.create(
        model=MODEL, prompt=g["prompt"], max_tokens=len(ids), temperature=0, logprobs=5
    )
    assert r.usage.prompt_tokens_details.cached_tokens == 0, f"the completion found a cache: {r.usage}"
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(ids), f"{len(lp.tokens)} tokens with logprobs, {len(ids)} generated by the CLI"
    pieces = {}

    def pc(i):
        if i not in pieces:
            pieces[i] = piece(i)
        return pieces[i]

    # Rows the server computes with the same kernels as `cairn eval`'s single batch: the
    # prompt's last row on the fast path (decode steps take other kernels, whose int8
    # roundings differ from the batch's by a few tenths of a logit), every row on the
    # exact path.
    strict = len(ids) if EXPECT.get("exact") else 1
    worst_strict, worst_loose = 0.0, 0.0
    offset = 0
    for k, tid in enumerate(ids):
        assert lp.tokens[k] == pc(tid), f"position {k}: token {lp.tokens[k]!r} != piece of CLI id {tid} {pc(tid)!r}"
        assert lp.text_offset[k] == offset, f"position {k}: text_offset {lp.text_offset[k]} != {offset}"
        offset += len(lp.tokens[k])
        alts = lp.top_logprobs[k]
        assert len(alts) <= 5, f"position {k}: {len(alts)} alternatives"
        assert abs(lp.token_logprobs[k] - max(alts.values())) < 1e-6, f"position {k}: greedy token is not the top-1"
        row = top[len(P) - 1 + k]  # the eval row that predicts generated token k
        eval5 = row[:5]
        names = [pc(i) for i, _ in eval5]
        tol = 0.05 if k < strict else 1.0
        if k < strict:
            want, got = set(names), set(alts)
            if got != want:
                # Only a near-tie at the boundary (5th vs 6th) may swap.
                tie = len(row) > 5 and abs(row[4][1] - row[5][1]) < 0.05
                alt6 = pc(row[5][0]) if len(row) > 5 else None
                assert tie and got == (want - {names[4]}) | {alt6}, (
                    f"position {k}: server top-5 {sorted(got)} != eval top-5 {sorted(want)} (eval row {row})"
                )
        l0 = eval5[0][1]
        lp0 = alts.get(names[0])
        if lp0 is None:
            assert k >= strict, f"position {k}: eval's top-1 {names[0]!r} is not among the server's {sorted(alts)}"
            continue
        for (i, logit), name in zip(eval5, names):
            if names.count(name) > 1 or name not in alts:
                continue  # two ids with one lossy string: the dict keeps one
            d = abs((alts[name] - lp0) - (logit - l0))
            if k < strict:
                worst_strict = max(worst_strict, d)
            else:
                worst_loose = max(worst_loose, d)
            assert d < tol, (
                f"position {k}, id {i} {name!r}: logprob gap {alts[name] - lp0:.4f} vs eval logit gap {logit - l0:.4f}"
                f" (tolerance {tol})"
            )
    note(
        "logprobs vs `cairn eval`" + (" (exact path)" if EXPECT.get("exact") else ""),
        f"{len(ids)} positions; worst |gap difference| {worst_strict:.4f} over the {strict} batch-computed "
        f"row(s)" + (f", {worst_loose:.4f} over the decoded rows (bound 1.0)" if strict < len(ids) else ""),
    )


def test_echo():
    """`echo` with `max_tokens: 0` scores a text (how a MoE² router trains its gate on a
    remote expert): one log-probability per prompt token after the first, against
    `cairn eval`'s rows; `return_tokens_as_token_ids` names tokens by id."""
    section("echo and token ids")
    g = EXPECT["generate"]
    P, ids, top = g["prompt_ids"], g["ids"], EXPECT["eval_top"]
    allids = P + ids
    r = C.completions.create(
        model=MODEL, prompt=allids, max_tokens=0, echo=True, logprobs=5, temperature=0,
        extra_body={"return_tokens_as_token_ids": True},
    )
    lp = r.choices[0].logprobs
    assert r.usage.completion_tokens == 0 and r.usage.prompt_tokens == len(allids), f"usage {r.usage}"
    assert r.choices[0].finish_reason == "length", r.choices[0].finish_reason
    assert lp.tokens == [f"token_id:{i}" for i in allids], f"echoed tokens {lp.tokens[:8]}... != the prompt ids"
    assert lp.token_logprobs[0] is None, f"the first token has no logprob, not {lp.token_logprobs[0]}"
    text = r.choices[0].text
    assert text == g["prompt"] + g["text"], f"echoed text {text!r} != prompt + generated text"
    worst, compared = 0.0, 0
    for k in range(1, len(allids)):
        row = top[k - 1]  # the eval row that predicts token k
        alts = lp.top_logprobs[k]
        assert 1 <= len(alts) <= 5, f"position {k}: {len(alts)} alternatives"
        got = lp.token_logprobs[k]
        assert got is not None and got <= 1e-6, f"position {k}: logprob {got}"
        by_id = {int(t.split(":")[1]): v for t, v in alts.items()}
        assert abs(max(by_id.values()) - by_id.get(row[0][0], -1e9)) < 0.05 or abs(row[0][1] - row[1][1]) < 0.05, (
            f"position {k}: the server's top-1 is not eval's {row[0]} ({by_id})"
        )
        want = dict((i, l) for i, l in row)
        if allids[k] in want:
            d = abs((got - by_id[row[0][0]]) - (want[allids[k]] - row[0][1])) if row[0][0] in by_id else 0.0
            worst = max(worst, d)
            compared += 1
            assert d < 0.05, f"position {k}: logprob gap to the top-1 differs from eval's by {d:.4f}"
    assert compared >= len(allids) // 2, f"only {compared} positions had the true token in eval's top 6"
    # Generated tokens by id too, equal to the CLI's greedy ids.
    r = C.completions.create(
        model=MODEL, prompt=P, max_tokens=len(ids), logprobs=1, temperature=0,
        extra_body={"return_tokens_as_token_ids": True},
    )
    assert r.choices[0].logprobs.tokens == [f"token_id:{i}" for i in ids], "generated token ids differ from the CLI's"
    note("echo", f"{len(allids)} prompt tokens scored; {compared} against eval, worst gap difference {worst:.4f}")


def test_request_forms():
    section("request forms: aliases, roles, content parts, seeds, cached tokens")
    p = EXPECT["chat"][2]["prompt"]
    base = chat(p, 12)
    want = base.choices[0].message.content
    # max_completion_tokens is max_tokens' newer name.
    r = C.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": p}], max_completion_tokens=5, temperature=0
    )
    assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length", r
    assert want.startswith(r.choices[0].message.content), f"{r.choices[0].message.content!r} vs {want!r}"
    # Content as a list of text parts is the same prompt.
    r = C.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": [{"type": "text", "text": p[:10]}, {"type": "text", "text": p[10:]}]}],
        max_tokens=12,
        temperature=0,
    )
    assert r.choices[0].message.content == want, f"content parts: {r.choices[0].message.content!r} vs {want!r}"
    assert r.usage.prompt_tokens == base.usage.prompt_tokens, "content parts change the prompt"
    # An exact repeat starts from the logits the slot stored at the prompt's end: every
    # prompt token is served from the cache, none evaluated again.
    assert r.usage.prompt_tokens_details.cached_tokens == r.usage.prompt_tokens, (
        f"the same prompt again must find all of it cached: {r.usage}"
    )
    # "developer" is the system role's newer name.
    msgs = lambda role: [{"role": role, "content": "Answer in French."}, {"role": "user", "content": p}]  # noqa: E731
    a = C.chat.completions.create(model=MODEL, messages=msgs("system"), max_tokens=8, temperature=0)
    b = C.chat.completions.create(model=MODEL, messages=msgs("developer"), max_tokens=8, temperature=0)
    assert a.usage.prompt_tokens == b.usage.prompt_tokens, f"developer vs system prompts: {a.usage} {b.usage}"
    # A multi-turn history with an assistant turn.
    r = C.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "user", "content": "My name is Ada."},
            {"role": "assistant", "content": "Hello Ada!"},
            {"role": "user", "content": "What is my name?"},
        ],
        max_tokens=8,
        temperature=0,
    )
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.prompt_tokens > 20, r
    # Sampling with a seed repeats itself (same prompt, same cache state).
    kw = dict(temperature=0.9, top_p=0.95, seed=1234)
    C.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": p}], max_tokens=16, **kw)  # warm
    s1 = C.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": p}], max_tokens=16, **kw)
    s2 = C.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": p}], max_tokens=16, **kw)
    assert s1.choices[0].message.content == s2.choices[0].message.content, (
        f"same seed, different text: {s1.choices[0].message.content!r} vs {s2.choices[0].message.content!r}"
    )
    others = {
        C.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": p}], max_tokens=16, temperature=0.9, seed=sd
        ).choices[0].message.content
        for sd in (1, 2, 3)
    }
    assert len(others) > 1, f"three seeds at temperature 0.9 gave one text: {others}"
    # Cairn's own knob: GemFilter keeps 256 of a prompt longer than the slot's context, which
    # full attention refuses, and still finds the needle.
    long = " ".join(f"word{i}" for i in range(400)) + " The secret code is 4417. What is the secret code?"
    msgs = [{"role": "user", "content": long}]
    try:
        C.chat.completions.create(model=MODEL, messages=msgs, max_tokens=12, temperature=0)
        raise AssertionError("a prompt over the context was accepted without GemFilter")
    except openai.BadRequestError as e:
        assert e.code == "context_length_exceeded", e
    # The first GemFilter request calibrates the filter layer (once per model, between two
    # steps of the loop): on a slow machine that is longer than the default timeout.
    r = C.with_options(timeout=600).chat.completions.create(
        model=MODEL, messages=msgs, max_tokens=12, temperature=0, extra_body={"cairn": {"gemfilter": "k=256"}}
    )
    assert r.usage.prompt_tokens > CTX, r.usage
    assert "4417" in r.choices[0].message.content, f"GemFilter lost the needle: {r.choices[0].message.content!r}"
    try:
        C.chat.completions.create(model=MODEL, messages=msgs, max_tokens=4, extra_body={"cairn": {"gemfilter": "k=x"}})
        raise AssertionError("a bad gemfilter spec was accepted")
    except openai.BadRequestError as e:
        assert e.param == "cairn", e
    note("request forms", "max_completion_tokens, content parts, developer role, history, seeded sampling, "
         f"GemFilter k=256 over a {r.usage.prompt_tokens}-token prompt")


def test_stop():
    section("stop strings")
    p = EXPECT["chat"][1]["prompt"]
    r = chat(p, 48, logprobs=True)
    full = r.choices[0].message.content
    toks = [t.token for t in r.choices[0].logprobs.content]
    assert "".join(toks) == full, f"tokens do not spell the text: {toks}"
    # Offsets of each token's start.
    starts = [0]
    for t in toks:
        starts.append(starts[-1] + len(t))

    def check(stop, why):
        k = min(full.find(s) for s in ([stop] if isinstance(stop, str) else stop) if s in full)
        want = full[:k]
        r = chat(p, 48, stop=stop)
        got = r.choices[0].message.content
        assert got == want, f"stop={stop!r} ({why}): got {got!r}, want {want!r}"
        assert r.choices[0].finish_reason == "stop", f"stop={stop!r}: finish_reason {r.choices[0].finish_reason}"
        s, _ = stream_chat(p, 48, stop=stop)
        assert s == want, f"stop={stop!r} streamed: got {s!r}, want {want!r}"
        return k

    # A single-token word, a few tokens in.
    one = next(
        (t for j, t in enumerate(toks) if j >= 2 and t.strip().isalpha() and full.find(t) == starts[j]), None
    )
    assert one, f"no single-token word to stop at in {toks}"
    check(one, "one token")
    # Several tokens: from inside one token to inside a later one.
    multi = None
    for j in range(3, len(toks) - 3):
        a, b, c = toks[j], toks[j + 1], toks[j + 2]
        if len(a) >= 2 and len(c) >= 2 and b.strip():
            cand = a[1:] + b + c[:-1]
            if full.find(cand) == starts[j] + 1:
                multi = cand
                break
    assert multi, f"no multi-token stop candidate in {toks}"
    at = check(multi, "spans three tokens, starts and ends mid-token")
    check(["@@never@@", multi, "\u2603\u2603"], "a list, one matches")
    # Two matches in a list: the earlier one cuts.
    check([multi, one], "a list, earliest wins")
    # A stop string that never occurs changes nothing.
    r2 = chat(p, 48, stop=["@@never@@"])
    assert r2.choices[0].message.content == full and r2.choices[0].finish_reason == r.choices[0].finish_reason, r2
    note("stop", f"one-token {one!r}, multi-token {multi!r} at byte {at}: cut exactly, finish_reason stop")


def test_errors():
    section("errors: status, OpenAI shape, param")
    msgs = [{"role": "user", "content": "hi"}]

    def expect(exc, status, param, call, what, code=None):
        try:
            call()
        except exc as e:
            assert e.status_code == status, f"{what}: status {e.status_code}, want {status}"
            err = error_of_response(e)
            assert err["param"] == param, f"{what}: param {err['param']!r}, want {param!r} ({err})"
            if code:
                assert err["code"] == code, f"{what}: code {err['code']!r}, want {code!r}"
            return err
        raise AssertionError(f"{what}: no error")

    B = openai.BadRequestError
    cc = C.chat.completions.create
    cases = [
        (B, 400, "temperature", lambda: cc(model=MODEL, messages=msgs, temperature="hot"), "temperature 'hot'"),
        (B, 400, "temperature", lambda: cc(model=MODEL, messages=msgs, temperature=-1), "temperature -1"),
        (B, 400, "max_tokens", lambda: cc(model=MODEL, messages=msgs, max_tokens=-1), "max_tokens -1"),
        (B, 400, "max_tokens", lambda: cc(model=MODEL, messages=msgs, max_tokens=0), "max_tokens 0"),
        (B, 400, "max_tokens", lambda: cc(model=MODEL, messages=msgs, max_tokens="5"), "max_tokens '5'"),
        (B, 400, "top_p", lambda: cc(model=MODEL, messages=msgs, top_p=2), "top_p 2"),
        (B, 400, "stream", lambda: cc(model=MODEL, messages=msgs, extra_body={"stream": "yes"}), "stream 'yes'"),
        (B, 400, "messages", lambda: cc(model=MODEL, messages="hi"), "messages not a list"),
        (B, 400, "messages", lambda: cc(model=MODEL, messages=[]), "messages empty"),
        (B, 400, "messages", lambda: cc(model=MODEL, messages=["hi"]), "message not an object"),
        (B, 400, "messages", lambda: cc(model=MODEL, messages=[{"role": "robot", "content": "x"}]), "unknown role"),
        (B, 400, "messages", lambda: cc(model=MODEL, messages=[{"content": "x"}]), "no role"),
        (B, 400, "messages", lambda: cc(model=MODEL, messages=[{"role": "user", "content": 5}]), "content 5"),
        (B, 400, "stop", lambda: cc(model=MODEL, messages=msgs, stop=5), "stop 5"),
        (B, 400, "top_logprobs", lambda: cc(model=MODEL, messages=msgs, top_logprobs=3), "top_logprobs alone"),
        (B, 400, "top_logprobs", lambda: cc(model=MODEL, messages=msgs, logprobs=True, top_logprobs=21), "top 21"),
        (B, 400, "stream_options", lambda: cc(model=MODEL, messages=msgs, stream_options={"include_usage": True}), "stream_options without stream"),
    ]
    for exc, status, param, call, what in cases:
        expect(exc, status, param, call, what)
    for what, kw, field in [
        ("n=2", dict(n=2), "n"),
        ("tools", dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]), "tools"),
        ("response_format", dict(response_format={"type": "json_object"}), "response_format"),
        ("logit_bias", dict(logit_bias={"1": 5}), "logit_bias"),
        ("unknown field", dict(extra_body={"frobnicate": 1}), "frobnicate"),
    ]:
        err = expect(B, 400, field, lambda: cc(model=MODEL, messages=msgs, **kw), what)
        assert field in err["message"], f"{what}: the message must name {field}: {err}"
    err = expect(openai.NotFoundError, 404, "model", lambda: cc(model="no-such-model", messages=msgs), "unknown model")
    assert err["code"] == "model_not_found", err
    # A prompt past the context (-c 1024): about 1100 tokens.
    long = " ".join(f"word{i}" for i in range(400))
    n = len(post("/tokenize", {"content": long}).json()["tokens"])
    assert n > CTX, f"the long prompt has only {n} tokens"
    err = expect(
        B, 400, "messages", lambda: cc(model=MODEL, messages=[{"role": "user", "content": long}], max_tokens=4), "chat over the context"
    )
    assert err["code"] == "context_length_exceeded", err
    err = expect(
        B, 400, "prompt", lambda: C.completions.create(model=MODEL, prompt=long, max_tokens=4), "completion over the context"
    )
    assert err["code"] == "context_length_exceeded", err
    # Completions' own checks.
    co = C.completions.create
    expect(B, 400, "prompt", lambda: co(model=MODEL, prompt=["a", "b"]), "prompt batch")
    expect(B, 400, "prompt", lambda: co(model=MODEL, prompt=[10**10]), "prompt id out of range")
    expect(B, 400, "prompt", lambda: co(model=MODEL, prompt=""), "empty prompt")
    expect(B, 400, "max_tokens", lambda: co(model=MODEL, prompt="x", max_tokens=0), "max_tokens 0 without echo")
    expect(B, 400, "logprobs", lambda: co(model=MODEL, prompt="x", logprobs=50), "logprobs 50")
    expect(B, 400, "messages", lambda: co(model=MODEL, prompt="x", extra_body={"messages": msgs}), "messages on completions")

    # Raw bodies the client would never send.
    for what, body in [
        ("bad JSON", b"{bad"),
        ("truncated JSON", b'{"messages": ['),
        ("body a list", b"[1, 2]"),
        ("body a string", b'"hello"'),
        ("body null", b"null"),
        ("empty body", b""),
    ]:
        for path in ("/v1/chat/completions", "/v1/completions"):
            r = post(path, body, headers={"Content-Type": "application/json"})
            assert r.status == 400, f"{what} on {path}: {r}"
            e = error_of(r)
            assert e["type"] == "invalid_request_error" and e["param"] is None, f"{what}: {e}"
    r = raw("GET", "/v1/nothing-here")
    assert r.status == 404, r
    error_of(r)
    r = post("/tokenize", {"content": 5})
    assert r.status == 400 and error_of(r)["param"] == "content", r
    r = post("/detokenize", {"tokens": [10**9]})
    assert r.status == 400 and error_of(r)["param"] == "tokens", r
    r = post("/detokenize", {"tokens": "x"})
    assert r.status == 400 and error_of(r)["param"] == "tokens", r
    r = post("/v1/cairn/memory", {"bytes": "lots"})
    assert r.status == 400 and error_of(r)["param"] == "bytes", r
    # A body over the limit (4 MiB).
    r = post("/v1/completions", b"a" * (5 << 20), headers={"Content-Type": "application/json"})
    assert r.status == 413, f"a 5 MiB body: {r}"
    assert error_of(r)["code"] == "request_too_large", r
    # The server is fine after all that.
    assert chat("Say hi.", 4).choices[0].finish_reason in ("stop", "length")
    note("errors", f"{len(cases) + 21} cases, each 4xx in OpenAI's shape with its param")
    # The wrong method on a route: last, so that its failure hides nothing above.
    for method, path in [("GET", "/v1/chat/completions"), ("GET", "/v1/completions"), ("POST", "/v1/models")]:
        r = raw(method, path)
        assert r.status == 405, f"{method} {path}: {r}"
        try:
            error_of(r)
        except Exception as e:
            raise AssertionError(
                f"SERVER BUG: {method} {path} answers 405 with {r.body[:80]!r} and content-type "
                f"{r.headers.get('content-type')!r}, not an OpenAI error body ({e})"
            ) from None


def test_tokenize():
    section("/tokenize, /detokenize")
    g = EXPECT["generate"]
    r = post("/tokenize", {"content": g["prompt"], "add_special": True})
    assert r.status == 200, r
    assert r.json()["tokens"] == g["prompt_ids"], f"/tokenize {r.json()} != CLI prompt ids {g['prompt_ids']}"
    r = post("/tokenize", {"content": g["text"], "with_pieces": True}).json()["tokens"]
    assert "".join(t["piece"] for t in r) == g["text"], f"pieces do not spell the text: {r}"
    r = post("/detokenize", {"tokens": g["ids"]})
    assert r.status == 200 and r.json()["content"] == g["text"], f"/detokenize {r} != {g['text']!r}"



def test_concurrent_streams():
    section("8 simultaneous greedy streams equal each alone")
    prompts = [c["prompt"] for c in EXPECT["chat"]][:8]
    assert len(prompts) == 8, prompts
    alone = [stream_chat(p, 48)[0] for p in prompts]
    for p, a, case in zip(prompts, alone, EXPECT["chat"]):
        assert a.rstrip() == case["text"].rstrip(), f"alone {p!r}: {a!r} vs CLI {case['text']!r}"
    results = [None] * 8
    spans = [None] * 8
    errors = []

    def one(i):
        try:
            t0 = time.monotonic()
            results[i] = stream_chat(prompts[i], 48)[0]
            spans[i] = (t0, time.monotonic())
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append((i, repr(e)))

    busy_max = [0]
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            busy_max[0] = max(busy_max[0], metrics().get("cairn_slots_busy", 0))
            time.sleep(0.05)

    w = threading.Thread(target=watch)
    w.start()
    ts = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    t = time.monotonic()
    for th in ts:
        th.start()
    for th in ts:
        th.join(120)
    stop.set()
    w.join(10)
    wall = time.monotonic() - t
    assert not errors, f"concurrent streams failed: {errors}"
    for i in range(8):
        assert results[i] == alone[i], (
            f"stream {i} ({prompts[i]!r}) differs when run with 7 others:\n together {results[i]!r}\n alone    {alone[i]!r}"
        )
    overlap = max(s[0] for s in spans) < min(s[1] for s in spans)
    assert overlap, f"the 8 streams did not overlap in time: {spans}"
    note("8 concurrent streams", f"all equal to alone; wall {wall:.2f}s; slots busy seen at most {busy_max[0]:.0f}")


def test_disconnect():
    section("a client that leaves mid-stream frees its slot")
    m0 = metrics()
    c0 = m0["cairn_requests_cancelled_total"]
    assert m0["cairn_slots_busy"] == 0, f"slots busy before the test: {m0['cairn_slots_busy']}"
    s = C.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Write a very long story about a dragon."}],
        max_tokens=400,
        temperature=0,
        stream=True,
    )
    it = iter(s)
    for _ in range(3):
        next(it)
    busy = metrics()["cairn_slots_busy"]
    assert busy == 1, f"the stream's slot is not busy while it runs: {busy}"
    gen0 = metrics()["cairn_generated_tokens_total"]
    t = time.monotonic()
    s.close()
    m = wait_until(
        lambda: (lambda m: m if m["cairn_requests_cancelled_total"] > c0 and m["cairn_slots_busy"] == 0 else None)(metrics()),
        5,
        "cairn_requests_cancelled_total to rise and cairn_slots_busy to reach 0 after the client closed",
    )
    freed = time.monotonic() - t
    time.sleep(0.3)
    m2 = metrics()
    assert m2["cairn_generated_tokens_total"] == m["cairn_generated_tokens_total"], "tokens still generated after cancel"
    note(
        "disconnect",
        f"cancelled {c0:.0f} -> {m['cairn_requests_cancelled_total']:.0f}, slot freed in {freed:.2f}s, "
        f"{m['cairn_generated_tokens_total'] - gen0:.0f} tokens after close",
    )
    # A non-streamed request whose client gives up (its own timeout) is dropped too.
    m = metrics()
    try:
        client(timeout=1.0).chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Write a very long story about a whale."}],
            max_tokens=600,
            temperature=0,
        )
        raise AssertionError("a 600-token answer came back within 1 s: the client timeout never fired")
    except openai.APITimeoutError:
        pass
    wait_until(
        lambda: (lambda x: x["cairn_requests_cancelled_total"] > m["cairn_requests_cancelled_total"]
                 and x["cairn_slots_busy"] == 0)(metrics()),
        5,
        "the slot of a non-streamed request whose client left to be freed",
    )
    m = metrics()
    # Same with a raw connection dropped after the first chunk.
    st = SseStream("/v1/completions", {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 400})
    ev = st.events()
    next(ev)
    next(ev)
    st.close()
    wait_until(
        lambda: metrics()["cairn_requests_cancelled_total"] > m["cairn_requests_cancelled_total"]
        and metrics()["cairn_slots_busy"] == 0,
        5,
        "the raw stream's slot to be freed",
    )


SYSTEMS = [
    None,
    "You are a terse assistant. Answer in one short sentence.",
    "You are a pirate. Answer like a pirate.",
]
TOPICS = [
    "the moon", "bread", "rivers", "volcanoes", "bees", "chess", "trains", "clouds", "coffee", "penguins",
    "glass", "maps", "music", "salt", "tides", "wolves", "paper", "bridges", "copper", "owls",
]
FORMS = ["Tell me about {}.", "Write one sentence about {}.", "Why do people like {}?", "Give a fact about {}."]


def load_round(rnd, total=200, conc=8):
    async def run():
        ac = async_client()
        sem = asyncio.Semaphore(conc)
        errors, tokens = [], [0]

        async def one(i):
            topic = TOPICS[(i * 7 + rnd) % len(TOPICS)]
            prompt = FORMS[(i + rnd) % len(FORMS)].format(topic)
            system = SYSTEMS[i % len(SYSTEMS)]
            msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
            temp = 0 if i % 2 else 0.7
            async with sem:
                try:
                    if i % 3 == 0:
                        s = await ac.chat.completions.create(
                            model=MODEL, messages=msgs, max_tokens=16, temperature=temp, seed=i, stream=True,
                            stream_options={"include_usage": True},
                        )
                        usage, fin = None, None
                        async for c in s:
                            if c.usage:
                                usage = c.usage
                            if c.choices and c.choices[0].finish_reason:
                                fin = c.choices[0].finish_reason
                        assert usage and fin in ("stop", "length"), f"stream ended without usage/finish: {fin} {usage}"
                        tokens[0] += usage.completion_tokens
                    elif i % 3 == 1:
                        r = await ac.chat.completions.create(
                            model=MODEL, messages=msgs, max_tokens=16, temperature=temp, seed=i
                        )
                        assert r.choices[0].finish_reason in ("stop", "length"), r
                        tokens[0] += r.usage.completion_tokens
                    else:
                        r = await ac.completions.create(
                            model=MODEL, prompt=(system or "") + "\n" + prompt, max_tokens=16, temperature=temp, seed=i
                        )
                        assert r.choices[0].finish_reason in ("stop", "length"), r
                        tokens[0] += r.usage.completion_tokens
                except Exception as e:  # noqa: BLE001 (counted, reported)
                    errors.append(f"request {i}: {e!r}")

        t = time.monotonic()
        await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(total))), timeout=600)
        wall = time.monotonic() - t
        await ac.close()
        return errors, tokens[0], wall

    return asyncio.run(run())


def test_load():
    section("load: 3 rounds of 200 requests, 8 at a time")
    rounds = []
    s0 = proc_status()
    note("rss before load", f"VmRSS {s0['VmRSS'] / 1024:.1f} MiB, VmHWM {s0['VmHWM'] / 1024:.1f} MiB")
    for rnd in range(1, 4):
        errors, toks, wall = load_round(rnd)
        st = proc_status()
        m1 = metrics()
        rounds.append((st, toks, wall))
        assert not errors, f"round {rnd}: {len(errors)} errors, first: {errors[:3]}"
        note(
            f"round {rnd}",
            f"200 requests, 0 errors, {toks} tokens in {wall:.1f}s = {toks / wall:.1f} tok/s aggregate; "
            f"VmRSS {st['VmRSS'] / 1024:.1f} MiB, VmHWM {st['VmHWM'] / 1024:.1f} MiB",
        )
        assert m1["cairn_slots_busy"] == 0 and m1["cairn_queue_depth"] == 0, f"after round {rnd}: {m1}"
    h1, h3 = rounds[0][0]["VmHWM"], rounds[2][0]["VmHWM"]
    note("VmHWM growth round 1 -> 3", f"{(h3 - h1) / 1024:.2f} MiB")
    assert h3 <= h1 + 8 * 1024, f"VmHWM grew from {h1} KiB after round 1 to {h3} KiB after round 3 (> 8 MiB)"
    m = metrics()
    ttft_n = m["cairn_time_to_first_token_seconds_count"]
    note("ttft mean over the run", f"{m['cairn_time_to_first_token_seconds_sum'] / max(ttft_n, 1):.3f}s over {ttft_n:.0f}")


def test_metrics_shape():
    section("/metrics")
    m = metrics()
    for k in [
        "cairn_slots_busy",
        "cairn_slots",
        "cairn_queue_depth",
        "cairn_requests_cancelled_total",
        "cairn_generated_tokens_total",
        "cairn_prompt_tokens_total",
        "cairn_time_to_first_token_seconds_count",
        "cairn_time_to_first_token_seconds_sum",
        'cairn_time_to_first_token_seconds_bucket{le="+Inf"}',
        'cairn_requests_total{status="200"}',
        'cairn_requests_total{status="401"}',
    ]:
        assert k in m, f"/metrics lacks {k}"
    assert m["cairn_slots"] == EXPECT.get("slots", 8), m["cairn_slots"]
    b = [v for k, v in m.items() if k.startswith("cairn_time_to_first_token_seconds_bucket")]
    assert b == sorted(b), f"histogram buckets not cumulative: {b}"
    assert m['cairn_time_to_first_token_seconds_bucket{le="+Inf"}'] == m["cairn_time_to_first_token_seconds_count"]
    note("requests by status", {k[len("cairn_requests_total"):]: int(v) for k, v in m.items() if k.startswith("cairn_requests_total")})


SECTIONS = [
    test_models_health_auth,
    test_greedy_equals_cli,
    test_prefix_cache_determinism,
    test_tokenize,
    test_logprobs,
    test_logprobs_eval,
    test_echo,
    test_request_forms,
    test_stop,
    test_errors,
    test_concurrent_streams,
    test_disconnect,
    test_load,
    test_metrics_shape,
]


def main():
    """Every section runs (a failure does not hide the sections after it); the script
    fails at the end if any did. CAIRN_EXPECT "sections" picks a subset by name."""
    import sys
    import traceback

    only = EXPECT.get("sections")
    failed = []
    t0 = time.monotonic()
    for f in SECTIONS:
        name = f.__name__[len("test_"):]
        if only and name not in only and name != "models_health_auth":
            continue
        t = time.monotonic()
        try:
            f()
        except Exception as e:  # noqa: BLE001 (reported, then the run fails)
            traceback.print_exc()
            sys.stderr.flush()
            failed.append(f"{name}: {type(e).__name__}: {e}")
            print(f"  FAILED: {name}: {e}", flush=True)
        note(f"time {name}", f"{time.monotonic() - t:.1f}s")
    note("total", f"{time.monotonic() - t0:.1f}s")
    print_summary("cairn serve, main suite")
    if failed:
        print(f"\n{len(failed)} section(s) failed:")
        for x in failed:
            print(" - " + x)
        sys.exit(1)


if __name__ == "__main__":
    main()
