"""A real uvicorn server on a free loopback port, for integration tests."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import httpx
import torch
import uvicorn

from server.app import create_app
from server.config import ServerConfig


def wait_healthy(url: str, timeout: float = 60.0) -> None:
    """Poll ``url``/health until it answers 200 (a server in another process)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not become healthy in {timeout:.0f}s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    def __init__(self, cfg: ServerConfig) -> None:
        cfg.port = cfg.port if cfg.port != 8000 else free_port()
        self.cfg = cfg
        self.app = create_app(cfg)
        self.url = f"http://127.0.0.1:{cfg.port}"
        self.server = uvicorn.Server(
            uvicorn.Config(self.app, host="127.0.0.1", port=cfg.port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def state(self):
        return self.app.state.server

    def start(self, ready: bool = True) -> LiveServer:
        self.thread.start()
        # a GPU start-up compiles kernels, measures the gather paths and captures CUDA graphs
        deadline = time.monotonic() + (300 if torch.cuda.is_available() else 60)
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                r = httpx.get(self.url + "/health", timeout=2)
                if r.status_code == 200 or (not ready and r.status_code == 503):
                    return self
                if r.status_code == 503 and r.json().get("status") == "error":
                    raise RuntimeError(f"server failed to load: {r.json().get('error')}")
            time.sleep(0.05)
        raise RuntimeError("server did not become ready")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    def metric(self, name: str, where: str = "") -> float:
        """Sum of a metric's samples from /metrics (label sets containing ``where``)."""
        text = httpx.get(self.url + "/metrics").text
        total = 0.0
        for line in text.splitlines():
            if (line.startswith(name + "{") or line.startswith(name + " ")) and where in line:
                total += float(line.rsplit(" ", 1)[1])
        return total


@contextlib.contextmanager
def serve(model_dir, **overrides):
    srv = LiveServer(ServerConfig.make(model=str(model_dir), **overrides)).start()
    try:
        yield srv
    finally:
        srv.stop()


def engram_serve(*args: str, **env: str):
    """The real ``engram-serve`` command (the installed entry point) in its own process,
    stdout and stderr together in ``proc.stdout``, text mode."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    exe = Path(sys.executable).with_name("engram-serve")
    return subprocess.Popen(
        [str(exe), *args],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
