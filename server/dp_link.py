"""The data-parallel front's socket thread: one ZeroMQ ROUTER to the engines, the handlers'
commands, and the engine processes watched (a dead one fails its open requests and restarts).

The thread owns the ROUTER; handlers on the event loop never touch it, they push commands
(``add``, ``abort``, ``stop``) through an in-process PUSH/PULL pair that the thread polls with
the ROUTER. What engines report (ready, metrics, /v1/offload) lands in :class:`Reports`.
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import zmq

from offload.thread_names import name_os_thread

from .dp_messages import pack, unpack
from .dp_procs import EngineProc
from .dp_requests import OpenRequests

log = logging.getLogger("engram.dp")
RESTART_DELAY_S = 0.5
RESTART_MAX_DELAY_S = 30.0


@dataclass
class Reports:
    """What the engines told the front."""

    limits: dict = field(default_factory=dict)  # the first ready engine's (all have the same)
    metrics_text: dict[int, str] = field(default_factory=dict)
    offload_text: dict[int, str] = field(default_factory=dict)  # each engine's /v1/offload JSON
    startup_error: str | None = None
    all_ready: threading.Event = field(default_factory=threading.Event)


class FrontLink:
    def __init__(
        self,
        engines: list[EngineProc],
        requests: OpenRequests,
        spawn: Callable[[EngineProc], None],
    ) -> None:
        self.engines, self.requests, self.spawn = engines, requests, spawn
        self.reports = Reports()
        self.dir = tempfile.mkdtemp(prefix="engram-dp-")
        self.address = f"ipc://{self.dir}/front"
        self._ctx = zmq.Context()
        self._router = self._ctx.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.LINGER, 0)
        self._router.bind(self.address)
        cmd_addr = f"inproc://dp-cmd-{id(self)}"
        self._pull = self._ctx.socket(zmq.PULL)
        self._pull.bind(cmd_addr)
        self._push = self._ctx.socket(zmq.PUSH)
        self._push.connect(cmd_addr)
        self._push_lock = threading.Lock()
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="engram-dp", daemon=True)

    def send(self, msg: dict) -> None:
        """A command for the socket thread (any thread)."""
        with self._push_lock:
            self._push.send(pack(msg))

    def _loop(self) -> None:
        name_os_thread()
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
            with self._push_lock:
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
            self.requests.fail(
                msg["rid"], f"engine {e.index} stopped before the request reached it"
            )

    def _from_engine(self, ident: bytes, msg: dict) -> None:
        e = next((x for x in self.engines if x.identity == ident), None)
        if e is None:  # a previous generation's last words
            return
        op, reports = msg["op"], self.reports
        if op == "ready":
            e.ready, e.failures = msg, 0
            reports.limits = reports.limits or msg
            how = "loaded" if msg["table_bytes_loaded"] else "attached to"
            log.info(
                "engine %d: ready in %.1fs (pid %d; %s the shared tables)",
                e.index,
                msg["startup_s"],
                msg["pid"],
                how,
            )
            if all(x.live for x in self.engines):
                reports.all_ready.set()
        elif op == "failed":
            log.error("engine %d: could not start: %s", e.index, msg["error"])
            if not reports.all_ready.is_set():
                reports.startup_error = f"engine {e.index}: {msg['error']}"
        elif op == "metrics":
            reports.metrics_text[e.index] = msg["text"]
        elif op == "offload":
            reports.offload_text[e.index] = msg["info"]
        elif op == "step":
            self.requests.step(msg["deltas"])

    def _watch(self) -> None:
        """Restart engines that died (backing off while they keep dying); fail what they had
        open."""
        reports = self.reports
        for e in self.engines:
            if e.proc is None and e.restart_at is not None and time.monotonic() >= e.restart_at:
                e.restart_at = None
                self.spawn(e)
            if e.proc is None or e.proc.poll() is None:
                continue
            code = e.proc.returncode
            if self._stop.is_set():
                continue
            if not reports.all_ready.is_set() and e.ready is None and not reports.startup_error:
                reports.startup_error = f"engine {e.index} exited with status {code} while starting"
                continue
            if reports.startup_error:
                continue
            e.ready = None
            reports.metrics_text.pop(e.index, None)
            reports.offload_text.pop(e.index, None)
            lost = self.requests.ids(e.index)
            for rid in lost:
                self.requests.fail(
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
