"""One bad request never hurts another: faults isolated per request among concurrent streams,
one traceback per 500, bodies that are not Unicode refused by field on a connection that stays
usable. Real uvicorn, the official openai client, raw HTTP."""

import concurrent.futures as cf
import http.client
import json
import logging
import time

import openai
import pytest

import engine.engine as engine_module
from engine.detokenize import Detokenizer
from engine.sampling import BadParams

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

SAMPLER_FAULT, PARAMS_FAULT = 666, 667  # culprit seeds
DETOK_FAULT = "<poison>"  # culprit stop string


def _wait(cond, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert cond()


def test_faulting_requests_among_concurrent_streams_fail_alone(srv, client, monkeypatch):
    m = "tiny-ckpt0"
    normal = [dict(prompt=f"def f{i}(x):", temperature=0.0) for i in range(2)]
    normal += [dict(prompt=f"import mod{i}", temperature=1.0, seed=10 + i) for i in range(2)]
    alone = [client.completions.create(model=m, max_tokens=120, **r) for r in normal]

    real_sample, batch_sizes = engine_module.sample, []

    def sample(logits, rows):  # the step's sampler raises for any batch holding a culprit
        seeds = {r.params.seed for r in rows}
        if SAMPLER_FAULT in seeds:
            batch_sizes.append(len(rows))
            raise RuntimeError("probability tensor contains either inf, nan or element < 0")
        if PARAMS_FAULT in seeds:
            raise BadParams("top_p underflows float32", "top_p")
        return real_sample(logits, rows)

    real_add = Detokenizer.add

    def add(self, token_id):  # a detokenizer that raises, for the culprit's sequence only
        if DETOK_FAULT in self.stop:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")
        return real_add(self, token_id)

    monkeypatch.setattr(engine_module, "sample", sample)
    monkeypatch.setattr(Detokenizer, "add", add)

    def stream(r):
        chunks = list(client.completions.create(model=m, max_tokens=120, stream=True, **r))
        finish = [c.choices[0].finish_reason for c in chunks if c.choices]
        return "".join(c.choices[0].text for c in chunks if c.choices), finish[-1]

    def culprit(stream_it: bool, **kw):
        r = client.completions.create(
            model=m, prompt="x = 1", max_tokens=20, stream=stream_it, **kw
        )
        return list(r) if stream_it else r

    with cf.ThreadPoolExecutor(8) as pool:
        streams = [pool.submit(stream, r) for r in normal]
        _wait(lambda: srv.metric("engram_num_requests_running") == 4)
        bad = [
            pool.submit(culprit, False, temperature=1.0, seed=SAMPLER_FAULT),
            pool.submit(culprit, True, temperature=1.0, seed=SAMPLER_FAULT),
            pool.submit(culprit, False, temperature=1.0, seed=PARAMS_FAULT),
            pool.submit(culprit, True, stop=[DETOK_FAULT]),
        ]
        errors = [f.exception(timeout=60) for f in bad]
        got = [f.result(timeout=60) for f in streams]

    assert isinstance(errors[0], openai.InternalServerError) and "probability" in str(errors[0])
    assert isinstance(errors[1], openai.APIError) and "probability" in errors[1].message
    assert isinstance(errors[2], openai.BadRequestError) and "underflows" in str(errors[2])
    assert isinstance(errors[3], openai.APIError) and "UnicodeDecodeError" in errors[3].message
    assert max(batch_sizes) > 1  # a culprit shared its step's batch with the streams
    for (text, finish), want in zip(got, alone):
        assert text == want.choices[0].text and finish == want.choices[0].finish_reason
    _wait(lambda: srv.metric("engram_num_requests_running") == 0)
    assert srv.state.engine.cache.free_blocks == srv.state.engine.cache.num_blocks


class Tracebacks(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info:
            self.records.append(record)


@pytest.fixture
def tracebacks():
    h = Tracebacks()
    loggers = [
        logging.getLogger(),
        logging.getLogger("uvicorn"),
        logging.getLogger("uvicorn.error"),
    ]
    for lg in loggers:
        lg.addHandler(h)
    yield h
    for lg in loggers:
        lg.removeHandler(h)


def _conn(srv) -> http.client.HTTPConnection:
    return http.client.HTTPConnection("127.0.0.1", srv.cfg.port, timeout=30)


def _send(conn, method: str, path: str, body: bytes | None = None):
    conn.request(method, path, body, {"content-type": "application/json"} if body else {})
    r = conn.getresponse()
    return r.status, r.read(), r


def test_an_unexpected_500_logs_one_traceback_and_keeps_the_connection(
    srv, tracebacks, monkeypatch
):
    import server.completions

    def broken(engine, req):
        raise KeyError("injected handler fault")

    monkeypatch.setattr(server.completions, "encode_prompts", broken)
    conn = _conn(srv)
    status, body, _ = _send(conn, "POST", "/v1/completions", b'{"prompt": "x"}')
    assert status == 500
    assert json.loads(body)["error"] == {
        "message": "internal error: KeyError",
        "type": "server_error",
        "param": None,
        "code": None,
    }
    assert len(tracebacks.records) == 1
    assert _send(conn, "GET", "/health")[0] == 200  # same keep-alive connection
    conn.close()


def test_an_engine_step_fault_logs_one_traceback(srv, tracebacks, monkeypatch):
    runner = srv.state.engine.engine.runner

    def boom(*a, **k):
        raise RuntimeError("injected forward fault")

    monkeypatch.setattr(runner, "step", boom)
    conn = _conn(srv)
    status, body, _ = _send(conn, "POST", "/v1/completions", b'{"prompt": "x", "max_tokens": 2}')
    assert status == 500 and "injected forward fault" in json.loads(body)["error"]["message"]
    assert len(tracebacks.records) == 1
    monkeypatch.undo()
    assert _send(conn, "POST", "/v1/completions", b'{"prompt": "x", "max_tokens": 2}')[0] == 200


@pytest.mark.parametrize(
    "body, field, where",
    [
        (rb'{"prompt": "\ud800abc"}', "prompt", "prompt"),
        (rb'{"prompt": ["ok", "x\udfffy"]}', "prompt", "prompt[1]"),
        (rb'{"prompt": "x", "model": "\ud800"}', "model", "model"),
        (rb'{"prompt": "x", "stop": ["\udc00"]}', "stop", "stop[0]"),
        (rb'{"prompt": "x", "user": "\ud83d"}', "user", "user"),
        (rb'{"prompt": "x", "logit_bias": {"\ud800": 1}}', "logit_bias", "logit_bias"),
        (rb'{"prompt": "x", "frobnicate": {"a": ["\ud800"]}}', "frobnicate", "frobnicate.a[0]"),
        (b'{"prompt": "x\xff\xfe"}', "prompt", "prompt"),
        (b'{"prompt": "x", "model": "\xed\xa0\x80"}', "model", "model"),
    ],
)
def test_text_that_is_not_unicode_is_400_naming_the_field(srv, tracebacks, body, field, where):
    conn = _conn(srv)
    status, raw, _ = _send(conn, "POST", "/v1/completions", body)
    assert status == 400, raw
    err = json.loads(raw)["error"]
    assert err["param"] == field and err["message"].startswith(where)
    assert "Unicode" in err["message"] and err["type"] == "invalid_request_error"
    ok = b'{"prompt": "\\ud83d\\ude00 x", "max_tokens": 1}'  # a proper pair is fine
    assert _send(conn, "POST", "/v1/completions", ok)[0] == 200  # same connection
    assert not tracebacks.records
    conn.close()
