"""engram-bench --http-cost's fairness pieces: the direct engine gets the server's flags, and
the server's CPU counts the processes it started, its event loop's is its main thread's, the
device worker's is the thread of that OS name."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest

from bench.httpcost import (
    Clients,
    _cpu_s,
    _loop_cpu_s,
    _thread_cpu_s,
    build_parser,
    serve_argv,
    thread_split,
)
from offload.thread_names import name_os_thread


def test_direct_engine_gets_the_servers_flags():
    from server.cli import parse_args, to_config

    args = build_parser().parse_args(
        ["--clients", "7", "--threads", "1", "--serve-args", "--dedup --max-queue 99"]
    )
    e = to_config(parse_args(serve_argv(args))).engine
    assert (e.max_num_seqs, e.dedup, e.max_queue) == (7, True, 99)


def test_cpu_counts_child_processes():
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.6: pass\n"
    # a parent that only waits on a child that burns CPU: the parent's own CPU is ~0
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import subprocess, sys; subprocess.run([sys.executable, '-c', {burn!r}])",
        ]
    )
    seen = 0.0
    while parent.poll() is None:
        seen = max(seen, _cpu_s(parent.pid))
        time.sleep(0.05)
    assert seen >= 0.3  # the child's burn, read while it ran


def _burn(seconds: float) -> None:
    t = time.thread_time()
    while time.thread_time() - t < seconds:
        pass


def test_loop_cpu_is_the_main_threads_alone():
    pid = os.getpid()
    t0 = _loop_cpu_s(pid)
    other = threading.Thread(target=_burn, args=(0.5,))  # as the engine's thread
    other.start()
    other.join()
    t1 = _loop_cpu_s(pid)
    _burn(0.5)  # as the event loop
    t2 = _loop_cpu_s(pid)
    assert t1 - t0 < 0.2
    assert t2 - t1 >= 0.4


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="OS thread names from /proc")
def test_device_cpu_is_the_named_threads_alone():
    pid = os.getpid()
    assert _thread_cpu_s(pid, "engram-nosuch") is None  # --no-overlap: no worker, no split
    stop, read, spent = threading.Event(), threading.Event(), {}

    def burner(named: bool) -> None:
        if named:
            name_os_thread()
        while not stop.is_set():
            pass
        spent[named] = time.thread_time()
        read.wait(10)  # idle while the test reads

    threads = [
        threading.Thread(target=burner, args=(True,), name="engram-burn"),
        threading.Thread(target=burner, args=(False,), name="engram-other"),  # no OS name
    ]
    for t in threads:
        t.start()
    time.sleep(0.4)
    stop.set()
    while len(spent) < 2:
        time.sleep(0.01)
    got = _thread_cpu_s(pid, "engram-burn")
    read.set()
    for t in threads:
        t.join()
    assert spent[False] > 0.1  # the unnamed burner's CPU would show if it were counted
    assert got == pytest.approx(spent[True], abs=0.05)  # clock ticks of 10 ms


def test_thread_split_takes_the_device_worker_out_of_both_sides():
    def r(cpu, dev):  # 1000 tokens: seconds -> ms per token
        return {"tokens": 1000, "cpu_s": cpu, "device_cpu_s": dev}

    rounds = {"direct": [r(0.4, 0.3), r(0.4, 0.3)], "http": [r(0.5, 0.33), r(0.48, 0.33)]}
    got = thread_split(rounds)
    assert got["device_cpu_us_per_token"]["http"]["median"] == pytest.approx(330)
    assert got["host_cpu_us_per_token"]["direct"]["median"] == pytest.approx(100)
    # (0.5-0.33 - 0.1) / 0.4 and (0.48-0.33 - 0.1) / 0.4
    assert got["http_host_cpu_share"]["raw"] == pytest.approx([0.175, 0.125])
    assert got["device_cpu_share"]["median"] == pytest.approx(0.1)
    rounds["http"][1]["device_cpu_s"] = None
    assert thread_split(rounds) == {}


@pytest.mark.parametrize("new_connections", [False, True])
def test_each_client_streams_on_its_own_pool(srv, new_connections):
    """C clients x R requests each, every token counted; with keep-alive each client's one
    connection carries all its requests (a pool of its own, not one pool shared by all)."""
    clients = Clients(srv.url, os.getpid(), 3, new_connections)
    try:
        got = clients.round([[1, 2, 3], [4, 5], [6]], 2, requests=3)
        assert got["tokens"] == 3 * 3 * 2
        pools = [c._transport._pool for c in clients.clients]
        assert len({id(p) for p in pools}) == 3
        kept = [len(p.connections) for p in pools]
        assert kept == ([0, 0, 0] if new_connections else [1, 1, 1])
    finally:
        clients.close()


def test_keep_alive_is_the_default():
    assert not build_parser().parse_args([]).new_connections
    assert build_parser().parse_args(["--new-connections"]).new_connections
    assert not build_parser().parse_args(["--keep-alive"]).new_connections


def test_no_task_is_left_behind_per_request_on_a_kept_connection(srv):
    """Streams on one kept connection: the server's event loop has as many tasks after them
    as before (the disconnect listener of each ends with its response)."""
    import asyncio

    import httpx

    loop = srv.server.servers[0].get_loop()

    def tasks() -> int:
        async def count() -> int:
            return len(asyncio.all_tasks())

        return asyncio.run_coroutine_threadsafe(count(), loop).result(10)

    model = httpx.get(srv.url + "/v1/models").json()["data"][0]["id"]
    body = {"model": model, "prompt": [1, 2], "max_tokens": 2, "stream": True}
    with httpx.Client(limits=httpx.Limits(max_connections=1), timeout=60) as c:
        c.post(srv.url + "/v1/completions", json=body).read()
        before = tasks()
        for _ in range(5):
            assert c.post(srv.url + "/v1/completions", json=body).text.endswith("[DONE]\n\n")
        after = tasks()
        assert len(c._transport._pool.connections) == 1  # all on one connection
    assert after == before


def test_replot_draws_the_png_from_a_results_json(tmp_path):
    import json

    from bench.httpcost import main
    from bench.stats import summarize

    def r(cpu, dev):
        return {"tokens": 1000, "wall_s": 1.0, "cpu_s": cpu, "device_cpu_s": dev}

    rounds = {"direct": [r(0.4, 0.3), r(0.41, 0.3)], "http": [r(0.45, 0.32), r(0.47, 0.33)]}
    res = {
        "clients": 2,
        "max_tokens": 4,
        "environment": {"device": "cpu"},
        "rounds": rounds,
        "summary": {
            w: {"cpu_us_per_token": summarize([1e6 * x["cpu_s"] / 1000 for x in rs])}
            for w, rs in rounds.items()
        },
        "http_cpu_share": summarize([0.12, 0.15]),
        "http_cost_share": summarize([0.1, 0.2]),
        **thread_split(rounds),
    }
    (tmp_path / "httpcost.json").write_text(json.dumps(res))
    assert main(["--replot", str(tmp_path)]) == 0
    assert (tmp_path / "httpcost.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
