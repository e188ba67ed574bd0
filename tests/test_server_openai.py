"""OpenAI's API as the server answers it: prompt scoring (max_tokens 0 + echo), logit_bias,
best_of, suffix, models.retrieve, strict types, limits no wait can meet, and an OpenAPI
document that says what the server does. Real uvicorn, the official openai client."""

import httpx
import openai
import pytest

from .live import serve

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

M = "tiny-ckpt0"


@pytest.fixture(scope="module")
def srv(tiny_ckpt):
    with serve(
        tiny_ckpt, served_model_name=[M], max_num_seqs=4, max_queue=6, max_num_batched_tokens=64
    ) as s:
        yield s


@pytest.fixture(scope="module")
def client(srv):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0)


def _post(srv, body: dict | bytes):
    if isinstance(body, bytes):
        headers = {"content-type": "application/json"}
        return httpx.post(srv.url + "/v1/completions", content=body, headers=headers, timeout=30)
    return httpx.post(srv.url + "/v1/completions", json=body, timeout=30)


def _error(r, status: int, param: str | None, *needles: str) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param, err
    for n in needles:
        assert n in err["message"], err
    return err


def test_max_tokens_0_with_echo_scores_the_prompt(client, srv):
    prompt = "def add(a, b):\n    return a + b"
    r = client.completions.create(model=M, prompt=prompt, max_tokens=0, echo=True, logprobs=2)
    c = r.choices[0]
    n = r.usage.prompt_tokens
    assert c.text == prompt and r.usage.completion_tokens == 0 and c.finish_reason == "length"
    lp = c.logprobs
    assert "".join(lp.tokens) == prompt and len(lp.token_logprobs) == n
    assert lp.token_logprobs[0] is None and all(v <= 0 for v in lp.token_logprobs[1:])
    # the same numbers as the prompt part of an echo with generation
    gen = client.completions.create(
        model=M, prompt=prompt, max_tokens=3, echo=True, logprobs=2, temperature=0
    )
    assert gen.choices[0].logprobs.token_logprobs[:n] == pytest.approx(lp.token_logprobs)
    streamed = list(
        client.completions.create(
            model=M, prompt=prompt, max_tokens=0, echo=True, logprobs=2, stream=True
        )
    )
    assert "".join(x.choices[0].text for x in streamed) == prompt
    slp = streamed[0].choices[0].logprobs
    assert slp.tokens == lp.tokens and slp.token_logprobs[0] is None
    assert slp.token_logprobs[1:] == pytest.approx(lp.token_logprobs[1:])
    assert streamed[-1].choices[0].finish_reason == "length"
    _error(_post(srv, {"prompt": "x", "max_tokens": 0}), 400, "max_tokens", "echo")


def _token_text(client, tid: int) -> str:
    return client.completions.create(model=M, prompt=[tid], max_tokens=0, echo=True).choices[0].text


def test_logit_bias_is_applied(client, srv):
    args = dict(model=M, prompt="import os\n", max_tokens=5, temperature=0, logprobs=0)
    plain = client.completions.create(**args).choices[0]
    tid = 300
    forced = client.completions.create(**args, logit_bias={str(tid): 100}).choices[0]
    assert forced.logprobs.tokens == [_token_text(client, tid)] * 5
    first = plain.logprobs.tokens[0]
    tok = srv.state.engine.tokenizer
    same = [t for t in range(tok.vocab_size) if tok.decode([t], False) == first]
    bias = {str(t): -100 for t in same}  # every token that reads like the greedy one
    banned = client.completions.create(**args, logit_bias=bias).choices[0]
    assert banned.logprobs.tokens[0] != first
    _error(_post(srv, {"prompt": "x", "logit_bias": {"99999": 1}}), 400, "logit_bias", "vocab")
    _error(_post(srv, {"prompt": "x", "logit_bias": {"abc": 1}}), 400, "logit_bias", "token ids")
    _error(_post(srv, {"prompt": "x", "logit_bias": {"5": 101}}), 400, "logit_bias", "-100")


def test_best_of_returns_the_n_most_likely_of_best_of(client, srv):
    args = dict(model=M, prompt="class A:", max_tokens=8, temperature=1.0, seed=5)
    every = client.completions.create(**args, n=4, logprobs=0)
    total = {c.text: sum(c.logprobs.token_logprobs) for c in every.choices}
    best = client.completions.create(**args, n=2, best_of=4)
    assert [c.index for c in best.choices] == [0, 1]
    want = sorted(total, key=total.get, reverse=True)[:2]
    assert [c.text for c in best.choices] == want
    assert best.choices[0].logprobs is None  # not asked for
    assert best.usage.completion_tokens == every.usage.completion_tokens  # all 4 generated
    _error(_post(srv, {"prompt": "x", "n": 3, "best_of": 2}), 400, "best_of", "at least n")
    streaming = {"prompt": "x", "best_of": 2, "stream": True}
    _error(_post(srv, streaming), 400, "best_of", "stream")


def test_suffix_is_refused(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=M, prompt="def f(", suffix="    return x", max_tokens=4)
    assert e.value.body["param"] == "suffix" and "suffix" in e.value.body["message"]


def test_models_retrieve(client):
    card = client.models.retrieve(M)
    assert card.id == M and card.object == "model" and card.max_model_len == 512
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-9")
    assert e.value.body["code"] == "model_not_found" and "gpt-9" in e.value.body["message"]


@pytest.mark.parametrize(
    "body, param, needle",
    [
        ({"prompt": [[False]]}, "prompt", "prompt[0][0]: Input should be a valid integer"),
        ({"prompt": [True, 5]}, "prompt", "prompt[0]"),
        ({"prompt": [-1]}, "prompt", "greater than or equal to 0"),
        ({"prompt": ""}, "prompt", "at least 1 character"),
        ({"prompt": []}, "prompt", "at least 1 item"),
        ({"prompt": 5}, "prompt", "must be a non-empty string"),
        ({"prompt": "x", "max_tokens": "3"}, "max_tokens", "valid integer"),
        ({"prompt": "x", "max_tokens": 2.5}, "max_tokens", "valid integer"),
        ({"prompt": "x", "stream": 1}, "stream", "valid boolean"),
        ({"prompt": "x", "echo": "true"}, "echo", "valid boolean"),
        ({"prompt": "x", "n": True}, "n", "valid integer"),
        ({"prompt": "x", "stop": ["a", ""]}, "stop", "stop[1]"),
        ({"prompt": "x", "stream_options": {"include_usage": "yes"}}, "stream_options", "bool"),
    ],
)
def test_types_are_as_strict_as_openai(srv, body, param, needle):
    _error(_post(srv, body), 400, param, needle)


def test_an_integral_json_number_is_an_integer(srv):
    # JSON has one number type and JSON Schema's "integer" takes 2.0: so does the server
    r = _post(srv, {"prompt": [5.0, 6], "n": 2.0, "max_tokens": 1.0})
    assert r.status_code == 200 and len(r.json()["choices"]) == 2


@pytest.mark.parametrize("value", [b"NaN", b"Infinity", b"-Infinity", b"1e999"])
def test_a_non_finite_temperature_says_so(srv, value):
    r = _post(srv, b'{"prompt": "x", "temperature": ' + value + b"}")
    _error(r, 400, "temperature", "finite number")


def test_requests_no_wait_can_admit_are_400_naming_the_limit(srv):
    # this server: --max-num-seqs 4, --max-queue 6
    _error(_post(srv, {"prompt": "x", "n": 5, "max_tokens": 1}), 400, "n", "--max-num-seqs is 4")
    wide = {"prompt": "x", "best_of": 5, "max_tokens": 1}
    _error(_post(srv, wide), 400, "best_of", "--max-num-seqs is 4")
    many = {"prompt": ["a", "b", "c", "d"], "n": 2, "max_tokens": 1}
    _error(_post(srv, many), 400, "prompt", "--max-queue is 6")
    prompts = {"prompt": ["a"] * 7, "max_tokens": 1}  # the list, not n, is what is too long
    _error(_post(srv, prompts), 400, "prompt", "7 sequences", "--max-queue is 6")
    _error(_post(srv, {"prompt": "x", "n": 7, "max_tokens": 1}), 400, "n", "--max-num-seqs")
    fits = {"prompt": ["a", "b", "c"], "n": 2, "max_tokens": 1}
    assert _post(srv, fits).status_code == 200


def test_405_says_which_methods_are_allowed(srv):
    r = httpx.get(srv.url + "/v1/completions")
    _error(r, 405, None)
    assert r.headers["allow"] == "POST"
    r = httpx.delete(srv.url + "/v1/models")
    assert r.status_code == 405 and r.headers["allow"] == "GET"


def test_openapi_describes_what_the_server_sends(srv):
    doc = httpx.get(srv.url + "/openapi.json").json()
    text = httpx.get(srv.url + "/openapi.json").text
    assert '"422"' not in text and '"ge"' not in text and '"le"' not in text
    error = {"$ref": "#/components/schemas/ErrorResponse"}
    comp = doc["paths"]["/v1/completions"]["post"]
    for code in ("400", "401", "404", "413", "429", "500", "503"):
        assert comp["responses"][code]["content"]["application/json"]["schema"] == error, code
    assert "Retry-After" in comp["responses"]["429"]["headers"]
    ok = comp["responses"]["200"]["content"]
    assert set(ok) == {"application/json", "text/event-stream"}
    assert ok["application/json"]["schema"] == {"$ref": "#/components/schemas/CompletionResponse"}
    body = doc["components"]["schemas"]["CompletionRequest"]["properties"]
    assert {"minLength": 1, "type": "string"} in body["prompt"]["anyOf"]
    assert {"logit_bias", "best_of", "suffix"} <= set(body)
    assert {"type": "string", "maxLength": 0, "description": "not supported"} in body["suffix"][
        "anyOf"
    ]
    metrics = doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert set(metrics) == {"text/plain"}
    assert httpx.get(srv.url + "/metrics").headers["content-type"].startswith("text/plain")
    retrieve = doc["paths"]["/v1/models/{model}"]["get"]["responses"]
    assert retrieve["404"]["content"]["application/json"]["schema"] == error
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            assert "500" in op["responses"], (path, method)
