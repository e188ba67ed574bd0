"""One row of ``engram-bench``: the workloads run on one table placement and gather path.

Each timed phase syncs the device before every clock read and keeps its fastest of
``Workload.runs`` runs; the engine's per-step figures (stall, bytes, rows) are booked under
the phase they ran in. Rows are then checked token for token against the baseline (row 0) and
given their penalty against it.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from models.llama import EngramForCausalLM
from offload.accounting import StepStats
from offload.offloaded_model import OffloadedModel
from offload.prefetch import Prefetcher

from .batch import Batch, make_prompts
from .source import ModelSource


class BenchError(Exception):
    """Bad input or a failed check: one line for the user, non-zero exit."""


# --- what runs -------------------------------------------------------------------------------
@dataclass(frozen=True)
class PathSpec:
    placement: str
    gather: str
    dedup: bool = False

    @property
    def name(self) -> str:
        return f"{self.placement}/{self.gather}" + ("+dedup" if self.dedup else "")


@dataclass
class Workload:
    num_seqs: int
    prompt_len: tuple[int, int]
    decode_tokens: int
    max_batched_tokens: int
    batch_sizes: list[int]
    sweep_prompt_len: int
    sweep_steps: int
    sweep_warmup: int
    micro_rows: list[int]
    micro_repeats: int
    ceiling_bytes: int
    seed: int
    runs: int  # each timed phase keeps its fastest run


# --- per-step figures ------------------------------------------------------------------------
class StepLog:
    """Collects the engine's per-step figures under the current phase label."""

    def __init__(self) -> None:
        self.phase: str | None = None
        self.steps: dict[str, list[StepStats]] = {}

    def __call__(self, step: StepStats) -> None:
        if self.phase is not None:
            self.steps.setdefault(self.phase, []).append(step)

    def take(self, *phases: str) -> list[StepStats]:
        return [s for p in phases for s in self.steps.get(p, [])]


def step_figures(steps: list[StepStats], ceiling_gbps: float, timed_gather: bool) -> dict:
    """Per-step means over ``steps``: stall, bytes, rows, achieved GB/s (per layer and all)."""
    n = max(len(steps), 1)
    gbps = lambda nbytes, s: nbytes / s / 1e9 if timed_gather and s > 0 else None
    layers: dict[int, dict] = {}
    for lid in sorted({lid for s in steps for lid in s.layers}):
        ls = [s.layers[lid] for s in steps if lid in s.layers]
        nbytes, pre = sum(x.bytes for x in ls), sum(x.prefetch_s for x in ls)
        layers[lid] = {
            "tier": ls[0].tier,
            "stall_ms_per_step": 1e3 * sum(x.stall_s for x in ls) / n,
            "slack_ms_per_step": 1e3 * sum(x.slack_s for x in ls) / n,
            "prefetch_ms_per_step": 1e3 * pre / n,
            "rows_per_step": sum(x.rows for x in ls) / n,
            "unique_rows_per_step": sum(x.unique_rows for x in ls) / n,
            "bytes_per_step": nbytes / n,
            "gbps": gbps(nbytes, pre),
        }
    nbytes = sum(s.bytes for s in steps)
    total = gbps(nbytes, sum(x.prefetch_s for s in steps for x in s.layers.values()))
    step_s = sum(s.step_s for s in steps)
    return {
        "steps": len(steps),
        "stall_ms_per_step_per_layer": float(
            np.mean([x["stall_ms_per_step"] for x in layers.values()]) if layers else 0.0
        ),
        "bytes_per_step": nbytes / n,
        "gbps": total,
        "fraction_of_ceiling": total / ceiling_gbps if total is not None else None,
        "stall_fraction": sum(s.stall_s for s in steps) / step_s if step_s > 0 else 0.0,
        "layers": {str(k): v for k, v in layers.items()},
    }


# --- timed phases ----------------------------------------------------------------------------
@dataclass
class Timed:
    tokens: list[list[int]]
    seconds: dict[str, float]  # phase -> best over runs
    steps: int = 0


@dataclass
class PathRun:
    """The workloads on one engine: its row source, and the log its steps are booked in."""

    model: EngramForCausalLM
    rows: Prefetcher
    wl: Workload
    device: torch.device
    ceiling_gbps: float
    timed_gather: bool  # False: prefetch times are launches, not copies (no GB/s)
    progress: bool
    log: StepLog = field(default_factory=StepLog)

    def figures(self, *phases: str) -> dict:
        return step_figures(self.log.take(*phases), self.ceiling_gbps, self.timed_gather)

    def timed(self, once: Callable[[Callable[[str | None], None]], Timed]) -> Timed:
        """Run ``once(clock)`` ``wl.runs`` times; each phase keeps its fastest run.
        ``clock(phase)`` syncs the device, books the steps that follow under ``phase`` and
        reads the time."""
        best: dict[str, float] = {}
        first: Timed | None = None
        marks: list[tuple[str | None, float]] = []

        def clock(phase: str | None) -> None:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            marks.append((phase, time.perf_counter()))
            self.log.phase = phase

        for _ in range(self.wl.runs):
            marks.clear()
            result = once(clock)
            clock(None)
            for (phase, t), (_, t_next) in zip(marks, marks[1:]):
                if phase is not None:
                    best[phase] = min(best.get(phase, float("inf")), t_next - t)
            if first is None:
                first = result
            elif result.tokens != first.tokens:
                raise BenchError("greedy tokens changed between two runs of the same row")
        first.seconds = best
        return first

    def warm_up(self) -> None:
        prompts = make_prompts(np.random.default_rng(1), 2, 8, 32, self.model.config.vocab_size)
        warm = Batch(self.model, self.rows, prompts, 2, self.wl.max_batched_tokens)
        warm.prefill()
        warm.decode(2)

    def paper(self) -> tuple[dict, list[list[int]]]:
        """N prompts of Uniform(MIN, MAX) tokens, chunked prefill, then M decode steps."""
        wl, vocab = self.wl, self.model.config.vocab_size
        prompts = make_prompts(np.random.default_rng(wl.seed), wl.num_seqs, *wl.prompt_len, vocab)

        def once(clock) -> Timed:
            batch = Batch(self.model, self.rows, prompts, wl.decode_tokens, wl.max_batched_tokens)
            clock("prefill")
            steps = batch.prefill(self.progress)
            clock("decode")
            batch.decode(wl.decode_tokens, self.progress)
            return Timed(batch.out, {}, steps)

        got = self.timed(once)
        t_pre, t_dec = got.seconds["prefill"], got.seconds["decode"]
        n_pre = sum(len(p) for p in prompts)
        n_dec = wl.num_seqs * wl.decode_tokens
        figures = {
            "prompt_tokens": n_pre,
            "decode_tokens": n_dec,
            "prefill_steps": got.steps,
            "prefill_s": t_pre,
            "decode_s": t_dec,
            "prefill_tok_s": n_pre / t_pre,
            "decode_tok_s": n_dec / t_dec if n_dec else None,
            "total_tok_s": (n_pre + n_dec) / (t_pre + t_dec),
            "all": self.figures("prefill", "decode"),
            "prefill": self.figures("prefill"),
            "decode": self.figures("decode"),
        }
        return figures, got.tokens

    def sweep_point(self, bs: int) -> tuple[dict, list[list[int]]]:
        """Steady decode of ``bs`` sequences, after an untimed prefill and warm-up."""
        wl, phase = self.wl, f"sweep{bs}"
        rng = np.random.default_rng([wl.seed, bs])
        length = wl.sweep_prompt_len
        prompts = make_prompts(rng, bs, length, length, self.model.config.vocab_size)

        def once(clock) -> Timed:
            decode = wl.sweep_warmup + wl.sweep_steps
            batch = Batch(self.model, self.rows, prompts, decode, wl.max_batched_tokens)
            batch.prefill()
            batch.decode(wl.sweep_warmup)
            clock(phase)
            batch.decode(wl.sweep_steps, self.progress)
            return Timed(batch.out, {})

        got = self.timed(once)
        t = got.seconds[phase]
        point = {"batch_size": bs, "decode_s": t, "tok_s": bs * wl.sweep_steps / t}
        return point | self.figures(phase), got.tokens


# --- one row ---------------------------------------------------------------------------------
def rss_bytes() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def tokens_digest(tokens: list[list[int]]) -> str:
    return hashlib.sha256(json.dumps(tokens).encode()).hexdigest()[:16]


def run_path(
    src: ModelSource,
    spec: PathSpec,
    wl: Workload,
    device: torch.device,
    ceiling_gbps: float,
    progress: bool,
) -> tuple[dict, dict[str, list[list[int]]]]:
    """One row of the report; returns its figures and its generated tokens per workload."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    store = src.store(spec.placement)
    engine = OffloadedModel.from_parts(src.model, None, store, spec.gather, device, spec.dedup)
    # a host-clock timer around an async device gather measures the launch, not the copy
    timed_gather = not (device.type == "cuda" and spec.gather == "resident")
    run = PathRun(src.model, engine.prefetcher, wl, device, ceiling_gbps, timed_gather, progress)
    engine.accountant.subscribe(run.log)
    try:
        run.warm_up()
        paper, paper_tokens = run.paper()
        tokens = {"paper": paper_tokens}
        sweep = []
        for bs in wl.batch_sizes:
            point, tokens[f"sweep{bs}"] = run.sweep_point(bs)
            sweep.append(point)
        crossover = getattr(engine.prefetcher, "crossover", None)  # the 'auto' path's switch
    except BenchError as e:
        raise BenchError(f"row '{spec.name}': {e}") from None
    finally:
        engine.close()
    row = {
        "name": spec.name,
        "placement": spec.placement,
        "gather": spec.gather,
        "auto_crossover_rows": crossover,
        "dedup": spec.dedup,
        "paper": paper,
        "sweep": sweep,
        "memory": {
            "gpu_max_allocated_bytes": (
                torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
            ),
            "host_rss_bytes": rss_bytes(),
            "table_bytes_by_tier": store.bytes_by_tier(),
        },
        "token_digest": {k: tokens_digest(v) for k, v in tokens.items()},
    }
    return row, tokens


# --- comparing rows --------------------------------------------------------------------------
def first_difference(ref: dict[str, list[list[int]]], got: dict[str, list[list[int]]]):
    """``(workload, sequence, generated token)`` where ``got`` first differs, or None."""
    for key, seqs in ref.items():
        other = got.get(key)
        if other is None or len(other) != len(seqs):
            return key, None, None
        for i, (a, b) in enumerate(zip(seqs, other)):
            if a != b:
                k = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                return key, i, k
    return None


def token_failures(rows: list[dict], tokens: list[dict[str, list[list[int]]]]) -> list[str]:
    """Marks each row's ``tokens_match`` against the baseline (row 0); one message per miss."""
    failures = []
    for row, toks in zip(rows, tokens):
        diff = first_difference(tokens[0], toks) if row is not rows[0] else None
        row["tokens_match"] = diff is None
        if diff is not None:
            key, seq, pos = diff
            failures.append(
                f"row '{row['name']}' produced different tokens than the resident baseline "
                f"'{rows[0]['name']}' ({key} workload, sequence {seq}, first difference at "
                f"generated token {pos})"
            )
    return failures


def add_penalties(rows: list[dict]) -> None:
    """% slower than the baseline (row 0), per paper phase and per sweep point."""
    base = rows[0]

    def pen(value, ref):
        return 100.0 * (1.0 - value / ref) if value and ref else None

    for r in rows:
        p, bp = r["paper"], base["paper"]
        p["penalty_pct"] = {
            k: pen(p[f"{k}_tok_s"], bp[f"{k}_tok_s"]) for k in ("prefill", "decode", "total")
        }
        for s, bs in zip(r["sweep"], base["sweep"]):
            s["penalty_pct"] = pen(s["tok_s"], bs["tok_s"])
