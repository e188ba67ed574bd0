"""Graceful shutdown of the real ``engram-serve`` process: SIGTERM/SIGINT drain (new requests
503 with Retry-After, queued ones 503 at once, running ones finish or, past
--shutdown-timeout, end with an OpenAI error event and [DONE]), exit status 0, the engine in
the server's process or in its own (``--engine-process``); a second signal
exits at once; a signal before loading exits cleanly; a port in use is one line."""

import json
import signal
import socket
import threading
import time

import httpx
import pytest

from offload.paths import cores

from .live import engram_serve, free_port, wait_healthy


def _stream(url: str, body: dict, out: dict, key: str) -> None:
    """POST a streaming completion; out[key] = (status, [events as parsed JSON or '[DONE]'])."""
    events = []
    try:
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
            out[key] = (r.status_code, events)
            for line in r.iter_lines():
                if line.startswith("data: "):
                    data = line[6:]
                    events.append(data if data == "[DONE]" else json.loads(data))
    except httpx.HTTPError as e:  # a process that exits at once cuts the stream
        events.append(e)


def _post(url: str, body: dict, out: dict, key: str) -> None:
    out[key] = httpx.post(url + "/v1/completions", json=body, timeout=120)


def _waiting(url: str) -> float:
    for line in httpx.get(url + "/metrics", timeout=5).text.splitlines():
        if line.startswith("vllm:num_requests_waiting{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _start(ckpt, *flags: str):
    port = free_port()
    proc = engram_serve("--model", str(ckpt), "--port", str(port), *flags)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, 120)
    except RuntimeError:
        proc.kill()
        raise AssertionError(proc.stdout.read()) from None
    return proc, url


def _load(url: str, running: int, queued: int, max_tokens: int) -> tuple[dict, list]:
    """``running`` streams that hold every --max-num-seqs slot and have their first token,
    then ``queued`` requests (one a stream) that must wait behind them."""
    out, threads = {}, []
    long = {"prompt": "def f(x):", "max_tokens": max_tokens, "ignore_eos": True}

    def go(fn, body, key):
        threads.append(threading.Thread(target=fn, args=(url, body, out, key), daemon=True))
        threads[-1].start()

    usage = {"include_usage": True}
    for i in range(running):
        go(_stream, {**long, "stream": True, "stream_options": usage}, f"run{i}")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # every running stream has produced text
        if all(len(out.get(f"run{i}", (0, []))[1]) >= 1 for i in range(running)):
            break
        time.sleep(0.02)
    for i in range(queued):
        stream = i == 0
        go(_stream if stream else _post, {**long, "stream": stream}, f"queued{i}")
    while _waiting(url) < queued and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _waiting(url) == queued
    return out, threads


def _error_event(events: list) -> dict:
    assert events[-1] == "[DONE]", events[-3:]
    err = events[-2]["error"]
    assert err["code"] == "shutting_down" and err["type"] == "service_unavailable", err
    return err


@pytest.mark.parametrize(
    "engines", [[], ["--engine-process"]], ids=["in-process", "engine-process"]
)
def test_sigterm_lets_running_requests_finish_and_refuses_the_rest(tiny_ckpt, engines):
    proc, url = _start(tiny_ckpt, "--max-num-seqs", "2", "--shutdown-timeout", "60", *engines)
    try:
        out, threads = _load(url, running=2, queued=3, max_tokens=480)
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        while httpx.get(url + "/health").json()["status"] != "draining":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        late = httpx.post(url + "/v1/completions", json={"prompt": "x"}, timeout=10)
        assert late.status_code == 503 and late.headers["retry-after"] == "1"
        assert late.json()["error"]["code"] == "shutting_down"
        for t in threads:
            t.join(120)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    log = proc.stdout.read()
    for i in range(2):  # running: finished in full
        status, events = out[f"run{i}"]
        assert status == 200 and events[-1] == "[DONE]", events[-3:]
        assert events[-3]["choices"][0]["finish_reason"] == "length"
        assert events[-2]["usage"]["completion_tokens"] == 480
    status, events = out["queued0"]  # a queued stream: its status was sent already
    assert status == 200 and len(events) == 2
    _error_event(events)
    for i in (1, 2):  # queued, not streamed: a 503 at once, retry elsewhere
        r = out[f"queued{i}"]
        assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
    threads = f"torch CPU threads: {max(1, cores() - 1)} ("  # a core left for HTTP and rows
    assert threads in log and "SIGTERM: shutting down gracefully" in log, log
    assert "Traceback" not in log and "CancelledError" not in log, log


@pytest.mark.parametrize(
    "engines", [[], ["--engine-process"]], ids=["in-process", "engine-process"]
)
def test_past_the_shutdown_timeout_running_requests_end_with_an_error(tiny_ckpt, engines):
    proc, url = _start(tiny_ckpt, "--max-num-seqs", "3", "--shutdown-timeout", "0", *engines)
    try:
        out, threads = _load(url, running=2, queued=0, max_tokens=400)
        t = threading.Thread(
            target=_post,
            args=(url, {"prompt": "x", "max_tokens": 400, "ignore_eos": True}, out, "plain"),
        )
        t.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the plain request is running too
            lines = httpx.get(url + "/metrics").text.splitlines()
            running = [x for x in lines if x.startswith("vllm:num_requests_running{")]
            if running and running[0].endswith(" 3.0"):
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        for th in [*threads, t]:
            th.join(60)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    for i in range(2):
        status, events = out[f"run{i}"]
        assert status == 200 and len(events) >= 3  # some text, then the error, then [DONE]
        assert "shut down before this request finished" in _error_event(events)["message"]
    r = out["plain"]
    assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down", r.text
    assert "Traceback" not in proc.stdout.read()


def test_a_second_signal_exits_at_once(tiny_ckpt):
    proc, url = _start(tiny_ckpt, "--max-num-seqs", "1", "--shutdown-timeout", "120")
    try:
        out, threads = _load(url, running=1, queued=0, max_tokens=450)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        assert proc.poll() is None  # draining: the stream still runs
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 1 and time.monotonic() - started < 5
        threads[0].join(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert isinstance(out["run0"][1][-1], httpx.HTTPError)  # cut off: no drain
    assert "second signal: exiting now" in proc.stdout.read()


def test_a_signal_before_loading_exits_cleanly(tiny_ckpt):
    proc = engram_serve("--model", str(tiny_ckpt), "--port", str(free_port()))
    time.sleep(0.5)  # inside the imports (torch, the web stack): nothing has loaded yet
    proc.send_signal(signal.SIGTERM)
    try:
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    log = proc.stdout.read()
    assert "SIGTERM before start-up: exiting" in log and "start-up" not in log.split("exiting")[1]


def test_a_port_in_use_is_one_line_and_status_1(tiny_ckpt):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = engram_serve("--model", str(tiny_ckpt), "--port", str(port))
        assert proc.wait(60) == 1
    log = proc.stdout.read().strip().splitlines()
    assert log[-1].startswith(f"engram-serve: error: cannot listen on 127.0.0.1:{port}"), log
    assert "--port" in log[-1]
    assert not any("shutdown requested" in line or "Traceback" in line for line in log), log


@pytest.mark.parametrize("flag", ["--shutdown-timeout", "--cpu-threads"])
def test_negative_settings_are_refused(tiny_ckpt, flag):
    proc = engram_serve("--model", str(tiny_ckpt), flag, "-1")
    assert proc.wait(60) == 1
    assert f"{flag} must be" in proc.stdout.read()


def test_ending_requests_frees_their_kv_memory(tiny_ckpt):
    from .live import serve

    with serve(tiny_ckpt, max_num_seqs=2) as s:
        out, threads = _load(s.url, running=2, queued=1, max_tokens=400)
        engine = s.state.engine
        assert engine.cache.usage > 0
        engine.drain("draining")  # the queued stream ends; the running two go on
        engine.cut("cut")
        for t in threads:
            t.join(30)
        deadline = time.monotonic() + 10
        while engine.busy and time.monotonic() < deadline:  # the streams' last aborts
            time.sleep(0.01)
        assert engine.cache.usage == 0 and not engine.busy  # every block back in the pool
        assert _error_event(out["queued0"][1])["message"] == "draining"
        assert all(_error_event(out[f"run{i}"][1])["message"] == "cut" for i in range(2))
