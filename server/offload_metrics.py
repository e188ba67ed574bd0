"""The offload counters, read from the accountant's running totals when Prometheus scrapes.

The accountant (offload/accounting.py) sums every step's figures per Engram layer anyway; a
Prometheus counter incremented per step would count the same things a second time, on the
device thread, at some twenty ``labels().inc()`` a step. :class:`OffloadCounters` yields the
same families (names, labels, values) from the totals at scrape time instead. Histograms need
each step's value and stay observed per step (server/metrics.py).

Reads happen on the event loop while the engine books steps: a scrape copies the totals under
the accountant's lock (``Accountant.snapshot``), so every figure is of the same steps and a
counter built from differences of them never decreases.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily
from prometheus_client.metrics_core import Metric

from offload.accounting import HOT_TIER, Accountant, LayerStats, Totals

LT = ["model_name", "layer", "tier"]

# name, help, labels, and the per-layer value for the layer's own tier (None: not per tier)
LAYER_COUNTERS: list[tuple[str, str, Callable[[LayerStats], float]]] = [
    ("engram_offload_bytes", "Engram row bytes moved.", lambda s: s.bytes),
    ("engram_offload_rows", "Engram rows looked up.", lambda s: s.rows),
    (
        "engram_offload_unique_rows",
        "Distinct Engram rows looked up per step, summed.",
        lambda s: s.unique_rows,
    ),
]
# tier="hot": lookups against the layer's hot-row cache (hits read on the device, misses sent
# on to the table's tier); the table's tier: repeats within a step (hits, with --dedup) and
# rows fetched (misses). Queries as vLLM counts its prefix cache.
HITS = ("engram_offload_cache_hits", "Rows served without a transfer from their tier (hot-row "
        "cache hits; repeats).")  # fmt: skip
MISSES = ("engram_offload_cache_misses", "Rows that had to be fetched from the next tier.")
QUERIES = ("engram_offload_cache_queries", "Rows looked up in a cache (tier hot).")
FILE_COUNTERS: list[tuple[str, str, Callable[[LayerStats], float]]] = [
    (
        "engram_offload_dram_cache_hits",
        "Distinct rows of a step found in the file tier's DRAM cache.",
        lambda s: s.file_hits,
    ),
    (
        "engram_offload_dram_cache_misses",
        "Distinct rows of a step read from the file into the DRAM cache.",
        lambda s: s.file_misses,
    ),
    ("engram_offload_file_read_bytes", "Bytes read from the file tier.", lambda s: s.file_bytes),
]
STALL = ("engram_offload_stall_seconds", "Time compute waited for Engram rows.")
SLACK = ("engram_offload_slack_seconds", "Time rows were ready before needed.")
STEPS = ("engram_offload_steps", "Engine steps.")
STEP_TIME = ("engram_offload_step_seconds", "Engine step time.")


@dataclass(eq=False)  # a collector is registered by identity
class OffloadCounters:
    """A collector of the offload counters of one accountant (None until the model loads:
    the families are there, empty). ``layers``: the Engram layers with their tier, every
    series shown from zero before the first step; ``hot``: the layers with a hot-row cache."""

    model_name: str
    accountant: Accountant | None = None
    layers: dict[int, str] = field(default_factory=dict)
    hot: set[int] = field(default_factory=set)
    created: float = field(default_factory=time.time)

    def watch(self, accountant: Accountant, layers: dict[int, str], hot: set[int]) -> None:
        self.accountant, self.layers, self.hot = accountant, layers, hot
        self.created = time.time()

    def describe(self) -> Iterator[Metric]:
        return self._families(Totals())

    def collect(self) -> Iterator[Metric]:
        acc = self.accountant
        return self._families(acc.snapshot() if acc is not None else Totals())

    def _families(self, t: Totals) -> Iterator[Metric]:
        m, created = self.model_name, self.created
        booked = t.layers
        per_layer = {lid: LayerStats(lid, tier) for lid, tier in self.layers.items()}
        rows = []  # (layer, its figures under one tier label)
        for lid, tier in self.layers.items():  # the series made at start-up, from zero
            if lid not in booked or booked[lid].tier != tier:
                rows.append((lid, per_layer[lid]))
        for lid, s in sorted(booked.items()):
            per_layer[lid] = s
            rows.append((lid, s))
        rows.sort(key=lambda r: r[0])

        def family(name: str, doc: str, labels: list[str]) -> CounterMetricFamily:
            return CounterMetricFamily(name, doc, labels=labels)

        for name, doc, value in LAYER_COUNTERS:
            fam = family(name, doc, LT)
            for lid, s in rows:
                fam.add_metric([m, str(lid), s.tier], value(s), created=created)
            yield fam
        hits, misses, queries = family(*HITS, LT), family(*MISSES, LT), family(*QUERIES, LT)
        for lid, s in rows:
            layer = str(lid)
            if lid in self.hot:
                queries.add_metric([m, layer, HOT_TIER], s.rows, created=created)
                hits.add_metric([m, layer, HOT_TIER], s.hits, created=created)
                misses.add_metric([m, layer, HOT_TIER], s.rows - s.hits, created=created)
            hits.add_metric([m, layer, s.tier], s.rows - s.hits - s.fetched, created=created)
            misses.add_metric([m, layer, s.tier], s.fetched, created=created)
        yield from (hits, misses)
        for name, doc, value in FILE_COUNTERS:
            fam = family(name, doc, LT)
            for lid, s in rows:
                if s.tier == "file":
                    fam.add_metric([m, str(lid), s.tier], value(s), created=created)
            yield fam
        yield queries
        ml = ["model_name", "layer"]
        stall, slack = family(*STALL, ml), family(*SLACK, ml)
        for lid, s in sorted(per_layer.items()):
            stall.add_metric([m, str(lid)], s.stall_s, created=created)
            slack.add_metric([m, str(lid)], s.slack_s, created=created)
        yield from (stall, slack)
        steps, step_time = family(*STEPS, ["model_name"]), family(*STEP_TIME, ["model_name"])
        if self.accountant is not None:
            steps.add_metric([m], t.steps, created=created)
            step_time.add_metric([m], t.step_s, created=created)
        yield from (steps, step_time)
