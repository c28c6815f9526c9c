"""SIGTERM while a stream runs (run by runtime/tests/serve.rs, which sends the signal when
this script prints "@@SIGTERM").

CAIRN_EXPECT mode:
  drain     the stream (well within --drain) completes: finish_reason and [DONE]; new
            connections are refused as soon as the signal lands.
  deadline  the stream outlasts --drain: it is cut when the server exits at the deadline.
"""

import socket
import sys
import time

from common import EXPECT, HOST, PORT, SseStream, client, model_id, note, print_summary, wait_until

MODE = EXPECT["mode"]
MODEL = model_id()


def refused():
    s = socket.socket()
    s.settimeout(1)
    try:
        s.connect((HOST, PORT))
        return False
    except (ConnectionRefusedError, socket.timeout, OSError):
        return True
    finally:
        s.close()


def main():
    t0 = time.monotonic()
    # Warm: a request answered before the signal.
    r = client().chat.completions.create(model=MODEL, max_tokens=4, messages=[{"role": "user", "content": "Hi."}])
    assert r.choices[0].finish_reason in ("stop", "length"), r
    tokens = 300 if MODE == "drain" else 1000
    s = SseStream("/v1/completions", {
        "model": MODEL, "prompt": "Once upon a time, in a small village by the sea,", "max_tokens": tokens,
        "temperature": 0,
    }, timeout=60)
    assert s.status == 200, s.status
    ev = s.events()
    before = 0
    for e in ev:
        assert e != "[DONE]", "the stream ended before the signal"
        if e["choices"] and e["choices"][0]["text"]:
            before += 1
        if before >= 5:
            break
    t_sig = time.monotonic()
    print("@@SIGTERM", flush=True)
    # The listener closes at once; the running stream goes on.
    wait_until(refused, 5, "new connections to be refused after SIGTERM")
    t_refused = time.monotonic() - t_sig
    text, finish, done, after, err = "", None, False, 0, None
    try:
        for e in ev:
            if e == "[DONE]":
                done = True
                break
            assert "error" not in e, f"the stream got an error event after SIGTERM: {e}"
            ch = e["choices"][0]
            text += ch["text"]
            finish = ch.get("finish_reason") or finish
            if ch["text"]:
                after += 1
    except Exception as x:  # noqa: BLE001 (a cut connection, in deadline mode)
        err = x
    t_end = time.monotonic() - t_sig
    s.close()
    if MODE == "drain":
        assert err is None, f"the stream broke after SIGTERM: {err!r}"
        assert done, "the stream ended without [DONE] after SIGTERM"
        assert finish in ("stop", "length"), f"no finish_reason after SIGTERM: {finish!r}"
        assert t_end > 0.3, f"the stream ended {t_end:.2f}s after the signal: it was not mid-way"
        assert refused(), "a new connection was accepted while draining"
        note("drain", f"{before} chunks before SIGTERM, {after} after; refused new connections {t_refused:.2f}s after; "
             f"stream done {t_end:.2f}s after (finish {finish}, [DONE])")
    else:
        assert not done, "a stream longer than --drain finished: the deadline did not cut it"
        assert t_end < 10, f"the cut stream ended {t_end:.2f}s after SIGTERM"
        note("deadline", f"{before} chunks before SIGTERM, {after} after; stream cut {t_end:.2f}s after "
             f"({type(err).__name__ if err else 'EOF'})")
    note("total", f"{time.monotonic() - t0:.1f}s")
    print_summary(f"cairn serve, SIGTERM ({MODE})")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
