"""``engram-serve --data-parallel-size 2`` on CPU: one HTTP front, two engine processes over
ZeroMQ, tables in shared memory once; a killed engine fails only its own requests, comes back
attached to the tables, and serves again; the front never goes down."""

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from offload.shared_tables import mapping_pss
from tests.live import free_port, serve, wait_healthy

PROMPTS = ["def main(", "import os\n", "class Config:", "for i in range("]


@pytest.fixture(scope="module")
def dp(tmp_path_factory):
    shm = Path(tempfile.mkdtemp(prefix="engram-dp-test-", dir="/dev/shm"))
    log = tmp_path_factory.mktemp("dp") / "serve.log"
    port = free_port()
    exe = Path(sys.executable).with_name("engram-serve")
    args = ["--data-parallel-size", "2", "--port", str(port), "--shared-tables-dir", str(shm)]
    with open(log, "w") as out:
        proc = subprocess.Popen([str(exe), *args], stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, timeout=240)
        yield url, proc, log, shm
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(shm, ignore_errors=True)


def finished_on(url: str, engine: int) -> float:
    """Sequences engine ``engine`` finished, from the front's /metrics (engines report each
    second)."""
    time.sleep(1.5)
    text = httpx.get(url + "/metrics").text
    pat = rf'^engram_request_success_total{{[^}}]*engine="{engine}"[^}}]*}} (\S+)$'
    return sum(float(v) for v in re.findall(pat, text, re.M))


def engines(url: str) -> list[dict]:
    return httpx.get(url + "/health", timeout=5).json()["engines"]


def complete(url: str, prompt: str, max_tokens: int = 12, **extra) -> httpx.Response:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra}
    return httpx.post(url + "/v1/completions", json=body, timeout=300)


def test_both_engines_serve_and_match_a_single_server(dp):
    url, _, log, _ = dp
    client = openai.OpenAI(base_url=url + "/v1", api_key="none")
    with ThreadPoolExecutor(4) as pool:  # at once: the least busy engine gets each
        got = list(
            pool.map(
                lambda p: (
                    client.completions.create(
                        model="engram-stdlib", prompt=p, max_tokens=12, temperature=0
                    )
                    .choices[0]
                    .text
                ),
                PROMPTS,
            )
        )
    with serve_single() as single:
        want = [complete(single.url, p).json()["choices"][0]["text"] for p in PROMPTS]
    assert got == want
    stream = client.completions.create(
        model="engram-stdlib", prompt=PROMPTS[0], max_tokens=12, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in stream if c.choices) == want[0]
    for i in (0, 1):  # each engine ran some of them, and says so under its label
        assert finished_on(url, i) >= 1
    # the first engine loaded the tables, the second attached (both logs say which)
    out = log.read_text()
    assert "loaded into" in out and "attached (no load)" in out


def serve_single():
    from models.checkpoint import default_model_dir

    return serve(default_model_dir())


def test_tables_are_resident_once(dp):
    url, _, _, shm = dp
    files = sorted(shm.rglob("*.rows"))
    assert files
    pids = [e["pid"] for e in engines(url)]
    # the engines' own account: every table loaded once between them (the others attached)
    loaded = sum(e["table_bytes_loaded"] for e in engines(url))
    assert 0 < loaded <= sum(f.stat().st_size for f in files), loaded
    for f in files:
        each = [mapping_pss(pid, f) for pid in pids]
        size = f.stat().st_size
        # both engines map it (neither holds a private copy) and it is in memory once
        assert all(each) and 0.9 * size <= sum(each) <= 1.1 * size, (f, each, size)


def test_offload_lists_each_engines_tables(dp):
    """GET /v1/offload under data parallel: each engine's own description (sent every second)."""
    url = dp[0]
    deadline = time.monotonic() + 30
    while True:
        r = httpx.get(url + "/v1/offload", timeout=10)
        assert r.status_code == 200, r.text
        body = r.json()
        if len(body["engines"]) == 2 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert body["data_parallel_size"] == 2 and sorted(body["engines"]) == ["0", "1"]
    for info in body["engines"].values():
        assert info["placement"] == "cpu" and sum(info["table_bytes"].values()) > 0
        # where each shared table sits: CPU engines bind no NUMA node (pages where first touched)
        placed = info["tables"]["shared"]
        assert placed and all(
            p["numa_node"] is None and "cpu engine" in p["numa_why"] for p in placed
        )
        assert all(p["pages_by_node"] and p["huge_pages_allowed"] for p in placed)
    # memories are refused under data parallel at start-up; the list answers, empty
    mems = httpx.get(url + "/v1/memories", timeout=10)
    assert mems.status_code == 200 and mems.json()["data"] == []


def test_killed_engine_fails_only_its_requests_and_comes_back(dp):
    url, front, log, _ = dp
    before = engines(url)
    long = {"ignore_eos": True}
    with ThreadPoolExecutor(2) as pool:
        futs = [pool.submit(complete, url, p, 200, **long) for p in PROMPTS[:2]]
        deadline = time.monotonic() + 60
        while not all(e["open_sequences"] for e in engines(url)):
            assert time.monotonic() < deadline, engines(url)
            time.sleep(0.05)
        victim = before[1]["pid"]
        os.kill(victim, signal.SIGKILL)
        results = [f.result() for f in futs]
    codes = sorted(r.status_code for r in results)
    assert codes == [200, 503], [r.text for r in results]
    err = next(r for r in results if r.status_code == 503).json()["error"]
    assert "engine 1" in err["message"] and "exited" in err["message"] and err["type"]
    ok = next(r for r in results if r.status_code == 200).json()
    assert ok["usage"]["completion_tokens"] == 200
    # it comes back, attached to the shared tables, and serves; the front never stopped
    deadline = time.monotonic() + 240
    while True:
        now = engines(url)
        if now[1]["status"] == "ok" and now[1]["pid"] != victim:
            break
        assert time.monotonic() < deadline, now
        time.sleep(0.2)
    assert now[1]["restarts"] == 1 and now[1]["table_bytes_loaded"] == 0
    assert front.poll() is None
    assert re.search(r"engine 1.*attached \(no load\)", log.read_text().split(str(victim))[-1])
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda p: complete(url, p), PROMPTS))
    assert all(r.status_code == 200 for r in outs)
    assert finished_on(url, 1) >= 1  # the new engine 1 ran some of them


def test_data_parallel_size_must_be_positive(capsys):
    from server.cli import main

    assert main(["--data-parallel-size", "0"]) == 1
    assert "--data-parallel-size must be at least 1" in capsys.readouterr().err
