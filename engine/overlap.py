"""Overlapped steps: the host prepares step N+1 while the device runs step N.

    call k:  schedule N+1 -> prepare it on the host (blocks, hashing, packing) -> submit
             read step N's tokens (the device has moved on to N+1) -> append, detokenize,
             stop strings, finish, stream

A sequence sampled in step N feeds that token to step N+1 before the host has read it: its
id there is a placeholder (``sequence.PLACEHOLDER``) that the device side fills in from step
N's tokens, together with the token's own part of its n-gram hash (:mod:`engine.step_rows`).
The host reads step N's tokens one step late. A sequence that step N's token finishes (EOS, a
stop string, an abort meanwhile) still runs in step N+1; that extra token is dropped, never
streamed, and its KV blocks, freed now, are reused only by steps the device runs after N+1.
A sequence whose in-flight token is its last by length is not scheduled again. Steps that
score prompts (prompt logprobs, ``max_tokens=0``) run in series: the pipeline drains first.

The device side runs on :class:`engine.step_queue.StepQueue`'s worker, one job after another.

With ``device_rows`` (on CUDA by default where the rows' path reads device indices: resident
tables, the UVA kernel), a step's sampled tokens stay on the device (:class:`StepTokens`): the
next step's placeholders take their input ids and Engram rows from them there
(:mod:`engine.device_hash`; in CUDA-graph decode steps too, :mod:`engine.graph_inputs`), and
a non-blocking copy brings them to pinned host memory for the host to read one step late.
Steps that need the ids on the host (penalties, de-duplication, hot caches, the file tier,
several memories) read them first, as before, eager or graph steps alike.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from .device_hash import DeviceRows, reads_device_ids
from .host_time import NO_TIMER
from .inputs import to_device
from .sampling import SampleRow, draw, logprobs_of, unpack_logprobs
from .scheduler import ScheduledStep
from .sequence import Sequence
from .step_queue import Pending, StepQueue

if TYPE_CHECKING:
    from .engine import Engine, SeqOutput

log = logging.getLogger("engram.engine")


@dataclass
class Job:
    step: ScheduledStep
    seqs: list[Sequence]  # the sampled sequences, in the order of their tokens
    rows: list[SampleRow]
    at: list[int] | None  # their rows in the step's logits (None: every row, in order)
    wait_slots: np.ndarray  # KV slots of the sequences fed a placeholder, in token order
    src: list[int]  # for each placeholder: its row in the previous job's tokens
    penalised: list[tuple[int, int]] = field(default_factory=list)  # (row, src) to extend
    # the block-table writes its inputs carry (KVCache.take_written; None: a graph step
    # that started no block)
    written: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
    future: Pending | None = None


class StepTokens:
    """A step's sampled tokens on the device (``tokens``: [S] int64), and their non-blocking
    copy to pinned host memory, with the logprobs asked for (``packed``: rows ``want``, as
    :func:`engine.sampling.sample` packs them); :meth:`read` waits for that copy only."""

    def __init__(self, tokens, packed, want: list[int], ks: list[int]) -> None:
        self.tokens, self.want, self.ks = tokens, want, ks
        self.width = 0 if packed is None else packed.shape[1]
        src = tokens if packed is None else torch.cat([tokens.double(), packed.flatten()])
        self.copied = None
        if src.is_cuda:
            self.host = torch.empty(src.shape, dtype=src.dtype, pin_memory=True)
            self.host.copy_(src, non_blocking=True)
            self.copied = torch.cuda.Event()
            self.copied.record()
        else:
            self.host = src
        self._got: list | None = None
        self._lock = threading.Lock()  # the worker (a step that needs them) or the host

    def wait(self) -> None:
        """Until the copy to the host is done (the host's only wait on the device)."""
        if self.copied is not None:
            self.copied.synchronize()

    def read(self) -> list[tuple]:
        """(token, logprobs) per row, once the copy is done."""
        with self._lock:
            if self._got is None:
                if self.copied is not None:
                    self.copied.synchronize()
                host, S = self.host.tolist(), self.tokens.shape[0]
                if not self.want:
                    self._got = [(t, None) for t in host]
                else:
                    w = self.width
                    table = [host[S + j * w : S + (j + 1) * w] for j in range(len(self.want))]
                    got = dict(zip(self.want, unpack_logprobs(table, self.ks)))
                    self._got = [(int(host[i]), got.get(i)) for i in range(S)]
            return self._got


def _token(got: list | None, k: int) -> int:
    """Row k's token from a job's result (0 for a row or a step that failed: its sequence is
    failed on the host, so what this step makes of it is dropped)."""
    if got is None or isinstance(got[k], Exception):
        return 0
    return int(got[k][0])


class Overlap:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.queue = StepQueue(engine.device)
        self.inflight: Job | None = None
        runner, want = engine.runner, engine.config.device_rows
        if want is None:
            want = engine.device.type == "cuda"
        if want and reads_device_ids(runner.rows):
            runner.device_rows = DeviceRows(runner.ngram, engine.device)

    def close(self) -> None:
        self.queue.close()

    def step(self, timer=NO_TIMER) -> list[SeqOutput]:
        e = self.engine
        outputs: list[SeqOutput] = []
        if e.needs_series():
            if self.inflight is not None:
                outputs += self._collect(self.inflight, None, timer)
                self.inflight = None
            return outputs + e.step_in_series(timer)
        with timer("schedule"):
            step = e.scheduler.schedule()
        job, failed = None, []
        if step is not None:
            e.stats.preempted(len(step.preempted))
            job = self._submit(step, failed, timer)
        prev, self.inflight = self.inflight, job
        if prev is not None:
            outputs += self._collect(prev, job, timer)
        with timer("stats"):
            e._report()
        return outputs + failed

    # --- host side -----------------------------------------------------------------------------
    def _submit(self, step: ScheduledStep, failed: list, timer) -> Job | None:
        e, prev = self.engine, self.inflight
        n, known = len(step.seqs), step.known
        try:
            prep = e.runner.step(step.seqs, step.new_ids, False, timer, known, later=True)
        except Exception as ex:  # a shared fault on the host side: this step's sequences fail
            e.fail_step(step, ex, failed)
            return None
        with timer("sample"):
            every = all(step.samples)
            at = None if every else [i for i in range(n) if step.samples[i]]
            seqs = step.seqs if every else [step.seqs[i] for i in at]
            # a sequence fed its token in flight is sampled too: ``known`` read by sampled row
            fed = known if every else [known[i] for i in at]
            rows = []
            penalised = []  # (row, its token's row in the step before) to extend
            src = []  # for each placeholder, in token order: its token's row in the step before
            for k, s in enumerate(seqs):  # Engine.sample_inputs, in the same pass
                if not fed[k]:
                    src.append(s.inflight_row)
                r = s.sample_row
                if not s.same_row or r is None:
                    r = e.sample_input(s)
                    if r.output_ids is not s.output_ids:
                        penalised.append((k, s.inflight_row))
                rows.append(r)
                s.inflight, s.inflight_row = s.inflight + 1, k
        wait_slots = prep.parts["conv_slots"][prep.rows.wait] if src else prep.rows.wait
        job = Job(step, seqs, rows, at, wait_slots, src, penalised)
        parts = prep.parts
        if "table_slots" in parts:
            job.written = (parts["table_slots"], parts["table_cols"], parts["table_blocks"])
        job.future = self.queue.submit(self._device, job, prep, prev)
        return job

    def _collect(self, job: Job, after: Job | None, timer) -> list[SeqOutput]:
        """Read ``job``'s tokens (waiting for the device) and hand them out; ``after``: the job
        submitted since, whose placeholders' n-gram histories get their ids now."""
        e = self.engine
        outputs: list[SeqOutput] = []
        try:
            got = job.future.result()
            if type(got) is StepTokens:  # on the device: wait for its copy back
                with timer("sync"):  # the wait alone: reading the rows is host work
                    got.wait()
                got = got.read()
        except Exception as ex:  # the shared forward pass failed: the step's sequences fail
            for seq in job.seqs:
                seq.inflight -= 1
            e.fail_step(job.step, ex, outputs)
            return outputs
        now = time.monotonic()
        with timer("append"):
            e.append_all(job.seqs, got, now, outputs, late=True)
        if after is not None and after.src:
            # no sequence was admitted since ``after`` was scheduled: its slots are still theirs
            # (a slot freed meanwhile starts over when it is next admitted)
            with timer("hash"):
                # the placeholders' tokens, read by row as the device side reads them
                ids = np.fromiter((_token(got, k) for k in after.src), np.int64, len(after.src))
                e.runner.ngram.resolved(after.wait_slots, ids)
        return outputs

    # --- device side (the queue's worker) ------------------------------------------------------
    def _device(self, job: Job, prep, prev: Job | None) -> list:
        e = self.engine
        got = None
        if prev is not None:
            try:
                got = prev.future.result()  # done: the worker ran it just before this one
            except Exception:
                got = None
                # its table writes may never have reached the device side, and this step was
                # prepared before the host knew (it resyncs every table from the next step on)
                if prev.written is not None:
                    e.runner.tables.apply(*prev.written)
        dev = e.runner.device_rows
        if (
            type(got) is StepTokens and job.src and not job.penalised and prep.groups is None
        ):  # step N's tokens stay where they are: N+1 is issued before the host reads them
            # (an eager step or a CUDA-graph decode step alike: engine/graph_inputs.py)
            tokens = got.tokens[to_device(job.src, got.tokens.device, torch.long)]
        else:
            if type(got) is StepTokens and (job.src or job.penalised):  # needed here: read
                try:
                    got = got.read()
                except Exception:
                    got = None
            tokens = np.fromiter((_token(got, k) for k in job.src), np.int64, len(job.src))
            for row, k in job.penalised:
                job.rows[row].output_ids.append(_token(got, k))
        logits = prep.run(tokens)
        e.stats.step_logits(logits)
        if not job.rows:  # prompt chunks only: nothing to sample
            return []
        if job.at is not None:
            logits = logits[to_device(job.at, logits.device, torch.long)]
        if dev is None:
            return e.sample_rows(logits, job.rows)
        return self._sample_on_device(logits, job.rows)

    def _sample_on_device(self, logits: torch.Tensor, rows: list[SampleRow]):
        """The step's tokens left on the device (:class:`StepTokens`); if the batched sampler
        raises, generators are rewound and the engine's own fallback samples row by row."""
        states = [
            None if r.params.greedy or r.params.seed is None else r.generator.get_state()
            for r in rows
        ]
        try:
            tokens = draw(logits, rows)
            want = [i for i, row in enumerate(rows) if row.params.logprobs is not None]
            ks = [rows[i].params.logprobs for i in want]
            packed = None
            if want:
                at = to_device(want, logits.device)
                packed = logprobs_of(logits[at], tokens[at], max(ks))
            return StepTokens(tokens, packed, want, ks)
        except Exception:
            for r, st in zip(rows, states):
                if st is not None:
                    r.generator.set_state(st)
            return self.engine.sample_rows(logits, rows)
