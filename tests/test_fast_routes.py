"""The direct route for POST /v1/completions and /v1/chat/completions (server/fast.py) answers
as FastAPI's router does: the same requests, good and bad, through a server with it and one
without (--no-fast-routes), the same statuses, headers, bodies, counters and OpenAPI
document."""

import json
import re

import httpx
import pytest

from server.middleware import Gate
from tests.chat_templates import CHATML_TOOLS

from .live import serve

KEY = {"Authorization": "Bearer sekrit"}
MSGS = [{"role": "user", "content": "Hi!"}]

# (method, path, json body or raw bytes, extra headers)
CASES = [
    ("POST", "/v1/completions", {"prompt": "hello", "max_tokens": 4, "temperature": 0}, {}),
    (
        "POST",
        "/v1/completions",
        {
            "prompt": [1, 2, 3],
            "max_tokens": 5,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
            "logprobs": 2,
        },
        {},
    ),
    ("POST", "/v1/completions", {"prompt": ["a b", "c"], "max_tokens": 3, "seed": 7, "n": 2}, {}),
    (
        "POST",
        "/v1/completions",
        {"prompt": "x", "max_tokens": 3, "echo": True, "stream": True, "seed": 1},
        {},
    ),
    ("POST", "/v1/completions", {"prompt": "hello", "max_tokens": -1}, {}),
    ("POST", "/v1/completions", {"max_tokens": 2}, {}),
    ("POST", "/v1/completions", {"prompt": 5, "temperature": "hot"}, {}),
    ("POST", "/v1/completions", {"prompt": "x", "stream": "yes"}, {}),
    ("POST", "/v1/completions", {"prompt": "x", "n": 0, "logprobs": 99}, {}),
    ("POST", "/v1/completions", {"prompt": "x", "model": "nope"}, {}),
    ("POST", "/v1/completions", {"prompt": "x", "max_tokens": 10**6}, {}),
    ("POST", "/v1/completions", {"prompt": "x", "bogus_field": 1, "seed": 1}, {}),
    ("POST", "/v1/completions", b"{not json", {}),
    ("POST", "/v1/completions", b"[1, 2]", {}),
    ("POST", "/v1/completions", b"", {}),
    ("POST", "/v1/completions", b"null", {}),
    ("POST", "/v1/completions", b'{"prompt": "\\ud800"}', {}),
    ("POST", "/v1/completions", b'{"prompt": "x"}', {"Content-Type": "text/plain"}),
    (
        "POST",
        "/v1/completions",
        b'{"prompt": "x", "max_tokens": 2, "seed": 3}',
        {"Content-Type": ""},
    ),
    (
        "POST",
        "/v1/completions",
        b'{"prompt": "x", "max_tokens": 2, "seed": 3}',
        {"Content-Type": "application/json; charset=utf-8"},
    ),
    ("POST", "/v1/completions", {"prompt": "x"}, {"Authorization": "Bearer wrong"}),
    ("GET", "/v1/completions", None, {}),
    ("POST", "/v1/completions/", {"prompt": "x", "max_tokens": 2}, {}),
    ("POST", "/v1/chat/completions", {"messages": MSGS, "max_tokens": 4, "temperature": 0}, {}),
    (
        "POST",
        "/v1/chat/completions",
        {"messages": MSGS, "max_tokens": 4, "temperature": 0, "stream": True, "logprobs": True},
        {},
    ),
    ("POST", "/v1/chat/completions", {"messages": [], "max_tokens": 2}, {}),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "nobody"}]}, {}),
    ("POST", "/v1/chat/completions", {"messages": MSGS, "model": "nope"}, {}),
    ("POST", "/v1/chat/completions", {"messages": MSGS, "top_logprobs": 3}, {}),
    ("POST", "/v1/chat/completions", b'{"messages": ', {}),
]

HEADERS = ("content-type", "content-length", "retry-after", "allow", "location")
VARYING = re.compile(r'"(id|created|system_fingerprint)": ?("[^"]*"|\d+)')


def exchange(url: str, method: str, path: str, body, headers: dict) -> tuple:
    kw = {"json": body} if isinstance(body, dict) else {"content": body}
    r = httpx.request(method, url + path, headers={**KEY, **headers}, timeout=60, **kw)
    # ids and creation times differ per request: the rest of each body, byte for byte
    text = VARYING.sub(r'"\1": _', r.text)
    kept = {h: r.headers.get(h, "").replace(url, "") for h in HEADERS if h != "content-length"}
    if not r.headers.get("content-type", "").startswith("text/event-stream"):
        kept["content-length"] = str(len(VARYING.sub(r'"\1": _', r.text).encode()))
    return r.status_code, kept, text


def counters(url: str) -> dict[str, float]:
    """Every counter and histogram count the server keeps about requests and errors."""
    out = {}
    for line in httpx.get(url + "/metrics").text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if line.startswith("#") or not name.endswith(("_total", "_count")):
            continue
        if any(w in name for w in ("request", "error", "token", "finished", "http")):
            out[line.rsplit(" ", 1)[0]] = float(line.rsplit(" ", 1)[1])
    return out


@pytest.fixture(scope="module")
def pair(tiny_ckpt, tmp_path_factory):
    template = tmp_path_factory.mktemp("fast") / "chat.jinja"
    template.write_text(CHATML_TOOLS)
    settings = dict(
        served_model_name=["tiny-ckpt0"],
        api_key="sekrit",
        max_num_seqs=4,
        chat_template=str(template),
    )
    with (
        serve(tiny_ckpt, **settings) as fast,
        serve(tiny_ckpt, fast_routes=False, **settings) as slow,
    ):
        yield fast, slow


def gate(app) -> Gate:
    layer = app.middleware_stack
    while not isinstance(layer, Gate):
        layer = layer.app
    return layer


def test_the_fast_route_is_taken(pair):
    fast, slow = pair
    assert set(gate(fast.app).routes) == {"/v1/completions", "/v1/chat/completions"}
    assert gate(slow.app).routes == {}


@pytest.mark.parametrize("case", range(len(CASES)))
def test_both_routes_answer_alike(pair, case):
    fast, slow = pair
    method, path, body, headers = CASES[case]
    a = exchange(fast.url, method, path, body, headers)
    b = exchange(slow.url, method, path, body, headers)
    assert a == b


def test_the_same_counters_and_document(pair):
    fast, slow = pair
    for method, path, body, headers in CASES[:12]:  # a second round: both counted alike
        exchange(fast.url, method, path, body, headers)
        exchange(slow.url, method, path, body, headers)
    a, b = counters(fast.url), counters(slow.url)
    assert a == b and any("error" in k for k in a)
    doc = httpx.get(fast.url + "/openapi.json").json()
    assert doc == httpx.get(slow.url + "/openapi.json").json()
    assert "/v1/completions" in doc["paths"] and json.dumps(doc)
