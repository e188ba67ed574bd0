"""The data-parallel front: N engine processes behind one HTTP server (``--data-parallel-size``).

:class:`DataParallelEngine` stands where the single :class:`~engine.async_engine.AsyncEngine`
stands for the HTTP handlers (``submit_many``, ``abort``, ``drain``, the limits, the tokenizer),
so completions, streaming and errors take the same code path. Each request goes to the live
engine with the fewest open sequences. Messages travel over ZeroMQ (a ROUTER here, a DEALER per
engine, msgpack maps: see ``dp_messages``) on an IPC socket; one thread owns the sockets and
watches the processes. An engine that dies fails only its open requests (a 503 saying so: retry)
and is started again; it attaches to the node's shared tables, says ready, and gets traffic.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field

import zmq

from engine.async_engine import (
    Delta,
    Draining,
    EngineDead,
    NeverFits,
    QueueFull,
    RequestStream,
)
from engine.sampling import SamplingParams
from models.config import ModelConfig
from models.tokenizer import EngramTokenizer

from .config import ServerConfig
from .dp_messages import delta_from_wire, pack, params_to_wire, unpack
from .dp_procs import EngineProc, engine_settings

log = logging.getLogger("engram.dp")
RESTART_DELAY_S = 0.5
RESTART_MAX_DELAY_S = 30.0


class EngineFailed(RuntimeError):
    """An engine could not start (its own error inside)."""


@dataclass
class ModelInfo:
    config: ModelConfig


@dataclass
class Cache:
    num_blocks: int


@dataclass
class SeqView:
    """What the handlers read of an engine-side sequence: its prompt logprobs."""

    prompt_logprobs: list = field(default_factory=list)


class DataParallelEngine:
    def __init__(self, cfg: ServerConfig, size: int) -> None:
        self.cfg, self.size = cfg, size
        self.config = cfg.engine
        self.model = ModelInfo(ModelConfig.load(cfg.model_dir))
        tok = cfg.model_dir / "tokenizer.json"
        self.tokenizer = EngramTokenizer.from_file(tok) if tok.is_file() else None
        self.engines = [EngineProc(i) for i in range(size)]
        self.requests: dict[str, tuple[int, RequestStream]] = {}
        self.metrics_text: dict[int, str] = {}
        self.offload_text: dict[int, str] = {}  # each engine's GET /v1/offload, as JSON
        self.draining = False
        self.startup_error: str | None = None
        self.limits: dict = {}  # the first ready engine's (every engine has the same settings)
        self._dir = tempfile.mkdtemp(prefix="engram-dp-")
        self.address = f"ipc://{self._dir}/front"
        self._ctx = zmq.Context()
        self._router = self._ctx.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.LINGER, 0)
        self._router.bind(self.address)
        self._cmd_addr = f"inproc://dp-cmd-{id(self)}"
        self._pull = self._ctx.socket(zmq.PULL)
        self._pull.bind(self._cmd_addr)
        self._push = self._ctx.socket(zmq.PUSH)
        self._push.connect(self._cmd_addr)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._all_ready = threading.Event()
        self._ids = itertools.count()
        self._thread = threading.Thread(target=self._loop, name="engram-dp", daemon=True)

    # --- lifecycle -------------------------------------------------------------------
    def start(self) -> None:
        for e in self.engines:
            self._spawn(e)
        self._thread.start()

    def wait_ready(self, cancel: threading.Event | None = None) -> None:
        """Until every engine said ready (EngineFailed when one could not start)."""
        while not self._all_ready.wait(0.1):
            if self.startup_error:
                raise EngineFailed(self.startup_error)
            if cancel is not None and cancel.is_set():
                return

    def stop(self, timeout: float = 30.0) -> None:
        self._send_cmd({"op": "stop"})
        self._thread.join(timeout)
        for e in self.engines:
            if e.proc is not None and e.proc.poll() is None:
                e.proc.terminate()
        for e in self.engines:
            if e.proc is not None:
                try:
                    e.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    e.proc.kill()
        shutil.rmtree(self._dir, ignore_errors=True)

    def _spawn(self, e: EngineProc) -> None:
        e.spawn(engine_settings(self.cfg, e.index, self.size), self.address)
        log.info("engine %d: started (pid %d)", e.index, e.proc.pid)

    # --- what the handlers use (event-loop thread) --------------------------------------
    @property
    def max_tokens_per_seq(self) -> int:
        return self.limits["max_tokens_per_seq"]

    @property
    def max_context(self) -> int:
        return self.model.config.max_position_embeddings

    @property
    def cache(self) -> Cache:
        return Cache(self.limits["num_blocks"])

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
        with self._lock:
            live = [e for e in self.engines if e.live]
            if not live:
                raise EngineDead("no engine is running (restarting); retry shortly")
            target = min(live, key=lambda e: (e.open_seqs, e.index))
            room = cfg.max_queue + cfg.max_num_seqs
            if target.open_seqs + total > room:
                raise QueueFull(f"{target.open_seqs} sequences open on the least busy engine")
            reqs = []
            for prompt_ids, params in items:
                rid = f"cmpl-dp-{next(self._ids)}-{int(time.time() * 1000)}"
                req = RequestStream(rid, list(prompt_ids), params, loop)
                req.seqs = [SeqView() for _ in range(params.n)]
                self.requests[rid] = (target.index, req)
                target.open_seqs += params.n
                reqs.append(req)
        for req in reqs:
            self._send_cmd(
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
        with self._lock:
            entry = self.requests.get(request_id)
        if entry is not None:
            self._send_cmd({"op": "abort", "to": entry[0], "rid": request_id})

    def drain(self, message: str) -> None:
        self.draining = True

    def cut(self, message: str) -> None:
        with self._lock:
            ends = list(self.requests)
        for rid in ends:
            self.abort(rid)
            self._fail(rid, message)

    def offload_infos(self) -> dict:
        """GET /v1/offload under data parallel: each live engine's own (sent every second)."""
        texts = dict(self.offload_text)
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

    def _send_cmd(self, msg: dict) -> None:
        with self._lock:
            self._push.send(pack(msg))

    # --- the socket thread -------------------------------------------------------------
    def _loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        poller.register(self._pull, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                for sock, _ in poller.poll(100):
                    if sock is self._pull:
                        self._command(unpack(self._pull.recv()))
                    else:
                        ident, raw = self._router.recv_multipart()
                        self._from_engine(ident, unpack(raw))
                self._watch()
        finally:
            self._router.close()
            self._pull.close()
            with self._lock:
                self._push.close()
            self._ctx.term()

    def _command(self, msg: dict) -> None:
        if msg["op"] == "stop":
            for e in self.engines:
                if e.live:
                    self._router.send_multipart([e.identity, pack({"op": "stop"})])
            self._stop.set()
            return
        e = self.engines[msg.pop("to")]
        if e.live:
            self._router.send_multipart([e.identity, pack(msg)])
        elif msg["op"] == "add":
            self._fail(msg["rid"], f"engine {e.index} stopped before the request reached it")

    def _from_engine(self, ident: bytes, msg: dict) -> None:
        e = next((x for x in self.engines if x.identity == ident), None)
        if e is None:  # a previous generation's last words
            return
        op = msg["op"]
        if op == "ready":
            e.ready, e.failures = msg, 0
            self.limits = self.limits or msg
            how = "loaded" if msg["table_bytes_loaded"] else "attached to"
            log.info(
                "engine %d: ready in %.1fs (pid %d; %s the shared tables)",
                e.index,
                msg["startup_s"],
                msg["pid"],
                how,
            )
            if all(x.live for x in self.engines):
                self._all_ready.set()
        elif op == "failed":
            log.error("engine %d: could not start: %s", e.index, msg["error"])
            if not self._all_ready.is_set():
                self.startup_error = f"engine {e.index}: {msg['error']}"
        elif op == "metrics":
            self.metrics_text[e.index] = msg["text"]
        elif op == "offload":
            self.offload_text[e.index] = msg["info"]
        elif op == "delta":
            self._delta(msg)

    def _delta(self, msg: dict) -> None:
        rid = msg["rid"]
        with self._lock:
            entry = self.requests.get(rid)
        if entry is None:
            return
        index, req = entry
        d = delta_from_wire(msg)
        if msg.get("prompt_logprobs") and d.choice < len(req.seqs):
            req.seqs[d.choice].prompt_logprobs = delta_from_wire(
                {"choice": 0, "logprobs": msg["prompt_logprobs"]}
            ).logprobs
        req.push(d)
        if d.finish_reason is not None or d.error:
            self._close_choice(rid)

    def _close_choice(self, rid: str) -> None:
        with self._lock:
            entry = self.requests.get(rid)
            if entry is None:
                return
            index, req = entry
            req.open -= 1
            self.engines[index].open_seqs -= 1
            if req.open <= 0:
                self.requests.pop(rid, None)

    def _fail(self, rid: str, message: str) -> None:
        """End every open choice of ``rid`` with ``message`` (a 503: retry)."""
        with self._lock:
            entry = self.requests.pop(rid, None)
            if entry is None:
                return
            index, req = entry
            self.engines[index].open_seqs -= req.open
        for j in range(req.params.n):
            req.push(Delta(j, finish_reason="abort", error=message, unavailable=True))

    def _watch(self) -> None:
        """Restart engines that died (backing off while they keep dying); fail what they had
        open."""
        for e in self.engines:
            if e.proc is None and e.restart_at is not None and time.monotonic() >= e.restart_at:
                e.restart_at = None
                self._spawn(e)
            if e.proc is None or e.proc.poll() is None:
                continue
            code = e.proc.returncode
            if self._stop.is_set():
                continue
            if not self._all_ready.is_set() and e.ready is None and self.startup_error is None:
                self.startup_error = f"engine {e.index} exited with status {code} while starting"
                continue
            if self.startup_error:
                continue
            e.ready = None
            self.metrics_text.pop(e.index, None)
            self.offload_text.pop(e.index, None)
            with self._lock:
                lost = [rid for rid, (i, _) in self.requests.items() if i == e.index]
            for rid in lost:
                self._fail(
                    rid,
                    f"engine {e.index} (pid {e.proc.pid}) exited with status {code} while "
                    "running this request; it is restarting: retry",
                )
            log.error(
                "engine %d (pid %d) exited with status %s; %d requests failed; restarting",
                e.index,
                e.proc.pid,
                code,
                len(lost),
            )
            e.restarts += 1
            e.failures += 1
            e.proc = None
            delay = min(RESTART_MAX_DELAY_S, RESTART_DELAY_S * 2 ** (e.failures - 1))
            e.restart_at = time.monotonic() + delay


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
    state.metrics.registry = merged_registry(state.metrics.registry, lambda: dict(dp.metrics_text))
    state.engine = dp
    log.info("%d engines ready behind one front", dp.size)
