"""Every byte and every microsecond the offload costs, per step and per Engram layer.

Definitions (seconds):
- prefetch: from issuing the layer's gather to its rows being ready on the compute side;
- stall: how long the compute side waited for the rows (0 when they were ready in time);
- slack: how long the rows sat ready before the layer needed them (0 when it stalled);
- stall fraction: total stall / total step time, over the engine's life and over a recent
  window. The server exports these as Prometheus metrics; nothing here imports the web stack.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field, replace

HOT_TIER = "hot"  # the tier label of rows served by a layer's hot-row cache


@dataclass
class LayerStats:
    layer_id: int
    tier: str
    rows: int = 0  # lookups (tokens x heads)
    unique_rows: int = 0  # distinct rows among them
    fetched: int = 0  # rows actually moved from the tier (unique rows when de-duplicating)
    bytes: int = 0
    hits: int = 0  # lookups served by the layer's hot-row cache (the rest went to the tier)
    hit_bytes: int = 0  # stored bytes of those rows (not moved over the link)
    prefetch_s: float = 0.0
    stall_s: float = 0.0
    slack_s: float = 0.0
    file_hits: int = 0  # file tier: distinct rows found in the DRAM cache
    file_misses: int = 0  # file tier: distinct rows read from the file
    file_bytes: int = 0  # file tier: bytes read from the file
    file_read_s: float = 0.0  # file tier: time reading them (issued with the plan)
    file_wait_s: float = 0.0  # file tier: time the layer's gather waited for those reads


@dataclass
class StepStats:
    step_s: float = 0.0
    num_tokens: int = 0
    layers: dict[int, LayerStats] = field(default_factory=dict)

    @property
    def stall_s(self) -> float:
        return sum(x.stall_s for x in self.layers.values())

    @property
    def bytes(self) -> int:
        return sum(x.bytes for x in self.layers.values())


@dataclass
class Totals:
    """Running sums since start, what Prometheus counters are built from."""

    steps: int = 0
    step_s: float = 0.0
    stall_s: float = 0.0
    layers: dict[int, LayerStats] = field(default_factory=dict)


class Accountant:
    def __init__(self, window: int = 256) -> None:
        self._lock = threading.Lock()
        self.totals = Totals()
        self.recent: deque[StepStats] = deque(maxlen=window)
        self.last: StepStats | None = None
        self._listeners: list = []

    def subscribe(self, fn) -> None:
        """fn(StepStats) is called after every step (the server's metrics hook)."""
        self._listeners.append(fn)

    def record(self, step: StepStats) -> None:
        with self._lock:
            t = self.totals
            t.steps += 1
            t.step_s += step.step_s
            t.stall_s += step.stall_s
            for lid, s in step.layers.items():
                acc = t.layers.setdefault(lid, LayerStats(lid, s.tier))
                acc.rows += s.rows
                acc.unique_rows += s.unique_rows
                acc.fetched += s.fetched
                acc.bytes += s.bytes
                acc.hits += s.hits
                acc.hit_bytes += s.hit_bytes
                acc.prefetch_s += s.prefetch_s
                acc.stall_s += s.stall_s
                acc.slack_s += s.slack_s
                acc.file_hits += s.file_hits
                acc.file_misses += s.file_misses
                acc.file_bytes += s.file_bytes
                acc.file_read_s += s.file_read_s
                acc.file_wait_s += s.file_wait_s
            self.recent.append(step)
            self.last = step
        for fn in self._listeners:
            fn(step)

    def snapshot(self) -> Totals:
        """A copy of the running sums taken under the lock: a reader on another thread (a
        Prometheus scrape) sees every layer's figures of the same steps, so counters made of
        differences of them (hits = rows - hits - fetched) never go down between scrapes."""
        with self._lock:
            t = self.totals
            layers = {lid: replace(s) for lid, s in t.layers.items()}
            return Totals(t.steps, t.step_s, t.stall_s, layers)

    @property
    def stall_fraction(self) -> float:
        """Stall time / step time over the recent window."""
        with self._lock:
            step = sum(s.step_s for s in self.recent)
            stall = sum(s.stall_s for s in self.recent)
        return stall / step if step > 0 else 0.0

    def summary(self) -> dict:
        with self._lock:
            t = self.totals
            steps = max(t.steps, 1)
            return {
                "steps": t.steps,
                "stall_fraction_total": t.stall_s / t.step_s if t.step_s > 0 else 0.0,
                "mean_step_ms": 1e3 * t.step_s / steps,
                "layers": {
                    lid: {
                        "tier": s.tier,
                        "rows_per_step": s.rows / steps,
                        "unique_rows_per_step": s.unique_rows / steps,
                        "bytes_per_step": s.bytes / steps,
                        "hot_hit_rate": s.hits / s.rows if s.rows else 0.0,
                        "hot_hit_bytes_per_step": s.hit_bytes / steps,
                        "prefetch_ms_per_step": 1e3 * s.prefetch_s / steps,
                        "stall_ms_per_step": 1e3 * s.stall_s / steps,
                        "slack_ms_per_step": 1e3 * s.slack_s / steps,
                        **_file_summary(s, steps),
                    }
                    for lid, s in sorted(t.layers.items())
                },
            }


def _file_summary(s: LayerStats, steps: int) -> dict:
    if s.tier != "file":
        return {}
    seen = s.file_hits + s.file_misses
    return {
        "file_hits": s.file_hits,
        "file_misses": s.file_misses,
        "file_hit_rate": s.file_hits / seen if seen else 0.0,
        "file_bytes_per_step": s.file_bytes / steps,
        "file_read_ms_per_step": 1e3 * s.file_read_s / steps,
        "file_wait_ms_per_step": 1e3 * s.file_wait_s / steps,
    }
