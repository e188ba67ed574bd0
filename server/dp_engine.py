"""One data-parallel engine process: ``python -m server.dp_engine INDEX GEN ADDRESS`` with the
server's settings as JSON in ``ENGRAM_DP_CONFIG``.

It starts exactly as a single server does (:class:`~server.app.ServerState`: weights, tables
from the node's shared memory, warm-up, kernel check), connects a ZeroMQ DEALER to the front's
ROUTER, says ``ready``, then serves ``add``/``abort`` with its own :class:`AsyncEngine` and
streams each request's deltas back. Its Prometheus text goes to the front every second. It
exits when the front says ``stop`` or is gone.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field

import torch
import zmq
import zmq.asyncio
from prometheus_client import generate_latest

from engine.async_engine import Delta, RequestStream

from .app import ServerState, offload_description
from .config import ServerConfig
from .dp_messages import delta_entry, pack, params_from_wire, unpack

log = logging.getLogger("engram.dp")
METRICS_EVERY_S = 1.0


@dataclass
class Route:
    rid: str  # the request's id at the front
    open: int  # choices whose last delta has not gone yet
    sent: set[int] = field(default_factory=set)  # choices whose prompt logprobs went


class Routes:
    """Where this engine's deltas go: each stream's front id, and the choices still open and
    those whose prompt logprobs went. Event-loop thread only: a request's route is written
    when it is added, before a delta of it can reach :meth:`message` (a step's deltas come
    to the loop through ``call_soon_threadsafe``, in order behind that)."""

    def __init__(self) -> None:
        self.by_stream: dict[str, Route] = {}
        self.stream_of: dict[str, str] = {}  # front id -> stream id, for aborts

    def add(self, rid: str, stream: RequestStream) -> None:
        self.by_stream[stream.id] = Route(rid, stream.params.n)
        self.stream_of[rid] = stream.id

    def drop(self, rid: str) -> str:
        """Forget an aborted request (the engine sends nothing more for it): its stream id."""
        stream_id = self.stream_of.pop(rid)
        del self.by_stream[stream_id]
        return stream_id

    def message(self, batch: list[tuple[RequestStream, Delta]]) -> dict:
        """One step's deltas as one ``step`` message, each choice's prompt logprobs once."""
        entries = []
        for stream, d in batch:
            route = self.by_stream.get(stream.id)
            if route is None:
                continue
            plp = None
            if d.choice not in route.sent and d.choice < len(stream.seqs):
                plp = stream.seqs[d.choice].prompt_logprobs or None
                if plp:
                    route.sent.add(d.choice)
            entries.append(delta_entry(route.rid, d, plp))
            if d.finish_reason is not None or d.error:
                route.open -= 1
                if route.open == 0:
                    del self.by_stream[stream.id], self.stream_of[route.rid]
        return {"op": "step", "deltas": entries}


def _plain(value):
    """numpy scalars and other non-JSON values in /v1/offload: as numbers, else as text."""
    return value.item() if hasattr(value, "item") else str(value)


async def serve(state: ServerState, identity: str, address: str, ready: dict) -> None:
    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, identity.encode())
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    await sock.send(pack(ready))
    engine, routes, parent = state.engine, Routes(), os.getppid()
    loop = asyncio.get_running_loop()

    def send(batch: list[tuple[RequestStream, Delta]]) -> None:
        msg = routes.message(batch)
        if msg["deltas"] and not sock.closed:  # closed: stopping, the front reads no more
            sock.send(pack(msg))  # queued in order by the socket; nothing to wait for here

    def publish(batch: list[tuple[RequestStream, Delta]]) -> None:  # the engine thread's
        try:
            loop.call_soon_threadsafe(send, batch)
        except RuntimeError:  # the loop is closed (stopping): nobody is listening
            pass

    engine.publish = publish  # one message per step to the front, not one per delta

    async def report() -> None:
        while True:
            if os.getppid() != parent:  # the front is gone: nobody will ever ask again
                os._exit(0)
            text = generate_latest(state.metrics.registry).decode()
            await sock.send(pack({"op": "metrics", "text": text}))
            try:
                info = json.dumps(offload_description(state), default=_plain)
            except Exception as e:  # never stop the metrics over it
                info = json.dumps({"error": f"{type(e).__name__}: {e}"})
            await sock.send(pack({"op": "offload", "info": info}))
            await asyncio.sleep(METRICS_EVERY_S)

    reporter = asyncio.ensure_future(report())
    try:
        while True:
            msg = unpack(await sock.recv())
            op = msg["op"]
            if op == "add":
                rid, params = msg["rid"], params_from_wire(msg["params"])
                try:
                    stream = engine.submit(msg["prompt_ids"], params)
                except Exception as e:  # the front checked limits; a full queue lands here
                    err = [
                        delta_entry(
                            rid, Delta(j, finish_reason="abort", error=str(e), unavailable=True)
                        )
                        for j in range(params.n)
                    ]
                    await sock.send(pack({"op": "step", "deltas": err}))
                    continue
                routes.add(rid, stream)
            elif op == "abort" and msg["rid"] in routes.stream_of:
                engine.abort(routes.drop(msg["rid"]))
            elif op == "drain":  # the front is shutting down: what has not started ends now
                engine.drain(msg["message"])
            elif op == "stop":
                break
    finally:
        reporter.cancel()
        sock.close()
        ctx.term()


def main(argv: list[str] | None = None) -> int:
    index, gen, address = (argv or sys.argv[1:])[:3]
    settings = json.loads(os.environ["ENGRAM_DP_CONFIG"]) | {
        "data_parallel_size": 1,
        "engine_process": False,
    }
    cfg = ServerConfig.make(**settings)
    logging.basicConfig(
        level=cfg.log_level.upper(),
        format=f"%(asctime)s %(levelname)s engine {index} %(name)s: %(message)s",
    )
    torch.set_num_threads(max(1, cfg.cpu_threads))
    start = time.perf_counter()
    state = ServerState(cfg)
    state.load()  # in this thread: nothing else to do until it is ready
    identity = f"engine-{index}-{gen}"
    if state.engine is None:
        ready = {"op": "failed", "error": state.load_error or "the engine did not start"}
        asyncio.run(_say(identity, address, ready))
        return 1
    store = state.engine.offload.store
    shared = state.cfg.engine.shared()
    ready = {
        "op": "ready",
        "pid": os.getpid(),
        "max_tokens_per_seq": state.engine.max_tokens_per_seq,
        "max_context": state.engine.max_context,
        "num_blocks": state.engine.cache.num_blocks,
        "startup_s": time.perf_counter() - start,
        "table_load_s": store.load_stats.seconds if store.load_stats else 0.0,
        "table_bytes_loaded": store.load_stats.bytes if store.load_stats else 0,
        "tables": "shared" if shared else "private",
    }
    try:
        asyncio.run(serve(state, identity, address, ready))
    finally:
        state.shutdown()
    return 0


async def _say(identity: str, address: str, msg: dict) -> None:
    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, identity.encode())
    sock.setsockopt(zmq.LINGER, 2000)
    sock.connect(address)
    await sock.send(pack(msg))
    sock.close()
    ctx.term()


if __name__ == "__main__":
    sys.exit(main())
