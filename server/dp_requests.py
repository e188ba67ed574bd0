"""The data-parallel front's open requests: which engine each went to, each engine's open work.

Handlers place requests (on the live engine with the fewest open sequences); the socket thread
pushes each request's deltas and closes its choices, or fails them all when their engine dies.
One lock guards the table and the engines' counters, shared by both threads.
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field

from engine.async_engine import Delta, EngineDead, QueueFull, RequestStream, push_step
from engine.sampling import SamplingParams

from .dp_messages import entry_delta
from .dp_procs import EngineProc


@dataclass
class SeqView:
    """What the handlers read of an engine-side sequence: its prompt logprobs."""

    prompt_logprobs: list = field(default_factory=list)


class OpenRequests:
    def __init__(self, engines: list[EngineProc]) -> None:
        self.engines = engines
        self.by_id: dict[str, tuple[int, RequestStream]] = {}
        self.lock = threading.Lock()
        self._ids = itertools.count()

    def __len__(self) -> int:  # open requests (a single engine's ``requests`` has a len too)
        return len(self.by_id)

    def place(
        self, items: list[tuple[list[int], SamplingParams]], room: int, loop
    ) -> tuple[EngineProc, list[RequestStream]]:
        """Streams for ``items``, all on the least busy live engine (EngineDead when none is
        live, QueueFull when it has not ``room`` for them)."""
        total = sum(p.n for _, p in items)
        with self.lock:
            live = [e for e in self.engines if e.live]
            if not live:
                raise EngineDead("no engine is running (restarting); retry shortly")
            target = min(live, key=lambda e: (e.open_seqs, e.index))
            if target.open_seqs + total > room:
                raise QueueFull(f"{target.open_seqs} sequences open on the least busy engine")
            reqs = []
            for prompt_ids, params in items:
                rid = f"cmpl-dp-{next(self._ids)}-{int(time.time() * 1000)}"
                req = RequestStream(rid, list(prompt_ids), params, loop)
                req.seqs = [SeqView() for _ in range(params.n)]
                self.by_id[rid] = (target.index, req)
                target.open_seqs += params.n
                reqs.append(req)
        return target, reqs

    def engine_of(self, rid: str) -> int | None:
        with self.lock:
            entry = self.by_id.get(rid)
        return entry[0] if entry is not None else None

    def ids(self, engine: int | None = None) -> list[str]:
        """Open request ids (of one engine when given)."""
        with self.lock:
            return [rid for rid, (i, _) in self.by_id.items() if engine is None or i == engine]

    def step(self, entries: list[list]) -> None:
        """An engine's ``step`` message: each delta to its request, all of them handed to the
        event loops at once; a last one closes a choice."""
        batch: list[tuple[RequestStream, Delta]] = []
        with self.lock:
            for entry in entries:
                rid, d, plp = entry_delta(entry)
                got = self.by_id.get(rid)
                if got is None:  # failed on this side already
                    continue
                index, req = got
                if plp and d.choice < len(req.seqs):
                    req.seqs[d.choice].prompt_logprobs = plp
                batch.append((req, d))
                if d.finish_reason is not None or d.error:  # the choice is closed
                    req.open -= 1
                    self.engines[index].open_seqs -= 1
                    if req.open <= 0:
                        self.by_id.pop(rid, None)
        push_step(batch)

    def drop(self, rid: str) -> None:
        """Forget ``rid`` (aborted: its handler reads no more, and the engine sends nothing
        for an aborted request), its open choices off its engine's count."""
        with self.lock:
            entry = self.by_id.pop(rid, None)
            if entry is not None:
                self.engines[entry[0]].open_seqs -= entry[1].open

    def fail(self, rid: str, message: str) -> int | None:
        """End every open choice of ``rid`` with ``message`` (a 503: retry); the index of the
        engine it was on (None: not open)."""
        with self.lock:
            entry = self.by_id.pop(rid, None)
            if entry is None:
                return None
            index, req = entry
            self.engines[index].open_seqs -= req.open
        push_step(req.every_choice(finish_reason="abort", error=message, unavailable=True))
        return index
