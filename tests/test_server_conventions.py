"""vLLM's conventions and the edges of the HTTP surface: the API key checked before any body
is read, /v1 paths guarded; HEAD probes; bodies without a Content-Type; vllm:* metrics from the
same observations as engram_* ones; process collectors; repetition_penalty and the sampling
fields the server refuses; limits named by field and flag; the document agreeing with the
server on the cases a fuzzer found."""

import socket
import time
from urllib.parse import urlsplit

import httpx
import jsonschema_rs
import pytest

from .live import serve


def _err(r, status: int, param=None, *needles: str) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param, err
    for n in needles:
        assert n in err["message"], err
    return err


@pytest.fixture(scope="module")
def keyed(tiny_ckpt):
    with serve(
        tiny_ckpt,
        served_model_name=["tiny-ckpt0"],
        api_key="sekrit",
        max_body_bytes=300,
        max_num_seqs=4,
    ) as s:
        yield s


KEY = {"Authorization": "Bearer sekrit"}


def test_the_key_is_checked_before_the_body_is_read(keyed):
    url = keyed.url + "/v1/completions"
    huge = {"prompt": "x" * 1000}  # over --max-body-bytes: 413 only for a caller with the key
    _err(httpx.post(url, json=huge), 401, None, "API key")
    _err(httpx.post(url, content=b"{not json"), 401)
    _err(httpx.post(url, json=huge, headers=KEY), 413, None, "300 bytes (--max-body-bytes)")
    assert httpx.post(url, content=b"{not json", headers=KEY).status_code == 400


def test_a_client_gone_before_its_body_is_sent_gets_nothing_and_the_server_serves_on(keyed):
    u = urlsplit(keyed.url)
    with socket.create_connection((u.hostname, u.port)) as c:  # headers, half the body, gone
        c.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sekrit\r\n"
            b'Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"prompt": '
        )
    time.sleep(0.2)  # the server has seen it go

    def errors() -> list[str]:
        text = httpx.get(keyed.url + "/metrics").text
        return [ln for ln in text.splitlines() if ln.startswith("engram_request_errors_total")]

    before = errors()
    body = {"model": "tiny-ckpt0", "prompt": "a", "max_tokens": 1}
    r = httpx.post(keyed.url + "/v1/completions", json=body, headers=KEY)
    assert r.status_code == 200, r.text
    assert "internal error" not in r.text
    assert errors() == before  # no 500 answered to the one that went


def test_every_v1_path_is_behind_the_key_and_the_open_routes_are_open(keyed):
    for method, path in [("GET", "/v1/nope"), ("POST", "/v1/embeddings"), ("GET", "/v1")]:
        _err(httpx.request(method, keyed.url + path), 401, None, "API key")
        assert httpx.request(method, keyed.url + path, headers=KEY).status_code in (404, 405)
    for path in ("/tokenize", "/detokenize", "/tokenizer_info"):  # stricter than vLLM
        assert httpx.post(keyed.url + path).status_code in (401, 405)
    for path in ("/health", "/version", "/metrics", "/openapi.json", "/docs"):
        assert httpx.get(keyed.url + path).status_code == 200, path
    assert httpx.get(keyed.url + "/nope").status_code == 404  # not an API path: no key needed


def test_head_on_health_and_metrics(srv):
    for path in ("/health", "/metrics"):
        r = httpx.head(srv.url + path)
        assert r.status_code == 200 and r.content == b"", path
    before = srv.metric("engram_request_errors_total")
    httpx.head(srv.url + "/metrics")
    assert srv.metric("engram_request_errors_total") == before  # nothing on the errors panel
    doc = httpx.get(srv.url + "/openapi.json").json()
    assert {"get", "head"} <= set(doc["paths"]["/metrics"]) and "head" in doc["paths"]["/health"]


def test_a_body_without_content_type_is_json_and_other_types_are_415(srv):
    body = b'{"prompt": "x", "max_tokens": 2}'
    r = httpx.post(srv.url + "/v1/completions", content=body)  # no Content-Type at all
    assert r.status_code == 200 and r.json()["choices"], r.text
    form = {"content-type": "application/x-www-form-urlencoded"}  # curl -d without -H
    err = _err(httpx.post(srv.url + "/v1/completions", content=body, headers=form), 415)
    assert "Content-Type: application/json" in err["message"]
    charset = {"content-type": "application/json; charset=utf-8"}
    assert httpx.post(srv.url + "/v1/completions", content=body, headers=charset).is_success


def _samples(text: str, name: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            labels, value = line.rsplit(" ", 1)
            out[labels] = float(value)
    return out


def test_vllm_and_engram_metrics_come_from_the_same_observations(srv):
    r = httpx.post(
        srv.url + "/v1/completions", json={"prompt": ["a", "b"], "max_tokens": 5, "n": 2}
    )
    assert r.status_code == 200
    text = httpx.get(srv.url + "/metrics").text
    pairs = [
        ("generation_tokens_total", None),
        ("prompt_tokens_total", None),
        ("e2e_request_latency_seconds_count", None),
        ("time_to_first_token_seconds_count", None),
        ("inter_token_latency_seconds_count", None),
        ("request_success_total", 'finished_reason="length"'),
        ("num_requests_waiting", None),
        ("kv_cache_usage_perc", None),
    ]
    for name, where in pairs:
        ours = sum(
            v for k, v in _samples(text, "engram_" + name).items() if not where or where in k
        )
        theirs = _samples(text, "vllm:" + name)
        assert all('engine="0"' in k and 'model_name="tiny-ckpt0"' in k for k in theirs), theirs
        assert sum(v for k, v in theirs.items() if not where or where in k) == ours, name
    assert sum(_samples(text, "vllm:request_params_n_count").values()) >= 2  # one per prompt
    assert sum(_samples(text, "vllm:request_generation_tokens_sum").values()) >= 20
    buckets = [k for k in _samples(text, "vllm:request_prompt_tokens_bucket") if "+Inf" not in k]
    assert buckets[-1].count('le="500.0"')  # vLLM's 1-2-5 buckets up to max_model_len (512)
    assert 'vllm:time_to_first_token_seconds_bucket{engine="0",le="2560.0"' in text  # its TTFT
    for name in ("process_cpu_seconds_total", "process_resident_memory_bytes", "python_info"):
        assert _samples(text, name), name


@pytest.mark.parametrize("names", ["vllm", "engram"])
def test_metrics_names_picks_the_family(tiny_ckpt, names):
    with serve(tiny_ckpt, metrics_names=names) as s:
        text = httpx.get(s.url + "/metrics").text
    other = "engram_num_requests_waiting" if names == "vllm" else "vllm:num_requests_waiting"
    own = "vllm:num_requests_waiting" if names == "vllm" else "engram_num_requests_waiting"
    assert own in text and other not in text
    assert "engram_offload_stall_fraction" in text  # offload figures have no vLLM twin


def test_repetition_penalty_changes_the_tokens_and_refused_fields_say_so(srv):
    url = srv.url + "/v1/completions"
    base = {"prompt": "x = x + x", "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    plain = httpx.post(url, json=base).json()["choices"][0]["text"]
    strong = httpx.post(url, json={**base, "repetition_penalty": 5.0}).json()
    assert strong["choices"][0]["text"] != plain
    assert (
        httpx.post(url, json={**base, "repetition_penalty": 1.0}).json()["choices"][0]["text"]
        == plain
    )
    _err(httpx.post(url, json={**base, "repetition_penalty": 0}), 400, "repetition_penalty")
    for field, value in [("use_beam_search", True), ("stop_token_ids", [3]), ("guided_json", {})]:
        _err(httpx.post(url, json={**base, field: value}), 400, field, "not supported")
    assert httpx.post(url, json={**base, "use_beam_search": False}).status_code == 200
    _err(httpx.post(url, json={**base, "seed": 2**63}), 400, "seed")
    assert httpx.post(url, json={**base, "seed": -(2**63)}).status_code == 200


def test_the_document_and_the_server_agree_on_what_a_fuzzer_found(srv):
    doc = httpx.get(srv.url + "/openapi.json").json()

    def valid(schema_name: str, body: dict) -> bool:
        schema = {"$ref": f"#/components/schemas/{schema_name}", "components": doc["components"]}
        return jsonschema_rs.validator_for(schema).is_valid(body)

    vocab = httpx.get(srv.url + "/tokenizer_info").json()
    n_vocab = len(__import__("json").loads(vocab["tokenizer_json"])["model"]["vocab"])
    cases = [  # (schema, path, body)
        ("CompletionRequest", "/v1/completions", {"prompt": "x", "max_tokens": 0, "min_tokens": 1}),
        ("CompletionRequest", "/v1/completions", {"prompt": "x", "max_tokens": 0, "echo": True}),
        ("CompletionRequest", "/v1/completions", {"prompt": "x", "n": 8, "max_tokens": 1}),
        ("CompletionRequest", "/v1/completions", {"prompt": "x", "n": 9, "max_tokens": 1}),
        ("CompletionRequest", "/v1/completions", {"prompt": [n_vocab], "max_tokens": 1}),
        ("CompletionRequest", "/v1/completions", {"prompt": "x", "logit_bias": {"007": 1}}),
        ("CompletionRequest", "/v1/completions", {"prompt": "x", "logit_bias": {str(n_vocab): 1}}),
        ("DetokenizeRequest", "/detokenize", {"tokens": [n_vocab - 1]}),
        ("DetokenizeRequest", "/detokenize", {"tokens": [n_vocab]}),
        ("TokenizeRequest", "/tokenize", {"prompt": "x"}),
        ("TokenizeRequest", "/tokenize", {"messages": [{"role": "user", "content": "x"}]}),
    ]
    for schema, path, body in cases:
        r = httpx.post(srv.url + path, json=body)
        assert valid(schema, body) == (r.status_code == 200), (body, r.status_code, r.text)
    chat = doc["paths"]["/v1/chat/completions"]["post"]
    assert not any(code.startswith("2") for code in chat["responses"])  # always 400 here
    assert httpx.post(srv.url + "/v1/chat/completions", json={}).status_code == 400
