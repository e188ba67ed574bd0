"""The engine loop: where one step runs, for the server, engram-generate and engram-bench.

    step = scheduler.schedule()            which sequences, how many new tokens each
    logits = runner.step(...)              rows prefetched, one upload, the forward pass
    tokens = sample(logits, ...)           on the device, one copy back
    append, detokenize, stop, finish       per sequence

``Engine.step`` is synchronous and single-threaded; :mod:`engine.async_engine` runs it on a
thread for the server. A fault that belongs to one sequence (its sampling, logprobs,
detokenizing, stop strings) fails that sequence alone; a fault in the shared forward pass fails
the step's sequences. Either way their KV memory is freed and the engine goes on with the rest.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from models.llama import EngramForCausalLM
from models.tokenizer import EngramTokenizer
from offload.prefetch import Prefetcher

from .config import EngineConfig
from .determinism import set_deterministic
from .detokenize import Detokenizer
from .host_time import NO_TIMER, HostTimer, NoTimer
from .inputs import to_device
from .kv_cache import KVCache
from .memories import BadMemory
from .model_runner import ModelRunner
from .overlap import Overlap
from .sampling import (
    BadParams,
    SampleRow,
    SamplingParams,
    TokenLogprobs,
    prompt_logprobs,
    sample,
)
from .scheduler import ScheduledStep, Scheduler
from .sequence import Sequence, Status

log = logging.getLogger("engram.engine")


class EngineStats:
    """What the engine reports as it works. No-ops here; the server's Prometheus metrics
    implement them."""

    def prompt_tokens(self, n: int) -> None: ...
    def generation_tokens(self, n: int) -> None: ...
    def first_token(self, ttft_s: float, queue_s: float) -> None: ...
    def inter_token(self, seconds: float) -> None: ...
    def inter_tokens(self, seconds: list[float]) -> None:
        """One step's inter-token times, in one call (a histogram observes them at once)."""
        if type(self).inter_token is not EngineStats.inter_token:  # someone listens
            for x in seconds:
                self.inter_token(x)

    def finished(self, reason: str, e2e_s: float | None, seq: Sequence | None = None) -> None:
        """A sequence ended: e2e_s from arrival, None when aborted or failed before its end."""

    def preempted(self, n: int) -> None: ...
    def scheduler_state(self, running: int, waiting: int, kv_usage: float) -> None: ...
    def step_logits(self, logits: torch.Tensor) -> None:
        """The step's logits, before sampling (engram-bench compares paths on them)."""


@dataclass(slots=True)
class SeqOutput:
    """What one sequence produced in one step."""

    seq: Sequence
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    # a shared empty tuple unless the request asked for logprobs (one object fewer per token
    # for the garbage collector to track)
    logprobs: list[TokenLogprobs] | tuple = ()
    finish_reason: str | None = None
    error: str | None = None
    bad_params: bool = False  # the error comes from the request's own parameters


class Engine:
    def __init__(
        self,
        model: EngramForCausalLM,
        config: EngineConfig,
        rows: Prefetcher | None = None,
        tokenizer: EngramTokenizer | None = None,
        stats: EngineStats | None = None,
        cache: KVCache | None = None,
    ) -> None:
        """``cache``: a KV cache to use instead of allocating one; engines that never step at
        the same time may share one (engram-bench's paths do)."""
        config.check()
        if config.deterministic:
            set_deterministic(True)
        self.model, self.config, self.tokenizer = model, config, tokenizer
        self.stats = stats or EngineStats()
        mc = model.config
        self.device = model.lm_head.weight.device
        self.cache = (
            cache
            if cache is not None
            else KVCache(
                mc,
                num_blocks=config.num_kv_blocks(mc.max_position_embeddings),
                block_size=config.block_size,
                max_seqs=config.max_num_seqs,
                dtype=model.model.embed_tokens.weight.dtype,
                device=self.device,
            )
        )
        if self.cache.max_seqs < config.max_num_seqs:
            raise ValueError(
                f"the KV cache holds {self.cache.max_seqs} sequences, fewer than "
                f"--max-num-seqs {config.max_num_seqs}"
            )
        static = config.static_decode
        if static is None:
            static = self.device.type == "cuda" and not config.enforce_eager
        self.runner = ModelRunner(
            model,
            self.cache,
            rows,
            config.attention,
            static,
            capture=not config.enforce_eager,
            max_memories=config.max_memories,
        )
        self.memories = self.runner.memories
        self.scheduler = Scheduler(
            self.cache, config.max_num_seqs, config.max_num_batched_tokens, config.prefill_first
        )
        self.scheduler.max_memories = config.max_memories
        self.scheduler.memories = self.memories
        self._eos, self._max_tokens = mc.stop_token_ids, self.max_tokens_per_seq
        self.scheduler.max_tokens_per_seq = self.max_tokens_per_seq
        self.fault: BaseException | None = None  # the last one, for offline callers
        # sequences whose steps run without overlap (prompt logprobs, scoring only)
        self._in_series: list[Sequence] = []
        self.overlap = None if config.no_overlap else Overlap(self)
        # requests without a seed draw from one generator: their step is one draw, not one
        # per sequence (a seeded sequence keeps its own, so its tokens are reproducible)
        self.unseeded = SamplingParams().generator(0, self.device)

    @property
    def max_tokens_per_seq(self) -> int:
        """The most tokens one sequence can ever hold: context limit or the whole KV pool."""
        return min(self.model.config.max_position_embeddings, self.cache.max_tokens)

    # --- requests ----------------------------------------------------------------------------
    def add(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        memory: str | None = None,
    ) -> list[Sequence]:
        """Queue ``params.n`` sequences for a prompt; returns them (choice order). Raises
        BadParams for parameters no sampler can honour, BadMemory for a memory not loaded.
        ``memory``: the Engram memory they read (None: the served model's own); each takes
        its current version and keeps it to the end."""
        params.check(self.model.config.vocab_size)
        if memory is not None and memory not in self.memories.names():
            raise BadMemory(f"no memory named {memory!r} is loaded", 404)
        seqs = [
            Sequence(
                request_id,
                i,
                list(prompt_ids),
                params,
                self.unseeded if params.seed is None else params.generator(i, self.device),
                self._detokenizer(params),
            )
            for i in range(params.n)
        ]
        end_at = min(params.max_tokens, self.max_tokens_per_seq - len(prompt_ids))
        same_row = not (params.min_tokens or params.penalised)
        for seq in seqs:
            seq.memory = self.memories.acquire(memory)
            seq.end_at = end_at
            seq.same_row = same_row
            seq.plain = params.logprobs is None and (seq.detok is None or seq.detok._plain)
            self.scheduler.add(seq)
            self.stats.prompt_tokens(len(prompt_ids))
        if params.prompt_logprobs_k is not None or params.max_tokens == 0:
            self._in_series += seqs
        return seqs

    def needs_series(self) -> bool:
        """A sequence whose prompt is scored is still prefilling: steps run one at a time."""
        if self._in_series:
            self._in_series = [s for s in self._in_series if not s.finished and s.prefilling]
        return bool(self._in_series)

    def _detokenizer(self, params: SamplingParams) -> Detokenizer | None:
        if self.tokenizer is None:
            return None
        return Detokenizer(
            self.tokenizer,
            params.stop,
            params.skip_special_tokens,
            params.spaces_between_special_tokens,
            params.min_tokens,
        )

    def abort(self, seqs: list[Sequence]) -> None:
        for seq in seqs:
            if not seq.finished:
                self.finish(seq, "abort")

    def finish(self, seq: Sequence, reason: str, now: float | None = None) -> None:
        if not seq.finished:
            self.memories.release(seq.memory)
        self.scheduler.finish(seq, reason)
        self.stats.finished(reason, None if now is None else now - seq.arrival, seq)

    @property
    def has_work(self) -> bool:
        return self.scheduler.num_unfinished > 0 or (
            self.overlap is not None and self.overlap.inflight is not None
        )

    def close(self) -> None:
        if self.overlap is not None:
            self.overlap.close()

    # --- one step ------------------------------------------------------------------------------
    def step(self, timer: HostTimer | NoTimer = NO_TIMER) -> list[SeqOutput]:
        """Schedule and run one step; what each sequence produced (empty: nothing to run).
        With overlap the step is submitted to the device and what comes back is the step
        before's (:mod:`engine.overlap`). ``timer``: charges the step's host work to its parts
        (engram-bench --host-cost)."""
        if self.overlap is not None:
            return self.overlap.step(timer)
        return self.step_in_series(timer)

    def step_in_series(self, timer: HostTimer | NoTimer = NO_TIMER) -> list[SeqOutput]:
        """One step, start to end: schedule, run, read its tokens."""
        with timer("schedule"):
            step = self.scheduler.schedule()
        if step is None:
            self._report()
            return []
        self.stats.preempted(len(step.preempted))
        outputs: list[SeqOutput] = []
        try:
            self._run(step, outputs, timer)
        except Exception as e:  # a shared fault: fail this step's sequences; keep serving
            self.fail_step(step, e, outputs)
        with timer("stats"):
            self._report()
        return outputs

    def fail_step(self, step: ScheduledStep, e: Exception, outputs: list[SeqOutput]) -> None:
        """A shared fault (the forward pass, the step's inputs): fail the step's sequences."""
        log.error("engine step failed", exc_info=e)
        self.fault = e
        self.runner.resync_tables = True
        msg = f"engine error: {type(e).__name__}: {e}"
        for seq in step.seqs:
            if not seq.finished:
                self.finish(seq, "error")
                outputs.append(SeqOutput(seq, finish_reason="error", error=msg))

    def _report(self) -> None:
        s = self.scheduler
        self.stats.scheduler_state(len(s.running), len(s.waiting), self.cache.usage)

    def _run(self, step: ScheduledStep, outputs: list[SeqOutput], timer=NO_TIMER) -> None:
        need_all = any(s.wants_prompt_logprobs and s.prefilling for s in step.seqs)
        logits = self.runner.step(step.seqs, step.new_ids, need_all, timer)
        self.stats.step_logits(logits)
        now = time.monotonic()
        lengths = [len(x) for x in step.new_ids]
        last = np.cumsum(lengths) - 1  # each sequence's last row in the packed step
        if need_all:
            outputs += self._prompt_logprobs(step, logits, last, lengths)
        at = [i for i, seq in enumerate(step.seqs) if step.samples[i] and not seq.finished]
        for i in [i for i in at if step.seqs[i].params.max_tokens == 0]:  # prompt scoring only
            outputs.append(SeqOutput(step.seqs[i], finish_reason="length"))
            self.finish(step.seqs[i], "length", now)
        at = [i for i in at if not step.seqs[i].finished]
        if not at:
            return
        picked = logits  # a decode step: every row is sampled, in order
        if need_all or len(at) != len(step.seqs):
            rows_at = torch.from_numpy(last[at] if need_all else np.array(at))
            picked = logits[rows_at.to(logits.device, non_blocking=True)]
        seqs = [step.seqs[i] for i in at]
        with timer("sample"):
            got_all = self._sample(picked, seqs, timer)
        with timer("append"):
            self.append_all(seqs, got_all, now, outputs)

    def append_all(
        self, seqs: list[Sequence], got: list, now: float, outputs: list[SeqOutput], late=False
    ) -> None:
        """Append a step's sampled tokens (``got``: (token, logprobs) or an exception per
        sequence). ``late``: tokens of an overlapped step, read one step late (a sequence
        that ended meanwhile drops its token). A token that ends nothing, of a sequence past
        its first token (``Sequence.plain``: no logprobs, no stop strings), takes a short
        path: a set lookup for EOS, one comparison for the length, one table lookup for its
        text (:meth:`Detokenizer._add_plain`'s first case, inlined)."""
        gaps: list[float] = []
        appended, append, eos, finished = 0, self._append, self._eos, Status.FINISHED
        # bound once: the loop runs for every sequence of every step
        emit, gap, output = outputs.append, gaps.append, SeqOutput
        for seq, g in zip(seqs, got):
            if late:
                seq.inflight -= 1
                if seq.status is finished:  # ended meanwhile (aborted, failed): dropped
                    continue
            if type(g) is not tuple:
                outputs.append(self._fail(seq, g))
                continue
            appended += 1
            tok, lp = g
            out_ids, last = seq.output_ids, seq.last_token_at
            if (
                seq.plain
                and lp is None
                and last is not None
                and len(out_ids) + 1 < seq.end_at
                and tok not in eos
            ):
                detok = seq.detok
                try:
                    if detok is None:
                        text = ""
                    elif detok._partial or detok._held or (text := detok._texts[tok]) is None:
                        text = detok._add_plain(tok)
                    else:  # whole characters on its own, nothing waiting before it
                        detok._pieces.append(text)
                except Exception as e:  # its detokenizer: this sequence alone
                    emit(self._fail(seq, e))
                    continue
                out_ids.append(tok)
                gap(now - last)
                seq.last_token_at = now
                emit(output(seq, [tok], text))
                continue
            try:
                outputs.append(append(seq, tok, lp, now, gaps))
            except Exception as e:  # its detokenizer or stop strings: this sequence alone
                outputs.append(self._fail(seq, e))
        self.stats.generation_tokens(appended)  # once per step, not per token
        if gaps:
            self.stats.inter_tokens(gaps)

    def _sample(
        self, logits, seqs: list[Sequence], timer=NO_TIMER
    ) -> list[tuple[int, TokenLogprobs | None]]:
        """(token, logprobs) per row, or the exception that row raised. The batched sampler
        runs first; if it raises, each row is sampled alone from its generator's state before
        the batch, so the rows that did nothing wrong get the tokens they would have got."""
        return self.sample_rows(logits, self.sample_inputs(seqs), timer)

    def sample_inputs(self, seqs: list[Sequence]) -> list[SampleRow]:
        """The sampler's rows. With a token in flight it counts as generated (EOS bans), and a
        penalised row gets its own copy of the output ids (the token is added on the device's
        side once known)."""
        rows = []
        for s in seqs:
            row = s.sample_row
            rows.append(row if s.same_row and row is not None else self.sample_input(s))
        return rows

    def sample_input(self, s: Sequence) -> SampleRow:
        """One sequence's sampler row (:meth:`sample_inputs`); kept on the sequence while it
        stays the same (``Sequence.same_row``: always, once made)."""
        p, out, row = s.params, s.output_ids, s.sample_row
        if s.inflight and p.penalised:
            out = list(out)
        banned = p.banned_tokens(len(s.output_ids) + s.inflight, self._eos) if p.min_tokens else []
        if row is None or banned or out is not s.output_ids:
            row = SampleRow(p, out, s.generator, banned, s.prompt_ids)
            if not banned and out is s.output_ids:  # the same every step: kept
                s.sample_row = row
        return row

    def sample_rows(self, logits, rows: list[SampleRow], timer=NO_TIMER) -> list:
        """(token, logprobs) per row, or the exception that row raised (see _sample)."""
        states = [
            None if r.params.greedy or r.params.seed is None else r.generator.get_state()
            for r in rows
        ]
        try:
            with timer("sample_kernels"):  # on a GPU: its kernels and the one copy back
                tokens, lps = sample(logits, rows)
            return list(zip(tokens, lps))
        except Exception:
            log.warning("batched sampling raised; sampling its %d rows one by one", len(rows))
        out = []
        for k, row in enumerate(rows):
            if states[k] is not None:  # greedy rows never draw; unseeded ones need no replay
                row.generator.set_state(states[k])
            try:
                tokens, lps = sample(logits[k : k + 1], [row])
                out.append((tokens[0], lps[0]))
            except Exception as e:
                out.append(e)
        return out

    def _fail(self, seq: Sequence, e: Exception) -> SeqOutput:
        """Fail one sequence (its KV memory freed) with the reason; the step goes on."""
        bad = isinstance(e, BadParams)
        if not bad:
            log.error("sequence %s/%d failed", seq.request_id, seq.choice, exc_info=e)
        self.fault = e
        self.finish(seq, "error")
        msg = str(e) if bad else f"engine error: {type(e).__name__}: {e}"
        return SeqOutput(seq, finish_reason="error", error=msg, bad_params=bad)

    def _prompt_logprobs(self, step: ScheduledStep, logits, last, lengths) -> list[SeqOutput]:
        """Logprob of each prompt token given the ones before it (the first has none). Entry p
        comes from the row of token p - 1; a recomputed (preempted) prompt adds nothing twice.
        Returns the failures: a sequence whose scoring raises fails alone."""
        wanted: dict[Sequence, tuple[list[int], list[int]]] = {}
        for i, seq in enumerate(step.seqs):
            if not seq.wants_prompt_logprobs:
                continue
            n = lengths[i]
            before = seq.num_computed - n  # the runner has advanced it already
            if not seq.prompt_logprobs:
                seq.prompt_logprobs.append(None)
            rows, targets = [], []
            for j in range(n):
                pos = before + j + 1  # the prompt token this row predicts
                if len(seq.prompt_logprobs) <= pos < len(seq.prompt_ids):
                    rows.append(int(last[i]) - n + 1 + j)
                    targets.append(seq.prompt_ids[pos])
            if rows:
                wanted[seq] = (rows, targets)
        if not wanted:
            return []

        def score(owners: list[Sequence]) -> None:
            rows = [r for s in owners for r in wanted[s][0]]
            targets = [t for s in owners for t in wanted[s][1]]
            k = max(s.params.prompt_logprobs_k for s in owners)
            picked = logits[to_device(rows, logits.device)]
            got = iter(prompt_logprobs(picked, targets, k))
            for seq in owners:
                for _ in wanted[seq][0]:
                    lp = next(got)
                    lp.top = lp.top[: seq.params.prompt_logprobs_k]
                    seq.prompt_logprobs.append(lp)

        had = {seq: len(seq.prompt_logprobs) for seq in wanted}
        try:
            score(list(wanted))
            return []
        except Exception:
            log.warning("batched prompt scoring raised; scoring its sequences one by one")
        failed = []
        for seq in wanted:
            del seq.prompt_logprobs[had[seq] :]
            try:
                score([seq])
            except Exception as e:
                failed.append(self._fail(seq, e))
        return failed

    def _append(
        self,
        seq: Sequence,
        tok: int,
        lp: TokenLogprobs | None,
        now: float,
        gaps: list[float],
    ) -> SeqOutput:
        """Append one sampled token; ``gaps`` collects the step's inter-token times (the
        caller reports them once per step)."""
        params, out_ids, detok = seq.params, seq.output_ids, seq.detok
        out_ids.append(tok)
        if seq.first_token_at is None:
            seq.first_token_at = now
            self.stats.first_token(now - seq.arrival, (seq.scheduled_at or now) - seq.arrival)
        else:
            gaps.append(now - seq.last_token_at)
        seq.last_token_at = now
        out = SeqOutput(seq, [tok])
        if lp is not None:
            out.logprobs = [lp]
            seq.output_logprobs.append(lp)
        is_eos = tok in self._eos and not params.ignore_eos
        if detok is not None and not is_eos:
            out.text = detok.add(tok)
        if is_eos or (detok is not None and detok.stopped):
            reason = "stop"
        elif (
            len(out_ids) >= params.max_tokens
            or len(seq.prompt_ids) + len(out_ids) >= self._max_tokens
        ):
            reason = "length"
        else:
            return out
        if detok is not None:
            out.text += detok.flush()
        out.finish_reason = reason
        self.finish(seq, reason, now)
        return out

    # --- offline use ---------------------------------------------------------------------------
    def run_until_done(self) -> None:
        while self.has_work:
            self.step()
        self.runner.rows.flush()  # every step's offload figures booked
