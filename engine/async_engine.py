"""The engine on its own thread, for the server: requests in, per-request streams of deltas out.

HTTP handlers submit requests and read deltas from per-request asyncio queues; they never
block the event loop. The thread drains an inbox (adds, aborts) between steps, runs
:meth:`Engine.step`, and routes each sequence's output to its request's queue. A failed step
fails only the requests in it; the engine keeps serving the rest.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from offload.offloaded_model import OffloadedModel
from offload.thread_names import name_os_thread

from .config import EngineConfig
from .engine import Engine, EngineStats, SeqOutput
from .memories import BadMemory, Memory
from .sampling import BadParams, SamplingParams
from .sequence import Sequence


class QueueFull(RuntimeError):
    pass


class EngineDead(RuntimeError):
    pass


class Draining(RuntimeError):
    """The server is shutting down: it admits no new requests."""


class NeverFits(ValueError):
    """A request larger than the engine's limits: waiting cannot help. ``param`` names the
    request field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass
class Delta:
    """What one sequence produced in one step (streamed to the handler)."""

    choice: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    bad_params: bool = False  # the error comes from the request's own parameters
    unavailable: bool = False  # the server is shutting down: a 503, retry elsewhere


class TwoReaders(RuntimeError):
    """A second reader waited on a request's deltas: each has one (its handler's stream)."""


class Deltas:
    """A request's deltas on its event loop, for its one reader: a deque and at most one
    waiting future. What asyncio.Queue does per put and get (counting unfinished tasks, an
    Event cleared per put, a getter deque, a putter wake-up per get) is the event loop's
    cost per token per stream, and none of it is used here. Event-loop thread only (the
    engine thread hands deltas over with one call_soon_threadsafe per step)."""

    __slots__ = ("items", "waiter", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """``loop``: the reader's (None: the running loop when it waits). Kept, because
        ``asyncio.get_running_loop`` makes a getpid system call each time (Python 3.11)."""
        self.items: deque[Delta] = deque()
        self.waiter: asyncio.Future | None = None
        self.loop = loop

    def put_nowait(self, delta: Delta) -> None:
        self.items.append(delta)
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():  # a cancelled reader left it: its delta stays queued
                waiter.set_result(None)

    def empty(self) -> bool:
        return not self.items

    def get_nowait(self) -> Delta:
        if not self.items:
            raise asyncio.QueueEmpty
        return self.items.popleft()

    async def get(self) -> Delta:
        """The next delta, waiting for it. Cancelled while waiting, it takes nothing."""
        while not self.items:
            if self.waiter is not None and not self.waiter.done():
                raise TwoReaders("a request's deltas have one reader")
            loop = self.loop or asyncio.get_running_loop()
            waiter = self.waiter = loop.create_future()
            try:
                await waiter
            finally:
                if self.waiter is waiter:
                    self.waiter = None
        return self.items.popleft()


class RequestStream:
    """One submitted prompt (its ``n`` sequences) and the queue its deltas arrive on."""

    def __init__(
        self,
        rid: str,
        prompt_ids: list[int],
        params: SamplingParams,
        loop,
        memory: str | None = None,
    ) -> None:
        self.id, self.prompt_ids, self.params, self.loop = rid, prompt_ids, params, loop
        self.memory = memory  # the Engram memory's name (None: the served model's own)
        self.seqs: list[Sequence] = []
        self.open = params.n  # choices whose last delta has not been pushed yet
        self.queue = Deltas(loop)
        self.arrival = time.monotonic()
        self.held: dict[int, Delta] = {}  # per choice, what --stream-interval holds back
        self.started: set[int] = set()  # choices whose first tokens have been pushed

    def every_choice(self, **fields) -> list[tuple[RequestStream, Delta]]:
        """A last delta with ``fields`` for each choice (the request ends as a whole: an
        error, an abort), ready to publish."""
        return [(self, Delta(j, **fields)) for j in range(self.params.n)]

    def grouped(self, delta: Delta, interval: int) -> Delta | None:
        """``delta`` joined to what its choice holds, once it is due (``--stream-interval``):
        a choice's first tokens and its last delta go at once, the rest in groups of
        ``interval`` tokens; None while a group fills."""
        held = self.held.pop(delta.choice, None)
        if held is not None:
            lp = [*held.logprobs, *delta.logprobs] if held.logprobs or delta.logprobs else ()
            ids = held.token_ids + delta.token_ids
            delta = Delta(delta.choice, held.text + delta.text, ids, lp, delta.finish_reason)
        if (
            delta.finish_reason is None
            and delta.choice in self.started
            and len(delta.token_ids) < interval
        ):
            self.held[delta.choice] = delta
            return None
        if delta.token_ids:
            self.started.add(delta.choice)
        return delta


def _put_all(batch: list[tuple[Deltas, Delta]]) -> None:
    for queue, delta in batch:
        queue.put_nowait(delta)


def push_step(batch: list[tuple[RequestStream, Delta]]) -> None:
    """A step's deltas, in order, with one wake-up of each event loop they go to (not one per
    delta: the event loop's per-token cost at many streams)."""
    loops: dict = {}
    for req, delta in batch:
        loops.setdefault(req.loop, []).append((req.queue, delta))
    for loop, items in loops.items():
        try:
            loop.call_soon_threadsafe(_put_all, items)
        except RuntimeError:  # the event loop is closed (shutdown): nobody is listening
            pass


class AsyncEngine:
    def __init__(
        self, offloaded: OffloadedModel, config: EngineConfig, stats: EngineStats | None = None
    ) -> None:
        self.offload, self.config = offloaded, config
        self.engine = Engine(
            offloaded.model, config, offloaded.prefetcher, offloaded.tokenizer, stats
        )
        self.model, self.tokenizer = offloaded.model, offloaded.tokenizer
        self.requests: dict[str, RequestStream] = {}
        self._inbox: list = []
        self._waiting_in_inbox = 0
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._ids = itertools.count()
        self._thread = threading.Thread(target=self._loop, name="engram-engine", daemon=True)
        # where every delta goes, a step's at once: the handlers' event loops; an engine
        # process behind a front (server/dp_engine.py) sends them as one message a step
        self.publish: Callable[[list[tuple[RequestStream, Delta]]], None] = push_step
        self.steps = 0
        self.draining = False

    # --- lifecycle ----------------------------------------------------------------
    def start(self) -> None:
        # everything built so far (model, tables, tokenizer) lives as long as the server: out
        # of the collector's sight, so a step's collections walk only the step's own objects
        gc.collect()
        gc.freeze()
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)
        with self._lock:  # a load or unload posted too late is answered, not left waiting
            late = [x for x in self._inbox if x[0] in ("install", "remove")]
            self._inbox = [x for x in self._inbox if x not in late]
        for _, (_, done) in late:
            done.set_exception(EngineDead("the engine is not running"))
        self.engine.close()
        for m in self.memories.snapshot():
            if not m.base:
                m.close()
        self.offload.close()
        gc.unfreeze()  # what start froze can be collected again

    # --- graceful shutdown (event-loop thread; the engine thread acts between steps) ------
    def drain(self, message: str) -> None:
        """Admit nothing more; requests none of whose sequences has been scheduled yet end now
        with ``message`` (a 503). Running ones go on."""
        self.draining = True
        self._post("drain", message)

    def cut(self, message: str) -> None:
        """End every open request now with ``message`` (a 503); their KV memory is freed."""
        self._post("cut", message)

    @property
    def busy(self) -> bool:
        """Requests are queued or running."""
        return bool(self.requests) or bool(self._inbox)

    def _post(self, op: str, item) -> None:
        with self._lock:
            self._inbox.append((op, item))
        self._wake.set()

    def _end(self, req: RequestStream, message: str) -> None:
        self.requests.pop(req.id, None)
        self.engine.abort(req.seqs)
        self.publish(req.every_choice(finish_reason="abort", error=message, unavailable=True))

    @property
    def cache(self):
        return self.engine.cache

    @property
    def fault(self) -> BaseException | None:
        return self.engine.fault

    @property
    def max_context(self) -> int:
        return self.model.config.max_position_embeddings

    @property
    def max_tokens_per_seq(self) -> int:
        return self.engine.max_tokens_per_seq

    # --- API for handlers (event-loop thread) ----------------------------------
    def submit(
        self, prompt_ids: list[int], params: SamplingParams, memory: str | None = None
    ) -> RequestStream:
        return self.submit_many([(prompt_ids, params)], memory)[0]

    def submit_many(
        self, items: list[tuple[list[int], SamplingParams]], memory: str | None = None
    ) -> list[RequestStream]:
        """Queue prompts together: all or none. NeverFits (or BadParams) when no amount of
        waiting can admit them, QueueFull when the queue has no room for them now.
        ``memory``: the Engram memory they read (None: the served model's own)."""
        if self.draining:
            raise Draining("the server is shutting down")
        if self._stop.is_set() or not self._thread.is_alive():
            raise EngineDead("the engine is not running")
        for _, params in items:
            params.check(self.model.config.vocab_size)
        cfg, total = self.config, sum(params.n for _, params in items)
        widest = max(params.n for _, params in items)
        if widest > cfg.max_num_seqs:
            raise NeverFits(
                f"{widest} sequences per prompt can never run together: --max-num-seqs is "
                f"{cfg.max_num_seqs}",
                "n",
            )
        if total > cfg.max_queue:  # the prompt list is what overflows unless n alone does
            raise NeverFits(
                f"{total} sequences ({len(items)} prompts x {widest}) can never be queued: "
                f"--max-queue is {cfg.max_queue}",
                "n" if len(items) == 1 else "prompt",
            )
        loop = asyncio.get_running_loop()
        with self._lock:
            waiting = len(self.engine.scheduler.waiting) + self._waiting_in_inbox
            if waiting + total > cfg.max_queue:
                limit = f"--max-queue {cfg.max_queue}"
                raise QueueFull(f"{waiting} sequences already waiting ({limit})")
            reqs = []
            for prompt_ids, params in items:
                rid = f"cmpl-{next(self._ids)}-{int(time.time() * 1000)}"
                reqs.append(RequestStream(rid, list(prompt_ids), params, loop, memory))
                self._inbox.append(("add", reqs[-1]))
            self._waiting_in_inbox += total
        self._wake.set()
        return reqs

    def abort(self, request_id: str) -> None:
        self._post("abort", request_id)

    # --- memories (any thread; the engine thread swaps them between steps) -------------
    @property
    def memories(self):
        return self.engine.memories

    def install_memory(self, memory: Memory) -> concurrent.futures.Future:
        """Serve ``memory`` under its name from the next step (a reload: the old version
        retires); the future holds the version it replaced, or None."""
        return self._post_memory("install", memory)

    def remove_memory(self, name: str) -> concurrent.futures.Future:
        """Stop serving ``name`` to new requests; running ones finish on it. The future
        holds the removed memory (BadMemory when the name is not loaded)."""
        return self._post_memory("remove", name)

    def _post_memory(self, op: str, arg) -> concurrent.futures.Future:
        done: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:  # stop() answers what is left in the inbox under the same lock
            if self._stop.is_set() or not self._thread.is_alive():
                done.set_exception(EngineDead("the engine is not running"))
            else:
                self._inbox.append((op, (arg, done)))
        self._wake.set()
        return done

    # --- the loop (engine thread) ----------------------------------------------
    def _drain_inbox(self) -> None:
        with self._lock:
            inbox, self._inbox = self._inbox, []
            self._waiting_in_inbox = 0
        for op, item in inbox:
            if op == "add":
                try:
                    item.seqs = self.engine.add(item.id, item.prompt_ids, item.params, item.memory)
                except Exception as e:  # checked at submit: only a bug lands here
                    bad = isinstance(e, (BadParams, BadMemory))
                    msg = str(e) if bad else f"engine error: {type(e).__name__}: {e}"
                    self.publish(
                        item.every_choice(finish_reason="error", error=msg, bad_params=bad)
                    )
                    continue
                self.requests[item.id] = item
            elif op == "abort" and item in self.requests:
                self.engine.abort(self.requests.pop(item).seqs)
            elif op == "drain":  # the queued: not one of their sequences has run yet
                for req in list(self.requests.values()):
                    if all(s.scheduled_at is None for s in req.seqs):
                        self._end(req, item)
            elif op == "cut":
                for req in list(self.requests.values()):
                    self._end(req, item)
            elif op in ("install", "remove"):
                arg, done = item
                try:
                    mem = self.memories
                    done.set_result(mem.install(arg) if op == "install" else mem.remove(arg))
                except Exception as e:
                    done.set_exception(e)

    def _loop(self) -> None:
        name_os_thread()
        dev = self.engine.device
        if dev.type == "cuda" and dev.index is not None:  # events and kernels go to its device
            torch.cuda.set_device(dev)
        while not self._stop.is_set():
            self._drain_inbox()
            if not self.engine.has_work:
                self.engine.step()  # reports an idle scheduler
                self.engine.runner.rows.flush()  # the last steps' offload figures
                self.memories.idle()  # nothing in flight: every memory may move out
                self.memories.collect(idle=True)  # retired versions no step can read now
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            batch: list[tuple[RequestStream, Delta]] = []
            for out in self.engine.step():
                self._deliver(out, batch)
            if batch:  # (an engine process would wake its loop for nothing)
                self.publish(batch)
            self.steps += 1
            if self.memories.freeing:
                self.memories.collect()

    def _deliver(self, out: SeqOutput, batch: list[tuple[RequestStream, Delta]]) -> None:
        req = self.requests.get(out.seq.request_id)
        if req is None:
            return
        if out.error is not None:  # the request fails as a whole: its other choices too
            self.requests.pop(req.id, None)
            for s in req.seqs:
                if not s.finished:
                    self.engine.finish(s, "error")
            bad = out.bad_params
            batch += req.every_choice(finish_reason="error", error=out.error, bad_params=bad)
            return
        delta = Delta(out.seq.choice, out.text, out.token_ids, out.logprobs, out.finish_reason)
        if self.config.stream_interval > 1:
            delta = req.grouped(delta, self.config.stream_interval)
            if delta is None:
                return
        batch.append((req, delta))
        if out.finish_reason is not None:
            req.open -= 1
            if req.open == 0:  # every choice's last delta is out
                self.requests.pop(req.id, None)
