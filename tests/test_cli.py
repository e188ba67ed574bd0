import logging
import os
import shutil
import signal
import subprocess
import sys

import httpx
import pytest
import torch

from server.cli import main, parse_args, validate

from .live import free_port, wait_healthy


def test_bad_model_directory_is_one_clear_line(tmp_path, capsys):
    assert main(["--model", str(tmp_path / "nope")]) == 1  # settings that cannot work: 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "does not exist" in err and "--model" in err
    (tmp_path / "config.json").write_text('{"engram_layer_ids": [99]}')
    assert main(["--model", str(tmp_path)]) == 1
    assert "engram_layer_ids" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # a command line argparse cannot read: 2
        main(["--max-num-seqs", "many"])
    assert e.value.code == 2


def test_impossible_settings(tiny_ckpt):
    args = parse_args(["--model", str(tiny_ckpt), "--max-num-seqs", "0"])
    assert "--max-num-seqs must be at least 1" in validate(args)
    cpu = ["--model", str(tiny_ckpt), "--device", "cpu"]  # what a CPU device refuses
    args = parse_args([*cpu, "--placement", "host"])
    assert "needs a CUDA device" in validate(args)
    args = parse_args([*cpu, "--gather", "staged"])
    assert validate(args) == (
        "--gather: gather 'staged' does not work with placement 'cpu'; "
        "use one of auto, worker, resident"
    )


def test_a_model_that_fails_to_load_exits_nonzero(tiny_ckpt, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_ckpt, bad)
    (bad / "engram.safetensors").write_bytes(b"not a safetensors file")
    r = subprocess.run(
        [sys.executable, "-m", "server.cli", "--model", str(bad), "--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 1
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("engram-serve: error: model load failed:"), r.stderr


def test_flags_come_from_environment(monkeypatch):
    monkeypatch.setenv("ENGRAM_PORT", "9123")
    monkeypatch.setenv("ENGRAM_DEDUP", "true")
    monkeypatch.setenv("ENGRAM_API_KEY", "k")
    args = parse_args([])
    assert args.port == 9123 and args.dedup is True and args.api_key == "k"
    assert parse_args(["--port", "7"]).port == 7  # the flag wins
    monkeypatch.setenv("ENGRAM_PLACEMENT", "")  # compose passes unset settings as empty
    assert parse_args([]).placement is None
    assert parse_args([]).huge_pages is True and parse_args(["--no-huge-pages"]).huge_pages is False
    monkeypatch.setenv("ENGRAM_HUGE_PAGES", "0")  # a switch that defaults on, turned off
    assert parse_args([]).huge_pages is False


@pytest.mark.parametrize(
    "var, value, says",
    [
        ("ENGRAM_PLACEMENT", "foo", "argument --placement: invalid choice: 'foo'"),
        ("ENGRAM_DTYPE", "float64", "argument --dtype: invalid choice: 'float64'"),
        ("ENGRAM_PORT", "abc", "argument --port: invalid int value: 'abc'"),
    ],
)
def test_bad_environment_settings_are_refused_like_bad_flags(monkeypatch, capsys, var, value, says):
    monkeypatch.setenv(var, value)
    with pytest.raises(SystemExit) as e:
        main([])
    assert e.value.code == 2 and says in capsys.readouterr().err


def test_settings_checked_before_loading(tiny_ckpt, tmp_path):
    m = ["--model", str(tiny_ckpt)]
    assert "--kv-blocks must be 0" in validate(parse_args(m + ["--kv-blocks", "-1"]))
    assert "not a device" in validate(parse_args(m + ["--device", "tpu9"]))
    if not torch.cuda.is_available():
        assert "needs CUDA" in validate(parse_args(m + ["--device", "cuda"]))
    bad = m + ["--bench-result", str(tmp_path / "none.json")]
    assert "is not a readable JSON file" in validate(parse_args(bad))
    (tmp_path / "bench.json").write_text('{"rows": []}')
    assert validate(parse_args(m + ["--bench-result", str(tmp_path / "bench.json")])) is None


def test_serve_then_sigterm_exits_cleanly(tiny_ckpt):
    port = free_port()
    env = {**os.environ, "ENGRAM_MODEL": str(tiny_ckpt), "ENGRAM_PORT": str(port)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "--log-level", "warning"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url)
        r = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 3}, timeout=30)
        assert r.status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_help_shows_every_flags_default(capsys):
    import re

    from server.cli import build_parser

    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    options = out.split("\noptions:\n", 1)[1]
    entries = {}  # first option string -> its help text, joined onto one line
    for entry in re.split(r"\n(?=  -)", options):
        words = entry.split()
        entries[words[0].rstrip(",")] = " ".join(words)
    for action in build_parser()._actions:
        if action.dest == "help":
            continue
        text = entries[action.option_strings[0]]
        assert "(default:" in text and "(default: None)" not in text, text
    # a switch that defaults on says what turning it off does
    assert "ordinary 4 KiB pages instead of 2 MiB" in entries["--no-huge-pages"]


def _serve_on_a_terminal(tiny_ckpt) -> tuple[str, str]:
    """engram-serve with stderr on a terminal (a pty, 100 columns): poll /health, run one
    completion, stop it. Returns (stdout, stderr)."""
    import fcntl
    import pty
    import struct
    import termios
    import threading

    port = free_port()
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    proc = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "--model", str(tiny_ckpt), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=slave,
        text=True,
    )
    os.close(slave)
    err: list[bytes] = []

    def drain():  # keep the terminal's buffer from filling up
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:
                return
            if not chunk:
                return
            err.append(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url)
        r = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=30)
        assert r.status_code == 200
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(5)
    os.close(master)
    return out, b"".join(err).decode(errors="replace")


def test_health_polls_log_at_debug_and_a_terminal_gets_the_loading_bar(tiny_ckpt):
    out, err = _serve_on_a_terminal(tiny_ckpt)
    logs = out + err
    assert '"POST /v1/completions HTTP/1.1" 200' in logs
    assert "/health" not in logs  # polled many times: at debug only
    assert "loading Engram tables" in err  # a person at a terminal sees the bar


def test_health_access_lines_are_debug_records():
    from server.cli import HealthChecksAtDebug

    access = logging.getLogger("uvicorn.access")
    line = '%s - "%s %s HTTP/%s" %d'

    def record(path: str) -> logging.LogRecord:
        args = ("127.0.0.1:5", "GET", path, "1.1", 200)
        return access.makeRecord(access.name, logging.INFO, __file__, 1, line, args, None)

    keep, level = HealthChecksAtDebug(), access.level
    try:
        access.setLevel(logging.INFO)
        assert not keep.filter(record("/health")) and keep.filter(record("/v1/models"))
        access.setLevel(logging.DEBUG)
        r = record("/health?probe=1")
        assert keep.filter(r) and r.levelno == logging.DEBUG and r.levelname == "DEBUG"
    finally:
        access.setLevel(level)


def test_no_progress_bar_into_a_log_file(tiny_ckpt, capfd):
    from server.app import ServerState
    from server.config import ServerConfig

    state = ServerState(ServerConfig.make(model=str(tiny_ckpt)))
    state.load()  # stderr is pytest's capture here, not a terminal
    try:
        assert state.engine is not None
        err = capfd.readouterr().err
        assert "loading Engram tables" not in err and "\r" not in err
    finally:
        state.engine.stop()


def test_cpu_threads_leave_a_core_by_default(monkeypatch):
    from offload.paths import cores
    from server.cli import cpu_threads

    n, why = cpu_threads(0)
    assert n == max(1, cores() - 1) and "one left for the HTTP loop and the row worker" in why
    assert cpu_threads(3)[0] == 3
    monkeypatch.setenv("ENGRAM_CPU_THREADS", "2")
    assert parse_args([]).cpu_threads == 2


def test_readme_flag_table_documents_every_flag():
    from pathlib import Path

    from server.cli import build_parser

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    rows = [line for line in readme.splitlines() if line.startswith("| `--")]
    for action in build_parser()._actions:
        flag = next((o for o in action.option_strings if o.startswith("--")), None)
        if flag in (None, "--help"):
            continue
        assert any(f"`{flag}" in row.split("|")[1] for row in rows), f"{flag} not in the table"
