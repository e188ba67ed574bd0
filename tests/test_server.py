"""The server end to end: real uvicorn on loopback, the official openai client, raw HTTP."""

import concurrent.futures as cf
import json
import time

import httpx
import openai
import pytest

from offload.paths import default_placement, resolve_device, resolve_gather

from .live import LiveServer, serve

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _model(client):
    return client.models.list().data[0].id


def test_models_health_version(srv, client):
    models = client.models.list().data
    assert len(models) == 1 and models[0].id == "tiny-ckpt0"
    assert httpx.get(srv.url + "/health").json() == {"status": "ok"}
    assert httpx.get(srv.url + "/version").json()["version"]


def test_stream_equals_non_stream_for_the_same_seed(client):
    args = dict(model=_model(client), prompt="def __init__(self", max_tokens=24, temperature=1.0)
    full = client.completions.create(**args, seed=7)
    again = client.completions.create(**args, seed=7)
    assert full.choices[0].text == again.choices[0].text
    chunks = list(client.completions.create(**args, seed=7, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason == "length"
    assert full.usage.completion_tokens == 24


def test_n_choices_and_list_prompts(client):
    r = client.completions.create(
        model=_model(client), prompt=["import os", "class A:"], n=3, max_tokens=6, seed=4
    )
    assert sorted(c.index for c in r.choices) == list(range(6))
    assert all(c.finish_reason == "length" for c in r.choices)
    assert r.usage.completion_tokens == 36


def test_stop_string_across_tokens_is_not_included(client):
    m = _model(client)
    base = client.completions.create(model=m, prompt="def f(x):", max_tokens=30, temperature=0)
    text = base.choices[0].text
    stop = text[5:9]  # most likely spans a token boundary
    assert len(stop) == 4
    r = client.completions.create(
        model=m, prompt="def f(x):", max_tokens=30, temperature=0, stop=[stop]
    )
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == text[: text.find(stop)]
    streamed = client.completions.create(
        model=m, prompt="def f(x):", max_tokens=30, temperature=0, stop=stop, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == r.choices[0].text


def test_logprobs_and_echo(client, srv):
    m = _model(client)
    r = client.completions.create(
        model=m, prompt="x = 1", max_tokens=4, temperature=0, logprobs=3, echo=True
    )
    c = r.choices[0]
    assert c.text.startswith("x = 1")
    lp = c.logprobs
    n_prompt = r.usage.prompt_tokens
    assert len(lp.tokens) == n_prompt + 4 and lp.token_logprobs[0] is None
    assert all(v <= 0 for v in lp.token_logprobs[1:])
    assert "".join(lp.tokens) == c.text
    # greedy: each generated token is the top alternative
    for tok, top, v in zip(
        lp.tokens[n_prompt:], lp.top_logprobs[n_prompt:], lp.token_logprobs[n_prompt:]
    ):
        assert len(top) == 3 and max(top.values()) == pytest.approx(v, abs=1e-5) and tok in top
    assert lp.text_offset[0] == 0 and lp.text_offset[n_prompt] == len("x = 1")


def test_include_usage_and_token_id_prompts(client):
    m = _model(client)
    chunks = list(
        client.completions.create(
            model=m,
            prompt=[5, 6, 7],
            max_tokens=3,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},  # sampled: the tiny random model may draw EOS
        )
    )
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == 3
    assert chunks[-1].usage.completion_tokens == 3
    r = client.completions.create(model=m, prompt=[[5, 6, 7], [8, 9]], max_tokens=2, temperature=0)
    assert len(r.choices) == 2 and r.usage.prompt_tokens == 5
    one = client.completions.create(model=m, prompt=[8, 9], max_tokens=2, temperature=0)
    assert r.choices[1].text == one.choices[0].text


def _post(srv, body, **kw):
    return httpx.post(srv.url + "/v1/completions", json=body, timeout=30, **kw)


def _assert_error(r, status, *needles):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    for n in needles:
        assert n in err["message"]
    return err


def test_validation_errors_are_400_in_openai_shape(srv):
    _assert_error(_post(srv, {"prompt": "x", "temperature": 5}), 400, "temperature")
    _assert_error(_post(srv, {"prompt": "x", "max_tokens": 0}), 400, "max_tokens")
    _assert_error(_post(srv, {"prompt": ""}), 400, "prompt")
    _assert_error(_post(srv, {"max_tokens": 3}), 400, "prompt")
    _assert_error(_post(srv, {"prompt": [999999]}), 400, "outside the vocab")
    r = httpx.post(srv.url + "/v1/completions", content=b"{not json", timeout=10)
    _assert_error(r, 400)
    r = httpx.post(
        srv.url + "/v1/completions",
        content=b'{"prompt": "x",',
        headers={"content-type": "application/json"},
        timeout=10,
    )
    assert _assert_error(r, 400, "not valid JSON", "at character")["param"] is None
    r = httpx.get(srv.url + "/v1/completions", timeout=10)
    assert _assert_error(r, 405)["type"] == "invalid_request_error"
    # unknown fields are ignored
    assert _post(srv, {"prompt": "x", "max_tokens": 1, "frobnicate": True}).status_code == 200


def test_context_limit_names_both_numbers(srv):
    err = _assert_error(_post(srv, {"prompt": "x = 1", "max_tokens": 600}), 400, "512", "600")
    assert err["code"] == "context_length_exceeded" and err["param"] == "max_tokens"


def test_unknown_model_is_404(srv, client):
    err = _assert_error(_post(srv, {"prompt": "x", "model": "gpt-9"}), 404, "gpt-9")
    assert err["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-9", prompt="x", max_tokens=1)


def test_body_size_limit(tiny_ckpt):
    with serve(tiny_ckpt, max_body_bytes=200) as s:
        _assert_error(_post(s, {"prompt": "x" * 500}), 413, "200 bytes")

        def chunked():
            yield b'{"prompt": "'
            yield b"y" * 400
            yield b'"}'

        r = httpx.post(s.url + "/v1/completions", content=chunked(), timeout=10)
        _assert_error(r, 413)
        assert _post(s, {"prompt": "ok", "max_tokens": 1}).status_code == 200


def test_api_key(tiny_ckpt):
    with serve(tiny_ckpt, served_model_name=["tiny-ckpt0"], api_key="sekrit") as s:
        _assert_error(_post(s, {"prompt": "x", "max_tokens": 1}), 401, "API key")
        r = _post(s, {"prompt": "x", "max_tokens": 1}, headers={"Authorization": "Bearer nope"})
        _assert_error(r, 401)
        bad = openai.OpenAI(base_url=s.url + "/v1", api_key="nope", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        good = openai.OpenAI(base_url=s.url + "/v1", api_key="sekrit", max_retries=0)
        assert good.completions.create(model="tiny-ckpt0", prompt="x", max_tokens=1).choices
        assert httpx.get(s.url + "/health").status_code == 200  # not behind the key


def test_queue_full_is_429_with_retry_after(tiny_ckpt):
    with serve(tiny_ckpt, max_num_seqs=1, max_queue=1) as s:
        long = {"prompt": "a", "max_tokens": 400, "temperature": 0}
        with cf.ThreadPoolExecutor(2) as pool:
            first = pool.submit(_post, s, long)
            time.sleep(0.3)
            second = pool.submit(_post, s, long)
            deadline = time.monotonic() + 10
            while s.metric("engram_num_requests_waiting") < 1 and time.monotonic() < deadline:
                time.sleep(0.02)
            r = _post(s, long)
            err = _assert_error(r, 429, "retry", "--max-queue 1")
            assert r.headers["retry-after"] == "1" and err["code"] == "queue_full"
            assert first.result().status_code == 200 and second.result().status_code == 200


def test_engine_fault_is_500_and_the_server_keeps_serving(srv):
    engine = srv.state.engine
    real = engine.engine.runner.step
    calls = {"n": 0}

    def boom(*a, **k):
        calls["n"] += 1
        raise RuntimeError("injected engine fault")

    engine.engine.runner.step = boom
    try:
        err = _assert_error(
            _post(srv, {"prompt": "x", "max_tokens": 3}), 500, "injected engine fault"
        )
        assert err["type"] == "server_error"
    finally:
        engine.engine.runner.step = real
    assert calls["n"] >= 1
    assert _post(srv, {"prompt": "x", "max_tokens": 3}).status_code == 200
    assert srv.metric("engram_num_requests_running") == 0


def test_disconnect_mid_stream_frees_the_slot(srv):
    body = {"prompt": "def", "max_tokens": 400, "stream": True, "temperature": 0}
    before = srv.state.engine.cache.free_blocks
    with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(3)]
        assert any(x.startswith("data: ") for x in got)
        assert srv.metric("engram_num_requests_running") == 1
    deadline = time.monotonic() + 10
    while srv.metric("engram_num_requests_running") and time.monotonic() < deadline:
        time.sleep(0.02)
    assert srv.metric("engram_num_requests_running") == 0
    assert srv.state.engine.cache.free_blocks == before
    assert _post(srv, {"prompt": "x", "max_tokens": 2}).status_code == 200


def test_disconnect_non_streaming_frees_the_slot(srv):
    engine = srv.state.engine
    before = engine.cache.free_blocks
    real = engine.engine.runner.step

    def slow(*a, **k):  # every step takes a while: the client gives up first
        time.sleep(0.02)
        return real(*a, **k)

    engine.engine.runner.step = slow
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(
                srv.url + "/v1/completions",
                json={"prompt": "a", "max_tokens": 450, "temperature": 0},
                timeout=0.5,
            )
        deadline = time.monotonic() + 10
        while srv.metric("engram_num_requests_running") and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        engine.engine.runner.step = real
    assert srv.metric("engram_num_requests_running") == 0
    assert engine.cache.free_blocks == before
    assert srv.metric("engram_request_success_total", 'finished_reason="abort"') >= 1


def test_32_concurrent_clients_match_sequential_greedy(srv, client):
    m = _model(client)
    prompts = [f"def f{i}(x):\n    return" for i in range(32)]
    seq = [
        client.completions.create(model=m, prompt=p, max_tokens=12, temperature=0).choices[0].text
        for p in prompts
    ]
    with cf.ThreadPoolExecutor(32) as pool:
        futs = [
            pool.submit(client.completions.create, model=m, prompt=p, max_tokens=12, temperature=0)
            for p in prompts
        ]
        par = [f.result().choices[0].text for f in futs]
    assert par == seq


METRIC_NAMES = [
    "engram_num_requests_running",
    "engram_num_requests_waiting",
    "engram_kv_cache_usage_perc",
    "engram_time_to_first_token_seconds_count",
    "engram_inter_token_latency_seconds_count",
    "engram_e2e_request_latency_seconds_count",
    "engram_request_queue_time_seconds_count",
    "engram_prompt_tokens_total",
    "engram_generation_tokens_total",
    "engram_request_success_total",
    "engram_offload_bytes_total",
    "engram_offload_rows_total",
    "engram_offload_unique_rows_total",
    "engram_offload_cache_hits_total",
    "engram_offload_cache_misses_total",
    "engram_offload_prefetch_duration_seconds_count",
    "engram_offload_stall_seconds_total",
    "engram_offload_slack_seconds_total",
    "engram_offload_steps_total",
    "engram_offload_step_seconds_total",
    "engram_offload_stall_fraction",
    "engram_offload_table_bytes",
    "engram_offload_link_bandwidth_bytes_per_second",
]


def test_metrics_expose_every_name_with_sane_values(srv):
    assert _post(srv, {"prompt": "import sys", "max_tokens": 5}).status_code == 200
    text = httpx.get(srv.url + "/metrics").text
    for name in METRIC_NAMES:
        assert any(line.startswith(name) for line in text.splitlines()), name
        assert 'model_name="tiny-ckpt0"' in text
    assert srv.metric("engram_generation_tokens_total") >= 5
    assert srv.metric("engram_offload_bytes_total") > 0
    assert srv.metric("engram_offload_rows_total") >= srv.metric(
        "engram_offload_cache_misses_total"
    )
    assert 0 <= srv.metric("engram_offload_stall_fraction") <= 1
    assert srv.metric("engram_offload_table_bytes") > 0
    assert srv.metric("engram_offload_link_bandwidth_bytes_per_second") > 0
    info = httpx.get(srv.url + "/v1/offload").json()
    placement = default_placement(resolve_device(None))  # the server's default on this machine
    assert info["placement"] == placement.value
    assert info["gather"] == resolve_gather(placement, "auto")
    assert info["accounting"]["steps"] > 0 and json.dumps(info)
    tables = info["tables"]  # which row format and memory the tables got
    assert tables["placement"] == "cpu" and tables["row_formats"] and tables["memory"]
    assert tables["bytes"] == info["table_bytes"]["cpu"]


def test_health_is_503_until_the_model_loads(tmp_path):
    from server.config import ServerConfig

    s = LiveServer(ServerConfig.make(model=str(tmp_path / "missing"))).start(ready=False)
    try:
        deadline = time.monotonic() + 10
        while s.state.load_error is None and time.monotonic() < deadline:
            time.sleep(0.05)
        r = httpx.get(s.url + "/health")
        assert r.status_code == 503 and "does not exist" in r.json()["error"]
        _assert_error(_post(s, {"prompt": "x"}), 503, "does not exist")
    finally:
        s.stop()


def test_small_kv_pool_preempts_and_recomputes_without_changing_tokens(tiny_ckpt, client):
    m = _model(client)
    prompts = [f"import mod{i}\n" * 3 for i in range(4)]
    expect = [
        client.completions.create(model=m, prompt=p, max_tokens=90, temperature=0).choices[0].text
        for p in prompts
    ]
    # 12 blocks x 16 tokens: four ~110-token sequences cannot all hold their KV at once
    with serve(
        tiny_ckpt, served_model_name=[m], kv_blocks=12, max_num_seqs=4, max_num_batched_tokens=32
    ) as s:
        small = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0)
        with cf.ThreadPoolExecutor(4) as pool:
            futs = [
                pool.submit(
                    small.completions.create, model=m, prompt=p, max_tokens=90, temperature=0
                )
                for p in prompts
            ]
            got = [f.result().choices[0].text for f in futs]
        assert got == expect
        assert s.metric("engram_num_preemptions_total") > 0
        assert s.state.engine.cache.free_blocks == 12
        _assert_error(_post(s, {"prompt": "x", "max_tokens": 250}), 400, "192")


def test_fp8_rows_quantised_at_load_serve_and_halve_the_bytes(tiny_ckpt):
    with serve(tiny_ckpt, row_format="fp8", max_num_seqs=2) as s:
        r = _post(s, {"prompt": "import sys", "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200 and r.json()["choices"][0]["text"]
        info = httpx.get(s.url + "/v1/offload").json()
    assert info["tables"]["row_formats"] == ["fp8"]
    rows = sum(v["rows_per_step"] for v in info["accounting"]["layers"].values())
    moved = sum(v["bytes_per_step"] for v in info["accounting"]["layers"].values())
    assert moved == rows * 9  # 8 fp8 values + 1 scale byte per row, instead of 32 bytes (f32)
