"""Streamed chunks written from templates are the bytes json.dumps writes for their bodies,
and a step's events may arrive together in one write (the client sees the same events)."""

import json

import httpx
import pytest

from .live import serve

TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def srv(tiny_ckpt, tmp_path_factory):
    template = tmp_path_factory.mktemp("sse") / "chat.jinja"
    template.write_text(TEMPLATE)
    with serve(tiny_ckpt, max_num_seqs=8, chat_template=str(template)) as s:
        yield s


def _events(srv, path: str, body: dict) -> list[str]:
    with httpx.stream("POST", srv.url + path, json=body, timeout=60) as r:
        assert r.status_code == 200
        text = "".join(r.iter_text())
    assert text.endswith("data: [DONE]\n\n")
    return [e.removeprefix("data: ") for e in text.split("\n\n") if e][:-1]


@pytest.mark.parametrize(
    "path, body",
    [
        ("/v1/completions", {"prompt": 'déjà "vu" \\ ✓', "n": 2}),
        ("/v1/completions", {"prompt": "def f(x):", "stop": ["\n"]}),
        ("/v1/completions", {"prompt": "def", "logprobs": 1, "echo": True}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi ✓"}], "n": 2}),
    ],
)
def test_streamed_chunks_are_json_dumps_bytes(srv, path, body):
    model = httpx.get(srv.url + "/v1/models").json()["data"][0]["id"]
    body = {**body, "model": model, "max_tokens": 12, "temperature": 0, "stream": True}
    events = _events(srv, path, body)
    assert events
    for e in events:
        assert e == json.dumps(json.loads(e))  # what json.dumps of the parsed body gives
    finishes = [c["finish_reason"] for e in events for c in json.loads(e)["choices"]]
    assert finishes.count(None) < len(finishes)
    assert len([f for f in finishes if f]) == body.get("n", 1)
