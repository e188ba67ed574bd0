"""The engine processes of the data-parallel front: what each is started with, its state."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass

import torch

from offload.paths import cores

from .config import ServerConfig


@dataclass
class EngineProc:
    index: int
    gen: int = 0
    proc: subprocess.Popen | None = None
    ready: dict | None = None  # the engine's ready message while it serves
    open_seqs: int = 0  # outstanding work: sequences sent and not finished
    restarts: int = 0
    failures: int = 0  # deaths since it last said ready: the restart backs off
    started: float = 0.0
    restart_at: float | None = None

    @property
    def identity(self) -> bytes:
        return f"engine-{self.index}-{self.gen}".encode()

    @property
    def live(self) -> bool:
        return self.ready is not None

    def spawn(self, settings: dict, address: str) -> None:
        """Start this engine's next generation: ``python -m server.dp_engine``."""
        self.gen += 1
        self.ready, self.started = None, time.monotonic()
        env = {**os.environ, "ENGRAM_DP_CONFIG": json.dumps(settings)}
        args = [sys.executable, "-m", "server.dp_engine", str(self.index), str(self.gen), address]
        self.proc = subprocess.Popen(args, env=env, cwd=os.getcwd())


def engine_settings(cfg: ServerConfig, index: int, size: int) -> dict:
    """The flat settings engine ``index`` of ``size`` starts with: its own GPU, its share of
    the cores, host tables shared on the node."""
    flat = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "engine"}
    eng = dataclasses.asdict(cfg.engine)
    if eng["placement"] != "gpu":
        eng["shared_tables"] = True
    dev = eng["device"]
    if torch.cuda.is_available() and (dev is None or dev == "cuda"):
        eng["device"] = f"cuda:{index % torch.cuda.device_count()}"
    # an engine serves; it never starts engines of its own
    flat["data_parallel_size"], flat["engine_process"] = 1, False
    flat["cpu_threads"] = cfg.cpu_threads or max(1, (cores() - 1) // size)
    return {**flat, **eng}
