"""``engram-serve --engine-process``: the engine in a process of its own behind the HTTP front
(the data-parallel front with one engine), its deltas one ZeroMQ message per step. Answers
are the in-process server's, token for token, logprobs included; a step message carries a
choice's prompt logprobs once and forgets a request once all its choices have ended."""

from __future__ import annotations

import httpx
import openai

from engine.async_engine import Delta, RequestStream
from engine.sampling import SamplingParams, TokenLogprobs
from server.dp_engine import Routes
from server.dp_messages import entry_delta, pack, unpack
from tests.live import serve

PROMPTS = ["def main(", "import os\n", "class Config:"]


def _answers(url: str) -> list:
    out = []
    for p in PROMPTS:
        body = {"prompt": p, "max_tokens": 10, "temperature": 0, "logprobs": 2, "n": 2}
        body |= {"prompt_logprobs": 1, "seed": 3}
        r = httpx.post(url + "/v1/completions", json=body, timeout=300).json()
        out.append([(c["text"], c["logprobs"], c["prompt_logprobs"]) for c in r["choices"]])
    client = openai.OpenAI(base_url=url + "/v1", api_key="none")
    stream = client.completions.create(
        model=client.models.list().data[0].id,
        prompt=PROMPTS[0],
        max_tokens=12,
        temperature=0,
        stream=True,
    )
    out.append("".join(c.choices[0].text for c in stream if c.choices))
    return out


def test_answers_equal_the_in_process_servers():
    from models.checkpoint import default_model_dir

    with serve(default_model_dir(), engine_process=True) as srv:
        health = httpx.get(srv.url + "/health", timeout=5).json()
        assert [e["engine"] for e in health["engines"]] == [0]
        got = _answers(srv.url)
    with serve(default_model_dir()) as single:
        want = _answers(single.url)
    assert got == want
    assert got[0][0][1]["tokens"] and got[0][0][2]  # logprobs and prompt logprobs came over


def test_memories_are_refused_with_an_engine_process(capsys, tmp_path):
    from server.cli import main

    assert main(["--engine-process", "--memories", f"m={tmp_path}"]) == 1
    assert "not supported with engine processes" in capsys.readouterr().err


def test_a_step_message_round_trips_and_sends_prompt_logprobs_once():
    routes = Routes()
    stream = RequestStream("s1", [1, 2], SamplingParams(n=2), None)
    plp = [None, TokenLogprobs(2, -0.5, [(2, -0.5), (7, -1.0)], 1)]
    stream.seqs = [type("Seq", (), {"prompt_logprobs": plp})() for _ in range(2)]
    routes.add("front-1", stream)
    lp = TokenLogprobs(5, -0.25, [(5, -0.25)])
    first = [(stream, Delta(0, "a", [5], [lp])), (stream, Delta(1, "b", [6]))]
    got = [entry_delta(e) for e in unpack(pack(routes.message(first)))["deltas"]]
    assert [(rid, d) for rid, d, _ in got] == [("front-1", d) for _, d in first]
    assert got[0][2] == plp and got[1][2] == plp  # each choice's, with its first delta
    again = routes.message([(stream, Delta(0, "c", [7], finish_reason="length"))])
    assert entry_delta(again["deltas"][0])[2] is None  # not twice
    assert "front-1" in routes.stream_of  # choice 1 is still open
    routes.message([(stream, Delta(1, "", [], finish_reason="stop"))])
    assert routes.stream_of == {} and routes.by_stream == {}
    assert routes.message([(stream, Delta(0, "late"))])["deltas"] == []


def test_an_error_delta_keeps_its_fields():
    routes = Routes()
    stream = RequestStream("s2", [1], SamplingParams(), None)
    routes.add("f", stream)
    d = Delta(0, finish_reason="error", error="engine error: boom", bad_params=True)
    ((rid, back, _),) = [entry_delta(e) for e in routes.message([(stream, d)])["deltas"]]
    assert (rid, back) == ("f", d)


def test_a_client_gone_mid_stream_frees_its_sequences():
    """The engine sends nothing for an aborted request: the front forgets it when it sends
    the abort, so the engine's open work goes back to 0 (not left counted until the queue is
    full) and the next requests are served."""
    import time

    from models.checkpoint import default_model_dir

    with serve(default_model_dir(), engine_process=True) as srv:
        body = {"prompt": "def main(", "max_tokens": 400, "stream": True, "ignore_eos": True}
        for _ in range(3):
            with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=60) as r:
                lines = r.iter_lines()
                assert next(lines).startswith("data: ")  # streaming: then the client goes
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if httpx.get(srv.url + "/health").json()["engines"][0]["open_sequences"] == 0:
                break
            time.sleep(0.2)
        assert httpx.get(srv.url + "/health").json()["engines"][0]["open_sequences"] == 0
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2})
        assert r.status_code == 200 and r.json()["choices"][0]["text"]
