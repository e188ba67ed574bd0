"""Start-up: one log line of where the time went, a clean exit on SIGTERM while loading, and the
deterministic switch."""

import logging
import os
import re
import select
import signal
import subprocess
import sys
import time

import httpx
import torch

from engine import determinism
from engine.config import EngineConfig
from engine.engine import Engine
from server.cli import parse_args, to_config

from .conftest import tiny_model
from .live import free_port, serve

# `python -m server.cli` with one real loading phase made slow: the table load sleeps first,
# then runs the real loader, and says when that finished.
SLOW_TABLES = """
import runpy, sys, time
from offload.store import TableStore

real = TableStore.from_checkpoint.__func__
delay = float(sys.argv.pop(1))

def slow(cls, *args, **kwargs):
    print("tables: loading", flush=True)
    time.sleep(delay)
    store = real(cls, *args, **kwargs)
    print("tables: loaded", flush=True)
    return store

TableStore.from_checkpoint = classmethod(slow)
runpy.run_module("server.launch", run_name="__main__", alter_sys=True)
"""


def _read_until(proc: subprocess.Popen, marker: str, timeout: float = 60) -> str:
    """The process's output up to (at least) the line containing ``marker`` (fails after
    ``timeout``). Reads the pipe's file descriptor itself: a buffered readline could pull the
    marker's line into Python's buffer with an earlier one, where select() cannot see it."""
    seen, deadline, fd = b"", time.monotonic() + timeout, proc.stdout.fileno()
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.1)
        if not ready:
            continue
        chunk = os.read(fd, 65536)
        assert chunk, seen.decode()  # the process ended first
        seen += chunk
        if marker.encode() in seen:
            return seen.decode()
    raise AssertionError(f"no {marker!r} within {timeout}s:\n" + seen.decode())


def test_sigterm_while_loading_waits_for_the_loader_and_exits_cleanly(tiny_ckpt, tmp_path):
    script = tmp_path / "slow_serve.py"
    script.write_text(SLOW_TABLES)
    port = free_port()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen(
        [sys.executable, str(script), "2", "--model", str(tiny_ckpt), "--port", str(port)],
        cwd=root,
        env={**os.environ, "PYTHONPATH": root},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        out = _read_until(proc, "tables: loading")  # the loader is inside the table phase
        r = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
        assert r.status_code == 503 and r.json()["status"] == "loading"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        out += proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    # the process waited for the table load in flight, then stopped before the engine
    assert "tables: loaded" in out, out
    assert "shutdown requested during start-up (done: tables" in out, out
    assert not re.search(r"start-up [0-9.]+s:", out) and "Traceback" not in out, out


def test_start_up_logs_where_its_time_went(tiny_ckpt, caplog):
    caplog.set_level(logging.INFO, logger="engram.server")
    with serve(tiny_ckpt, max_num_seqs=2, max_num_batched_tokens=64) as s:
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2})
        assert r.status_code == 200
        # the warm-up is not traffic: only this request's steps are booked
        steps = httpx.get(s.url + "/v1/offload").json()["accounting"]["steps"]
        assert 0 < steps <= 3
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("start-up ")]
    phases = ("device init", "weights", "tables", "gather setup", "link", "engine", "warm-up")
    for phase in (*phases, "kernel check"):
        assert f"{phase}" in line, line
    (summary,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("model ")]
    assert "dtype float32 (--dtype auto on cpu)" in summary, summary


def test_deterministic_switch_sets_every_setting_and_undoes(monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", "")  # restored after the test
    before = determinism.current()
    try:
        previous = determinism.set_deterministic(True)
        assert previous == before
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        assert torch.are_deterministic_algorithms_enabled()
        m, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
        assert not m.allow_bf16_reduced_precision_reduction
        assert not m.allow_fp16_reduced_precision_reduction
        assert not m.allow_tf32 and not cudnn.allow_tf32
        assert cudnn.deterministic and not cudnn.benchmark
        assert determinism.is_deterministic()
        determinism.set_deterministic(False)
        assert determinism.current() == determinism.DEFAULT
        assert not determinism.is_deterministic()
    finally:
        determinism.apply(before)
    assert determinism.current() == before


def test_engine_and_engram_serve_turn_deterministic_mode_on(monkeypatch):
    assert parse_args([]).deterministic is False  # the server's default
    assert to_config(parse_args(["--deterministic"])).engine.deterministic is True
    monkeypatch.setenv("ENGRAM_DETERMINISTIC", "1")
    assert to_config(parse_args([])).engine.deterministic is True
    before = determinism.current()
    try:
        determinism.set_deterministic(False)
        Engine(tiny_model(), EngineConfig(max_num_seqs=2, kv_blocks=4))
        assert not determinism.is_deterministic()
        Engine(tiny_model(), EngineConfig(max_num_seqs=2, kv_blocks=4, deterministic=True))
        assert determinism.is_deterministic()
    finally:
        determinism.apply(before)
