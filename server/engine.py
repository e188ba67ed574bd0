"""The serving engine: a step loop on its own thread, fed by the scheduler, off the event loop.

HTTP handlers submit requests and read results from per-request asyncio queues; they never
block the loop. A step that fails (a gather error, any exception) fails only the requests in
that step, with their KV memory freed; the engine keeps serving the rest.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from models.cache import KVCache
from models.generate import StepRunner
from offload.engine import OffloadEngine

from .detokenize import Detokenizer
from .metrics import Metrics
from .sampling import SamplingParams, sample_token, token_logprobs
from .scheduler import Scheduler, Sequence, Status

log = logging.getLogger("engram.engine")


class QueueFull(RuntimeError):
    pass


class EngineDead(RuntimeError):
    pass


@dataclass
class Delta:
    """What one sequence produced in one step (streamed to the handler)."""

    choice: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None


@dataclass
class EngineConfig:
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 1024
    max_queue: int = 256
    kv_blocks: int = 0  # 0: enough for max_num_seqs sequences at the model's full context
    block_size: int = 16


class Request:
    def __init__(self, rid: str, seqs: list[Sequence], loop: asyncio.AbstractEventLoop) -> None:
        self.id, self.seqs, self.loop = rid, seqs, loop
        self.queue: asyncio.Queue[Delta] = asyncio.Queue()
        self.arrival = time.monotonic()

    def push(self, delta: Delta) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, delta)
        except RuntimeError:  # the event loop is closed (shutdown): nobody is listening
            pass


class ServingEngine:
    def __init__(self, offload: OffloadEngine, config: EngineConfig, metrics: Metrics) -> None:
        self.offload, self.config, self.metrics = offload, config, metrics
        self.model, self.tokenizer = offload.model, offload.tokenizer
        mc = self.model.config
        blocks = config.kv_blocks or config.max_num_seqs * -(
            -mc.max_position_embeddings // config.block_size
        )
        self.cache = KVCache(
            mc,
            num_blocks=blocks,
            block_size=config.block_size,
            max_seqs=config.max_num_seqs,
            dtype=self.model.model.embed_tokens.weight.dtype,
            device=offload.device,
        )
        self.runner = StepRunner(self.model, self.cache, rows=offload.start_step)
        self.scheduler = Scheduler(
            self.cache, self.runner.new_sequence, config.max_num_seqs, config.max_num_batched_tokens
        )
        self.requests: dict[str, Request] = {}
        self._inbox: list = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._ids = itertools.count()
        self._thread = threading.Thread(target=self._loop, name="engram-engine", daemon=True)
        self.steps = 0
        self.fault: BaseException | None = None
        offload.accountant.subscribe(metrics.observe_offload_step)

    # --- lifecycle ----------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)
        self.offload.close()

    @property
    def max_context(self) -> int:
        return self.model.config.max_position_embeddings

    @property
    def max_tokens_per_seq(self) -> int:
        """The most tokens one sequence can ever hold: context limit or the whole KV pool."""
        return min(self.max_context, self.cache.num_blocks * self.cache.block_size)

    # --- API for handlers (event-loop thread) ----------------------------------
    def submit(self, prompt_ids: list[int], params: SamplingParams) -> Request:
        if self._stop.is_set() or not self._thread.is_alive():
            raise EngineDead("the engine is not running")
        with self._lock:
            waiting = len(self.scheduler.waiting) + sum(
                len(r.seqs) for op, r in self._inbox if op == "add"
            )
            if waiting + params.n > self.config.max_queue:
                raise QueueFull(
                    f"{waiting} sequences already waiting (max {self.config.max_queue})"
                )
            rid = f"cmpl-{next(self._ids)}-{int(time.time() * 1000)}"
            seqs = [
                Sequence(
                    rid,
                    i,
                    list(prompt_ids),
                    params,
                    Detokenizer(self.tokenizer, params.stop) if self.tokenizer else None,
                    params.generator(i),
                )
                for i in range(params.n)
            ]
            req = Request(rid, seqs, asyncio.get_running_loop())
            self._inbox.append(("add", req))
        self._wake.set()
        return req

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._inbox.append(("abort", request_id))
        self._wake.set()

    # --- the loop (engine thread) ----------------------------------------------
    def _drain_inbox(self) -> None:
        with self._lock:
            inbox, self._inbox = self._inbox, []
        for op, item in inbox:
            if op == "add":
                self.requests[item.id] = item
                for seq in item.seqs:
                    self.scheduler.add(seq)
                    self.metrics.prompt_tokens.inc(len(seq.prompt_ids))
            elif op == "abort" and item in self.requests:
                for seq in self.requests.pop(item).seqs:
                    if seq.status is not Status.FINISHED:
                        self.scheduler.finish(seq, "abort")
                        self.metrics.finished("abort")
        self.metrics.set_queue(len(self.scheduler.running), len(self.scheduler.waiting))

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._drain_inbox()
            step = self.scheduler.schedule()
            if step is None:
                self.metrics.set_kv_usage(self.cache.usage)
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            self.metrics.preemptions.inc(len(step.preempted))
            try:
                self._run(step)
            except Exception as e:  # fail this step's requests; keep serving
                log.exception("engine step failed")
                self.fault = e
                self._fail(step.seqs, f"engine error: {type(e).__name__}: {e}")
            self.steps += 1
            self.metrics.set_queue(len(self.scheduler.running), len(self.scheduler.waiting))
            self.metrics.set_kv_usage(self.cache.usage)

    def _fail(self, seqs: list[Sequence], message: str) -> None:
        for seq in seqs:
            req = self.requests.pop(seq.request_id, None)
            if req is None:
                continue
            for s in req.seqs:
                self.scheduler.finish(s, "error")
                req.push(Delta(s.choice, finish_reason="error", error=message))
                self.metrics.finished("error")

    def _run(self, step) -> None:
        need_all = any(
            s.wants_prompt_logprobs and s.computed < len(s.prompt_ids) for s in step.seqs
        )
        states = [s.state for s in step.seqs]
        logits = self.runner.step(states, step.new_ids, all_logits=need_all)
        now = time.monotonic()
        offsets = np.cumsum([len(x) for x in step.new_ids]) - 1
        for i, seq in enumerate(step.seqs):
            n = len(step.new_ids[i])
            if need_all and seq.wants_prompt_logprobs and seq.computed < len(seq.prompt_ids):
                self._prompt_logprobs(seq, logits, int(offsets[i]) - n + 1, n)
            seq.computed += n
        sample = [
            i
            for i, seq in enumerate(step.seqs)
            if step.samples[i] and seq.request_id in self.requests
        ]
        if not sample:
            return
        # One device-to-host copy for the whole step, not one sync per sequence.
        at = torch.as_tensor(offsets[sample] if need_all else sample, device=logits.device)
        rows = logits[at].float().cpu()
        for row, i in zip(rows, sample):
            self._append_token(step.seqs[i], row, now)

    def _prompt_logprobs(self, seq: Sequence, logits: torch.Tensor, start: int, n: int) -> None:
        """Logprob of each prompt token given the ones before it (the first has none)."""
        if seq.computed == 0:
            seq.prompt_logprobs.append(None)
        k = seq.params.logprobs or 0
        for j in range(n):
            pos = seq.computed + j + 1  # the prompt token this row predicts
            if pos < len(seq.prompt_ids):
                row = logits[start + j].float().cpu()
                seq.prompt_logprobs.append(token_logprobs(row, seq.prompt_ids[pos], k))

    def _append_token(self, seq: Sequence, row: torch.Tensor, now: float) -> None:
        params = seq.params
        tok = sample_token(row, params, seq.output_ids, seq.generator)
        seq.output_ids.append(tok)
        self.metrics.generation_tokens.inc()
        if seq.first_token_at is None:
            seq.first_token_at = now
            self.metrics.ttft.observe(now - seq.arrival)
            self.metrics.queue_time.observe((seq.scheduled_at or now) - seq.arrival)
        else:
            self.metrics.itl.observe(now - seq.last_token_at)
        seq.last_token_at = now
        delta = Delta(seq.choice, token_ids=[tok])
        if params.logprobs is not None:
            delta.logprobs.append(token_logprobs(row, tok, params.logprobs))
            seq.output_logprobs.append(delta.logprobs[-1])
        eos = self.model.config.eos_token_id
        if seq.detok is not None:
            delta.text = seq.detok.add(tok) if tok != eos else ""
        reason = None
        if tok == eos or (seq.detok is not None and seq.detok.stopped):
            reason = "stop"
        elif (
            len(seq.output_ids) >= params.max_tokens or len(seq.all_ids) >= self.max_tokens_per_seq
        ):
            reason = "length"
        if reason:
            if seq.detok is not None:
                delta.text += seq.detok.flush()
            delta.finish_reason = reason
            self.scheduler.finish(seq, reason)
            self.metrics.finished(reason)
            self.metrics.e2e.observe(now - seq.arrival)
        req = self.requests.get(seq.request_id)
        if req is not None:
            req.push(delta)
            if all(s.status is Status.FINISHED for s in req.seqs):
                self.requests.pop(seq.request_id, None)
