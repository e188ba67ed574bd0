"""The data-parallel front: N engine processes behind one HTTP server (``--data-parallel-size``).

:class:`DataParallelEngine` stands where the single :class:`~engine.async_engine.AsyncEngine`
stands for the HTTP handlers (``submit_many``, ``abort``, ``drain``, the limits, the tokenizer),
so completions, streaming and errors take the same code path. Each request goes to the live
engine with the fewest open sequences. Messages travel over ZeroMQ (a ROUTER here, a DEALER per
engine, msgpack maps: see ``dp_messages``) on an IPC socket; one thread owns the sockets and
watches the processes (``dp_link``); the open requests and each engine's open work are in
``dp_requests``, what each engine starts with in ``dp_procs``. An engine that dies fails only
its open requests (a 503 saying so: retry) and is started again; it attaches to the node's
shared tables, says ready, and gets traffic.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import subprocess
import threading
from dataclasses import dataclass

from engine.async_engine import Draining, NeverFits, RequestStream
from engine.sampling import SamplingParams
from models.config import ModelConfig
from models.tokenizer import EngramTokenizer

from .config import ServerConfig
from .dp_link import FrontLink
from .dp_messages import params_to_wire
from .dp_procs import EngineProc, engine_settings
from .dp_requests import OpenRequests

log = logging.getLogger("engram.dp")


class EngineFailed(RuntimeError):
    """An engine could not start (its own error inside)."""


@dataclass
class ModelInfo:
    config: ModelConfig


@dataclass
class Cache:
    num_blocks: int


class DataParallelEngine:
    def __init__(self, cfg: ServerConfig, size: int) -> None:
        self.cfg, self.size = cfg, size
        self.config = cfg.engine
        self.model = ModelInfo(ModelConfig.load(cfg.model_dir))
        tok = cfg.model_dir / "tokenizer.json"
        self.tokenizer = EngramTokenizer.from_file(tok) if tok.is_file() else None
        self.engines = [EngineProc(i) for i in range(size)]
        self.requests = OpenRequests(self.engines)
        self.link = FrontLink(self.engines, self.requests, self._spawn)
        self.reports = self.link.reports  # limits, metrics, /v1/offload, start-up error
        self.address = self.link.address
        self.draining = False

    # --- lifecycle -------------------------------------------------------------------
    def start(self) -> None:
        for e in self.engines:
            self._spawn(e)
        self.link.thread.start()

    def wait_ready(self, cancel: threading.Event | None = None) -> None:
        """Until every engine said ready (EngineFailed when one could not start)."""
        while not self.reports.all_ready.wait(0.1):
            if self.reports.startup_error:
                raise EngineFailed(self.reports.startup_error)
            if cancel is not None and cancel.is_set():
                return

    def stop(self, timeout: float = 30.0) -> None:
        self.link.send({"op": "stop"})
        self.link.thread.join(timeout)
        for e in self.engines:
            if e.proc is not None and e.proc.poll() is None:
                e.proc.terminate()
        for e in self.engines:
            if e.proc is not None:
                try:
                    e.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    e.proc.kill()
        shutil.rmtree(self.link.dir, ignore_errors=True)

    def _spawn(self, e: EngineProc) -> None:
        e.spawn(engine_settings(self.cfg, e.index, self.size), self.address)
        log.info("engine %d: started (pid %d)", e.index, e.proc.pid)

    # --- what the handlers use (event-loop thread) --------------------------------------
    @property
    def max_tokens_per_seq(self) -> int:
        return self.reports.limits["max_tokens_per_seq"]

    @property
    def max_context(self) -> int:
        return self.model.config.max_position_embeddings

    @property
    def cache(self) -> Cache:
        return Cache(self.reports.limits["num_blocks"])

    @property
    def busy(self) -> bool:
        return bool(self.requests)

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> RequestStream:
        return self.submit_many([(prompt_ids, params)])[0]

    def submit_many(
        self, items: list[tuple[list[int], SamplingParams]], memory: str | None = None
    ) -> list[RequestStream]:
        """``memory``: always None here (memories are refused under data parallel)."""
        if self.draining:
            raise Draining("the server is shutting down")
        for _, params in items:
            params.check(self.model.config.vocab_size)
        cfg, total = self.config, sum(p.n for _, p in items)
        widest = max(p.n for _, p in items)
        if widest > cfg.max_num_seqs:
            raise NeverFits(
                f"{widest} sequences per prompt can never run together: --max-num-seqs is "
                f"{cfg.max_num_seqs}",
                "n",
            )
        if total > cfg.max_queue:
            raise NeverFits(
                f"{total} sequences ({len(items)} prompts x {widest}) can never be queued: "
                f"--max-queue is {cfg.max_queue}",
                "n" if len(items) == 1 else "prompt",
            )
        loop = asyncio.get_running_loop()
        room = cfg.max_queue + cfg.max_num_seqs
        target, reqs = self.requests.place(items, room, loop)
        for req in reqs:
            self.link.send(
                {
                    "op": "add",
                    "to": target.index,
                    "rid": req.id,
                    "prompt_ids": req.prompt_ids,
                    "params": params_to_wire(req.params),
                }
            )
        return reqs

    def abort(self, request_id: str) -> None:
        index = self.requests.engine_of(request_id)
        if index is not None:
            self.link.send({"op": "abort", "to": index, "rid": request_id})
            self.requests.drop(request_id)  # the engine sends nothing more for it

    def drain(self, message: str) -> None:
        """Admit nothing more; each engine ends its never-scheduled requests with ``message``
        (a 503, as a single server's drain)."""
        self.draining = True
        for e in self.engines:
            self.link.send({"op": "drain", "to": e.index, "message": message})

    def cut(self, message: str) -> None:
        for rid in self.requests.ids():
            index = self.requests.fail(rid, message)  # its handler told, then its engine
            if index is not None:
                self.link.send({"op": "abort", "to": index, "rid": rid})

    def offload_infos(self) -> dict:
        """GET /v1/offload under data parallel: each live engine's own (sent every second)."""
        texts = dict(self.reports.offload_text)
        return {"engines": {str(i): json.loads(t) for i, t in sorted(texts.items())}}

    def health(self) -> list[dict]:
        return [
            {
                "engine": e.index,
                "status": "ok" if e.live else "starting",
                "pid": e.proc.pid if e.proc else None,
                "restarts": e.restarts,
                "open_sequences": e.open_seqs,
                "table_bytes_loaded": e.ready["table_bytes_loaded"] if e.ready else None,
                "table_load_s": e.ready["table_load_s"] if e.ready else None,
                "startup_s": e.ready["startup_s"] if e.ready else None,
            }
            for e in self.engines
        ]


def load_data_parallel(state) -> None:
    """``ServerState.load`` for ``--data-parallel-size`` > 1: start the engines, wait for them,
    serve /metrics merged with theirs."""
    from .dp_metrics import merged_registry

    dp = DataParallelEngine(state.cfg, state.cfg.data_parallel_size)
    try:
        dp.start()
        dp.wait_ready(state.startup.cancel)
    except Exception as e:
        dp.stop(5)
        log.error("%s", e)
        state.load_error = str(e)
        if state.on_load_error is not None:
            state.on_load_error()
        return
    if state.startup.cancel.is_set():
        dp.stop(5)
        return
    state.metrics.registry = merged_registry(
        state.metrics.registry, lambda: dict(dp.reports.metrics_text)
    )
    state.engine = dp
    log.info("%d engines ready behind one front", dp.size)
