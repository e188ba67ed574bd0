"""The order runs happen in: build every path once, warm-up with the checks, interleaved timed
rounds, profiled runs.

0. build: every path's prefetcher and engine, once; the engines share one KV cache.
1. warm-up: every path runs every job once, untimed, the baseline first. The first steps of
   each job have their rows and logits checked against the baseline; tokens are compared too.
2. timed rounds: per job, ``repeats`` rounds; round r runs every path in rotated order
   (``workload.rotation``), so slow drift of the machine spreads over all paths alike.
3. profiled runs (CUDA only): one more run per path and job under torch.profiler, for the
   GPU-busy time. Last, so the profiler cannot disturb the timed runs.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

import torch
from tqdm import tqdm

from .batch import engine_config
from .phase import phase
from .report import PROG
from .run import PathBench
from .source import ModelSource
from .workload import BenchError, Job, PathSpec, Workload, make_jobs, rotation


def warm_up(
    benches: list[PathBench], jobs: list[Job], check_steps: int, tick: Callable[[str], None]
) -> dict[str, list[list[int]]]:
    """Every path runs every job once; returns the baseline's tokens per job."""
    base, reference = benches[0], {}
    for job in jobs:
        ref_logits = None
        for b in benches:
            tick(f"warm-up {job.name} {b.name}")
            b.rows.arm(check_steps, f"{job.name} warm-up")
            b.logits.arm(check_steps, None if b is base else ref_logits)
            try:
                tokens = b.run(job, "warm")
            finally:
                b.rows.remaining = b.logits.remaining = 0
            if b is base:
                ref_logits, reference[job.name] = b.logits.kept, tokens
            b.tokens.add(f"{job.name} warm-up", reference[job.name], tokens)
        base.logits.kept = []
    return reference


def timed_rounds(
    benches: list[PathBench],
    jobs: list[Job],
    repeats: int,
    reference: dict[str, list[list[int]]],
    tick: Callable[[str], None],
) -> None:
    for job in jobs:
        for r in range(repeats):
            for i in rotation(len(benches), r):
                b = benches[i]
                tick(f"{job.name} round {r + 1} {b.name}")
                tokens = b.run(job, "timed")
                b.tokens.add(f"{job.name} round {r + 1}", reference[job.name], tokens)


def profiled_runs(benches: list[PathBench], jobs: list[Job], tick: Callable[[str], None]) -> None:
    for job in jobs:
        for b in benches:
            tick(f"profiled {job.name} {b.name}")
            b.run(job, "profiled")


def build_benches(
    src: ModelSource,
    specs: list[PathSpec],
    jobs: list[Job],
    wl: Workload,
    device: torch.device,
    deterministic: bool,
    progress: bool,
) -> list[PathBench]:
    """Every path's prefetcher and engine, built once; the engines share one KV cache."""
    config = engine_config(jobs, wl.max_batched_tokens, deterministic, wl.overlap)
    base_store = src.store(specs[0].placement)
    reference = dict(base_store.tables)  # what every path's rows are checked against
    benches: list[PathBench] = []
    try:
        for spec in specs:
            cache = benches[0].engine.cache if benches else None
            try:
                benches.append(PathBench(spec, src, device, config, reference, cache, progress))
            except (RuntimeError, ValueError) as e:  # CUDA OOM, a path that cannot start
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                raise BenchError(f"row '{spec.name}' failed: {type(e).__name__}: {first}") from e
    except BaseException:
        for b in benches:
            b.close()
        raise
    return benches


def run_paths(
    src: ModelSource,
    specs: list[PathSpec],
    wl: Workload,
    device: torch.device,
    deterministic: bool,
    progress: bool,
) -> tuple[list[PathBench], list[Job], dict[str, float]]:
    """Build, warm up, time and profile every path; the paths, the jobs, each stage's time."""
    jobs = make_jobs(wl, src.model.config.vocab_size)
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    benches = build_benches(src, specs, jobs, wl, device, deterministic, progress)
    times["build_s"] = time.perf_counter() - t0
    cuda = device.type == "cuda"
    total = len(specs) * len(jobs) * (1 + wl.repeats + (1 if cuda else 0))
    bar = tqdm(total=total, desc=PROG, unit="run", disable=not progress)

    done = [0]

    def tick(what: str) -> None:
        bar.set_postfix_str(what)
        bar.update(1)
        done[0] += 1
        if not progress:  # a log, not a terminal: one stamped line per run
            phase(f"{PROG}: {done[0]}/{total} {what}", sys.stderr)

    try:
        t0 = time.perf_counter()
        reference = warm_up(benches, jobs, wl.check_steps, tick)
        times["warm_up_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        timed_rounds(benches, jobs, wl.repeats, reference, tick)
        times["timed_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        if cuda:
            profiled_runs(benches, jobs, tick)
        times["profiled_s"] = time.perf_counter() - t0
    finally:
        bar.close()
        for b in benches:
            b.close()
    return benches, jobs, times
