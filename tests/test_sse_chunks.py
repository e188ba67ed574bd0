"""Streamed chunks written from templates are the bytes json.dumps writes for their bodies,
and a step's events may arrive together in one write (the client sees the same events)."""

import asyncio
import json
import time

import httpx
import pytest

from engine.async_engine import RequestStream
from engine.sampling import SamplingParams
from server.completions import GONE, Completion

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


def _wait_idle(srv, free_before: int) -> None:
    deadline = time.monotonic() + 10
    while srv.metric("engram_num_requests_running") and time.monotonic() < deadline:
        time.sleep(0.02)
    assert srv.metric("engram_num_requests_running") == 0
    assert srv.state.engine.cache.free_blocks == free_before


@pytest.mark.parametrize(
    "path, body",
    [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
        ("/v1/completions", {"prompt": ["def", "import"], "n": 2}),  # several queues read
    ],
)
def test_a_client_gone_mid_stream_aborts_its_sequences(srv, path, body):
    """No listener task beside the stream: the disconnect still reaches the engine, every
    sequence of the request is aborted and its KV blocks freed; the server serves on."""
    model = httpx.get(srv.url + "/v1/models").json()["data"][0]["id"]
    body = {**body, "model": model, "max_tokens": 400, "temperature": 0, "stream": True}
    before = srv.state.engine.cache.free_blocks
    aborted = srv.metric("engram_request_success_total", 'finished_reason="abort"')
    with httpx.stream("POST", srv.url + path, json=body, timeout=30) as r:
        assert r.headers["content-type"] == "text/event-stream; charset=utf-8"
        lines = r.iter_lines()
        assert any(next(lines).startswith("data: ") for _ in range(3))
        assert srv.metric("engram_num_requests_running") >= 1
    _wait_idle(srv, before)
    seqs = len(body.get("prompt", [0])) * body.get("n", 1)  # ended by the abort, not their length
    assert srv.metric("engram_request_success_total", 'finished_reason="abort"') == aborted + seqs
    events = _events(srv, path, {**body, "max_tokens": 3})
    assert json.loads(events[-1])["choices"]


def test_a_client_gone_wakes_its_stream_even_when_the_abort_raises():
    """Completion.gone runs as the disconnect listener's callback: an abort that raises (a
    data-parallel link gone, say) still puts GONE on every queue, so the request task reading
    them ends instead of waiting forever."""
    loop = asyncio.new_event_loop()

    class BrokenLink:
        def abort(self, request_id):
            raise ConnectionError("link to replica 1 closed")

    done = Completion.__new__(Completion)  # only what gone() reads
    done.engine = BrokenLink()
    done.subs = [RequestStream(f"r{i}", [1], SamplingParams(), loop) for i in range(2)]
    with pytest.raises(ConnectionError):
        done.gone()
    assert [sub.queue.get_nowait() for sub in done.subs] == [GONE, GONE]
    loop.close()


@pytest.fixture(scope="module")
def grouped(tiny_ckpt, tmp_path_factory):
    template = tmp_path_factory.mktemp("sse-grouped") / "chat.jinja"
    template.write_text(TEMPLATE)
    with serve(tiny_ckpt, max_num_seqs=8, chat_template=str(template), stream_interval=4) as s:
        yield s


def test_stream_interval_sends_tokens_in_groups_and_loses_none(grouped):
    """--stream-interval 4 over real HTTP: per choice the first token alone, then groups of
    four, the finishing chunk with the rest; the streamed text and usage are the
    non-streamed answer's."""
    model = httpx.get(grouped.url + "/v1/models").json()["data"][0]["id"]
    body = {"model": model, "prompt": "def f(x):", "max_tokens": 11, "temperature": 0,
            "ignore_eos": True, "n": 2, "logprobs": 1}  # fmt: skip
    whole = httpx.post(grouped.url + "/v1/completions", json=body, timeout=60).json()
    opts = {"stream": True, "stream_options": {"include_usage": True}}
    events = [json.loads(e) for e in _events(grouped, "/v1/completions", {**body, **opts})]
    for c in whole["choices"]:
        mine = [x for e in events for x in e["choices"] if x["index"] == c["index"]]
        assert [len(x["logprobs"]["tokens"]) for x in mine] == [1, 4, 4, 2]
        assert [x["finish_reason"] for x in mine] == [None, None, None, "length"]
        assert "".join(x["text"] for x in mine) == c["text"]
    assert events[-1]["usage"] == whole["usage"]


def test_stream_interval_groups_chat_chunks_for_the_openai_client(grouped):
    import openai

    client = openai.OpenAI(base_url=grouped.url + "/v1", api_key="unused", max_retries=0)
    model = client.models.list().data[0].id
    ask = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 9,
           "temperature": 0, "extra_body": {"ignore_eos": True}}  # fmt: skip
    whole = client.chat.completions.create(**ask)
    chunks = list(client.chat.completions.create(**ask, stream=True))
    content = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(content) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert len(chunks) <= 1 + 3 + 1  # the role's, 1 + 4 + 4 tokens in three, one more at most
