"""One path of ``engram-bench``: its prefetcher and engine, built once and reused by every run.

A run is one job on the path's engine. The clock syncs the device before every reading and
books the engine's per-step figures (stall, bytes, rows) under the phase they ran in; in a
profiled run it also records the device's busy time per phase.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from engine.engine import Engine
from engine.kv_cache import KVCache
from offload.accounting import StepStats
from offload.offloaded_model import OffloadedModel
from offload.store import Table

from .batch import run_job
from .checks import CheckedPrefetcher, LogitsCheck, RowCheck, TokenCheck
from .roofline import KernelTimer
from .source import ModelSource
from .workload import BenchError, Job, PathSpec, Workload

__all__ = ["BenchError", "PathBench", "PathSpec", "Workload", "step_figures"]


# --- per-step figures ------------------------------------------------------------------------
class StepLog:
    """Collects the engine's per-step figures under the current phase label."""

    def __init__(self) -> None:
        self.phase: str | None = None
        self.steps: dict[str, list[StepStats]] = {}

    def __call__(self, step: StepStats) -> None:
        if self.phase is not None:
            self.steps.setdefault(self.phase, []).append(step)

    def take(self) -> dict[str, list[StepStats]]:
        """The steps booked since the last take, by phase."""
        steps, self.steps = self.steps, {}
        return steps


def step_figures(steps: list[StepStats], ceiling_gbps: float | None, timed_gather: bool) -> dict:
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
        "fraction_of_ceiling": total / ceiling_gbps if total is not None and ceiling_gbps else None,
        "stall_fraction": sum(s.stall_s for s in steps) / step_s if step_s > 0 else 0.0,
        "layers": {str(k): v for k, v in layers.items()},
    }


# --- the clock -------------------------------------------------------------------------------
class Clock:
    """``clock(phase)``: sync, read the time, book the steps that follow under ``phase``."""

    def __init__(
        self, device: torch.device, log: StepLog, flush=None, profile: bool = False
    ) -> None:
        """``flush()``: book the offload figures of the steps run so far (they are booked once
        the device has run them), so each lands under the phase it ran in."""
        self.device, self.log, self.flush = device, log, flush
        self.marks: list[tuple[str | None, float]] = []
        self.timer = KernelTimer(device) if profile else None
        self.busy: dict[str, float] = {}

    def __call__(self, phase: str | None) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        if self.flush is not None:
            self.flush()
        if self.timer is not None and self.timer.prof is not None:
            self.busy[self.marks[-1][0]] = self.timer.stop()
        self.marks.append((phase, time.perf_counter()))
        self.log.phase = phase
        if self.timer is not None and phase is not None:
            self.timer.start()

    def seconds(self) -> dict[str, float]:
        out = {}
        for (phase, t), (_, t_next) in zip(self.marks, self.marks[1:]):
            if phase is not None:
                out[phase] = out.get(phase, 0.0) + t_next - t
        return out


# --- one path --------------------------------------------------------------------------------
def rss_bytes() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class PathBench:
    """A path's prefetcher, row source, engine and everything its runs measured."""

    def __init__(
        self,
        spec: PathSpec,
        src: ModelSource,
        device: torch.device,
        config,
        reference: dict[int, Table],
        cache: KVCache | None,
        progress: bool,
    ) -> None:
        self.spec, self.device, self.progress = spec, device, progress
        self.store = src.store(spec.placement)
        self.offloaded = OffloadedModel.from_parts(
            src.model, None, self.store, spec.gather, device, spec.dedup
        )
        self.row_check = RowCheck()
        self.rows = CheckedPrefetcher(self.offloaded.prefetcher, reference, self.row_check)
        self.logits = LogitsCheck()
        self.tokens = TokenCheck()
        self.engine = Engine(src.model, config, self.rows, stats=self.logits, cache=cache)
        self.log = StepLog()
        self.offloaded.accountant.subscribe(self.log)
        # a host clock around an async device gather measures the launch, not the copy
        self.timed_gather = not (device.type == "cuda" and spec.gather == "resident")
        self.seconds: dict[str, dict[str, list[float]]] = {}  # job -> phase -> timed runs
        self.steps: dict[str, dict[str, list[StepStats]]] = {}  # job -> phase -> timed steps
        self.busy: dict[str, dict[str, float]] = {}  # job -> phase -> device-busy seconds
        self.prefill_steps: dict[str, int] = {}
        self.gpu_peak = 0

    @property
    def name(self) -> str:
        return self.spec.name

    def run(self, job: Job, mode: str) -> list[list[int]]:
        """One run of ``job``: mode 'warm' (untimed), 'timed' (booked) or 'profiled'."""
        cuda = self.device.type == "cuda"
        if cuda and mode == "timed":
            torch.cuda.reset_peak_memory_stats(self.device)
        flush = self.engine.runner.rows.flush
        clock = Clock(self.device, self.log, flush, profile=mode == "profiled")
        self.log.take()
        try:
            tokens = run_job(self.engine, job, clock, self.progress)
        except (RuntimeError, ValueError) as e:  # CUDA OOM, a failed gather, ...
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise BenchError(f"row '{self.name}' failed: {type(e).__name__}: {first}") from e
        steps = self.log.take()
        if mode == "timed":
            for phase, s in clock.seconds().items():
                self.seconds.setdefault(job.name, {}).setdefault(phase, []).append(s)
                self.steps.setdefault(job.name, {}).setdefault(phase, []).extend(
                    steps.get(phase, [])
                )
            self.prefill_steps[job.name] = len(steps.get("prefill", []))
            if cuda:
                self.gpu_peak = max(self.gpu_peak, torch.cuda.max_memory_allocated(self.device))
        elif mode == "profiled":
            self.busy[job.name] = clock.busy
        return tokens

    def close(self) -> None:
        self.offloaded.close()
