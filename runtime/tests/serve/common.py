"""Helpers shared by the `cairn serve` end-to-end scripts (run by runtime/tests/serve.rs).

The harness starts the server and passes, in the environment:
  BASE_URL    http://127.0.0.1:PORT (no /v1)
  API_KEY     the server's key ("" when it has none)
  SERVER_PID  the server's process id (for /proc/PID/status)
  CAIRN_EXPECT  JSON of reference outputs the harness computed with the `cairn` CLI
Only the standard library and the official `openai` client are used; raw HTTP (headers,
bad bodies, SSE lines) goes through http.client.
"""

import http.client
import json
import os
import re
import sys
import time
import urllib.parse

import openai

BASE_URL = os.environ["BASE_URL"].rstrip("/")
API_KEY = os.environ.get("API_KEY", "")
SERVER_PID = int(os.environ.get("SERVER_PID", "0"))
EXPECT = json.loads(os.environ.get("CAIRN_EXPECT", "{}"))

_u = urllib.parse.urlparse(BASE_URL)
HOST, PORT = _u.hostname, _u.port

# Every request of the scripts has a bound; the client never retries (a retry would hide
# a 503 or a dropped connection).
TIMEOUT = 60.0

SUMMARY = []


def note(key, value):
    """Record a measurement for the closing summary (and print it now)."""
    SUMMARY.append((key, value))
    print(f"  {key}: {value}", flush=True)


def print_summary(title):
    print(f"\n=== {title}: summary ===")
    for k, v in SUMMARY:
        print(f"{k}: {v}")
    sys.stdout.flush()


def client(key=None, **kw):
    # The client insists on a key; a server without one ignores whatever it is sent.
    return openai.OpenAI(
        base_url=BASE_URL + "/v1",
        api_key=(API_KEY if key is None else key) or "no-key",
        max_retries=0,
        timeout=kw.pop("timeout", TIMEOUT),
        **kw,
    )


def async_client(**kw):
    return openai.AsyncOpenAI(
        base_url=BASE_URL + "/v1", api_key=API_KEY or "no-key", max_retries=0, timeout=kw.pop("timeout", TIMEOUT), **kw
    )


def auth_headers(key=None):
    key = API_KEY if key is None else key
    return {"Authorization": f"Bearer {key}"} if key else {}


class Raw:
    """An HTTP answer read whole: status, headers (lower-cased names), body bytes."""

    def __init__(self, status, headers, body):
        self.status, self.headers, self.body = status, headers, body

    def json(self):
        return json.loads(self.body)

    def __repr__(self):
        return f"HTTP {self.status} {self.body[:400]!r}"


def raw(method, path, body=None, headers=None, key=None, timeout=TIMEOUT):
    """One request on a fresh connection. `body`: bytes, str, or JSON-able."""
    h = {"Connection": "close"}
    h.update(auth_headers(key))
    if body is not None and not isinstance(body, (bytes, str)):
        body = json.dumps(body)
        h["Content-Type"] = "application/json"
    if isinstance(body, str):
        body = body.encode()
    h.update(headers or {})
    c = http.client.HTTPConnection(HOST, PORT, timeout=timeout)
    try:
        c.request(method, path, body=body, headers=h)
        r = c.getresponse()
        return Raw(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
    finally:
        c.close()


def post(path, body, **kw):
    return raw("POST", path, body, **kw)


class SseStream:
    """A streamed generation read line by line over http.client: every `data:` payload
    as it comes (`[DONE]` as the string), so that a script can stop part-way."""

    def __init__(self, path, body, key=None, timeout=TIMEOUT):
        body = dict(body, stream=True)
        h = {"Content-Type": "application/json", **auth_headers(key)}
        self.conn = http.client.HTTPConnection(HOST, PORT, timeout=timeout)
        self.conn.request("POST", path, body=json.dumps(body).encode(), headers=h)
        self.resp = self.conn.getresponse()
        self.status = self.resp.status
        self.done = False

    def events(self):
        """Yields the parsed JSON of each `data:` line, and "[DONE]" last."""
        while True:
            line = self.resp.readline()
            if not line:
                return
            line = line.decode().rstrip("\r\n")
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                self.done = True
                yield "[DONE]"
                return
            yield json.loads(data)

    def close(self):
        self.conn.close()


def error_of(r):
    """The {"error": {...}} of a raw answer, checked for OpenAI's shape."""
    v = r.json()
    assert isinstance(v, dict) and set(v) == {"error"}, f"error body is not {{'error': ...}}: {r}"
    e = v["error"]
    assert set(e) == {"message", "type", "param", "code"}, f"error keys {sorted(e)} != message/type/param/code: {r}"
    assert isinstance(e["message"], str) and e["message"], f"empty error message: {r}"
    assert isinstance(e["type"], str), f"error type is not a string: {r}"
    return e


def metrics():
    """GET /metrics parsed: {"name{labels}": value}."""
    r = raw("GET", "/metrics")
    assert r.status == 200, f"/metrics: {r}"
    out = {}
    for line in r.body.decode().splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r"^(\S+)\s+(\S+)$", line)
        assert m, f"/metrics line not in Prometheus text form: {line!r}"
        out[m.group(1)] = float(m.group(2))
    return out


def proc_status():
    """VmHWM and VmRSS of the server, in KiB."""
    out = {}
    with open(f"/proc/{SERVER_PID}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmHWM", "VmRSS"):
                out[k] = int(v.split()[0])
    return out


def wait_until(pred, timeout, what, step=0.05):
    """Poll `pred` until true; fail after `timeout` seconds naming `what`."""
    t = time.monotonic()
    last = None
    while time.monotonic() - t < timeout:
        last = pred()
        if last:
            return last
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def model_id():
    ms = client().models.list().data
    assert len(ms) == 1, f"expected one model, got {ms}"
    return ms[0].id
