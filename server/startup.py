"""Start-up: the load's phases, timed and cancellable between them, and the engine's warm-up.

Loading runs on a background thread (``/health`` answers 503 meanwhile). A shutdown during
loading sets the cancel flag; the loader stops at the next phase boundary, releases what it
built and returns, and the server waits for it before the process exits: the interpreter is
never torn down under a thread that is inside CUDA or pinning host memory.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from engine.async_engine import AsyncEngine
from engine.config import EngineConfig
from engine.engine import EngineStats
from engine.sampling import SamplingParams
from offload.accounting import Accountant, Totals
from offload.hot_rows import HotSettings
from offload.offloaded_model import OffloadedModel

LINK_BYTES = 16 << 20  # enough to reach the copy's steady rate; the gauge is informational


class LoadCancelled(Exception):
    """The server is shutting down; loading stopped at a phase boundary."""


def process_age_s() -> float | None:
    """Seconds since this process started (Linux /proc), or None where unknown."""
    try:
        import os

        ticks = os.sysconf("SC_CLK_TCK")
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        started = int(fields[19]) / ticks  # field 22: start time after boot, in clock ticks
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - started)
    except (OSError, ValueError, IndexError):
        return None


class StartupClock:
    """Times each phase of the start-up; raises LoadCancelled after a phase once cancelled."""

    def __init__(self) -> None:
        self.cancel = threading.Event()
        self.phases: list[tuple[str, float]] = []
        self.current: str | None = None
        self.before_load_s = process_age_s()

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self.check()
        self.current = name
        t = time.perf_counter()
        try:
            yield
        finally:
            self.phases.append((name, time.perf_counter() - t))
            self.current = None
        self.check()

    def check(self) -> None:
        if self.cancel.is_set():
            done = self.phases[-1][0] if self.phases else "nothing"
            raise LoadCancelled(f"shutdown requested during start-up (done: {done})")

    def line(self) -> str:
        """One line: where the start-up's time went."""
        total = sum(s for _, s in self.phases)
        parts = ", ".join(f"{name} {s:.2f}s" for name, s in self.phases)
        before = ""
        if self.before_load_s is not None:
            before = f"; before loading (interpreter, imports, flags) {self.before_load_s:.2f}s"
        return f"start-up {total:.2f}s: {parts}{before}"


def load_offload(
    e: EngineConfig, phase=None, model_dir=None, loaded=None, progress: bool = False
) -> OffloadedModel:
    """The served model's tables in the tiers and gather path ``e`` names (or an Engram
    memory's: ``model_dir`` and its ``loaded`` model). engram-bench --http-cost loads its
    direct engine with this too, so both sides run the same engine."""
    return OffloadedModel.load(
        model_dir or e.model_dir,
        e.placement,
        e.gather,
        e.device,
        e.dtype,
        e.dedup,
        progress=progress,
        loaded=loaded,
        row_format=e.row_format,
        huge_pages=e.huge_pages,
        host_threads=e.gather_threads or None,
        phase=phase,
        shared=e.shared(),
        host_memory_bytes=e.host_memory_bytes,
        file_threads=e.file_read_threads,
        file_layers=e.file_layer_ids(),
        file_io=e.file_io,
        hot=HotSettings(
            e.hot_rows,
            e.hot_rows_file,
            e.hot_rows_policy,
            e.hot_rows_refresh,
            e.hot_rows_replace,
        ),
    )


def warm_up(engine: AsyncEngine) -> None:
    """One short greedy request through the engine before it serves, so first-use costs
    (kernel selection, allocator growth, lazy initialisation) are not the first client's. Its
    steps are kept out of the metrics and the offload accounting."""
    eng = engine.engine
    vocab = engine.model.config.vocab_size
    stats, eng.stats = eng.stats, EngineStats()
    try:
        params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
        eng.add("warm-up", [i % vocab for i in range(1, 9)], params)
        while eng.has_work:
            for out in eng.step():
                if out.error:
                    raise RuntimeError(f"warm-up step failed: {out.error}")
    finally:
        eng.stats = stats
    eng.runner.rows.flush()  # its offload figures are booked now, then forgotten
    forget_steps(engine.offload.accountant)


def forget_steps(acc: Accountant) -> None:
    """Drop what the accountant booked so far (called before the engine thread starts)."""
    acc.totals = Totals()
    acc.recent.clear()
    acc.last = None
