"""Prometheus metrics: vLLM's serving set (``engram_`` prefix) and the offload set.

Every series carries ``model_name``. Offload figures come from the engine's accountant, one
observation per step; names follow Prometheus conventions (base units, ``_total`` counters).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from engine.engine import EngineStats
from offload.accounting import StepStats

LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
PREFETCH_BUCKETS = (
    1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 1.0,
)  # fmt: skip
FINISH_REASONS = ("stop", "length", "abort", "error")


class Metrics(EngineStats):
    def __init__(self, model_name: str, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.model_name = model_name
        r, m = self.registry, ["model_name"]

        def gauge(name, doc, labels=()):
            return Gauge(name, doc, m + list(labels), registry=r)

        def counter(name, doc, labels=()):
            return Counter(name, doc, m + list(labels), registry=r)

        def hist(name, doc, buckets, labels=()):
            return Histogram(name, doc, m + list(labels), buckets=buckets, registry=r)

        # --- serving ---------------------------------------------------------------------------
        self._running = gauge("engram_num_requests_running", "Sequences in the running batch.")
        self._waiting = gauge("engram_num_requests_waiting", "Sequences waiting to be scheduled.")
        self._kv = gauge("engram_kv_cache_usage_perc", "Fraction of KV cache blocks in use (0-1).")
        self._ttft = hist(
            "engram_time_to_first_token_seconds", "Time to first token.", LATENCY_BUCKETS
        )
        self._itl = hist(
            "engram_inter_token_latency_seconds", "Time between output tokens.", LATENCY_BUCKETS
        )
        self._e2e = hist(
            "engram_e2e_request_latency_seconds", "Arrival to last token.", LATENCY_BUCKETS
        )
        self._queue = hist(
            "engram_request_queue_time_seconds", "Arrival to first schedule.", LATENCY_BUCKETS
        )
        self._prompt = counter("engram_prompt_tokens", "Prompt tokens received.")
        self._gen = counter("engram_generation_tokens", "Tokens generated.")
        self._success = counter(
            "engram_request_success", "Finished sequences by reason.", ["finished_reason"]
        )
        self._preempt = counter(
            "engram_num_preemptions", "Sequences preempted (KV freed, recomputed later)."
        )
        self._errors = counter(
            "engram_request_errors", "Requests answered with an error, by HTTP status.", ["status"]
        )
        # --- offload ----------------------------------------------------------------------------
        lt = ["layer", "tier"]
        self._bytes = counter("engram_offload_bytes", "Engram row bytes moved.", lt)
        self._rows = counter("engram_offload_rows", "Engram rows looked up.", lt)
        self._unique = counter(
            "engram_offload_unique_rows", "Distinct Engram rows looked up per step, summed.", lt
        )
        self._hits = counter(
            "engram_offload_cache_hits", "Rows served without a transfer (repeats in a step).", lt
        )
        self._misses = counter(
            "engram_offload_cache_misses", "Rows that had to be fetched from their tier.", lt
        )
        self._prefetch = hist(
            "engram_offload_prefetch_duration_seconds",
            "Issue-to-ready time of one layer's rows.",
            PREFETCH_BUCKETS,
            ["layer"],
        )
        self._stall = counter(
            "engram_offload_stall_seconds", "Time compute waited for Engram rows.", ["layer"]
        )
        self._slack = counter(
            "engram_offload_slack_seconds", "Time rows were ready before needed.", ["layer"]
        )
        self._steps = counter("engram_offload_steps", "Engine steps.")
        self._step_time = counter("engram_offload_step_seconds", "Engine step time.")
        self._stall_fraction = gauge(
            "engram_offload_stall_fraction", "Stall time / step time over recent steps."
        )
        self._table_bytes = gauge("engram_offload_table_bytes", "Engram table bytes.", ["tier"])
        self._link = gauge(
            "engram_offload_link_bandwidth_bytes_per_second",
            "Host-to-device copy ceiling measured at start-up.",
        )
        self.fraction_source = None  # () -> float, the accountant's stall fraction

        for reason in FINISH_REASONS:
            self._success.labels(model_name, reason)
        self._prompt.labels(model_name)
        self._gen.labels(model_name)
        self._preempt.labels(model_name)
        self.scheduler_state(0, 0, 0.0)

    # --- EngineStats: called from the engine thread ------------------------------------------
    def prompt_tokens(self, n: int) -> None:
        self._prompt.labels(self.model_name).inc(n)

    def generation_tokens(self, n: int) -> None:
        self._gen.labels(self.model_name).inc(n)

    def first_token(self, ttft_s: float, queue_s: float) -> None:
        self._ttft.labels(self.model_name).observe(ttft_s)
        self._queue.labels(self.model_name).observe(queue_s)

    def inter_token(self, seconds: float) -> None:
        self._itl.labels(self.model_name).observe(seconds)

    def finished(self, reason: str, e2e_s: float | None = None) -> None:
        self._success.labels(self.model_name, reason).inc()
        if e2e_s is not None:
            self._e2e.labels(self.model_name).observe(e2e_s)

    def preempted(self, n: int) -> None:
        self._preempt.labels(self.model_name).inc(n)

    def scheduler_state(self, running: int, waiting: int, kv_usage: float) -> None:
        m = self.model_name
        self._running.labels(m).set(running)
        self._waiting.labels(m).set(waiting)
        self._kv.labels(m).set(kv_usage)

    # --- HTTP and offload ---------------------------------------------------------------------

    def error(self, status: int) -> None:
        self._errors.labels(self.model_name, str(status)).inc()

    def set_offload_static(self, table_bytes: dict[str, int], link_bps: float) -> None:
        for tier, n in table_bytes.items():
            self._table_bytes.labels(self.model_name, tier).set(n)
        self._link.labels(self.model_name).set(link_bps)

    def init_offload_layers(self, layers: list[int], tier: str) -> None:
        """Create every per-layer series at zero so dashboards have data before traffic."""
        m = self.model_name
        for lid in layers:
            for c in (self._bytes, self._rows, self._unique, self._hits, self._misses):
                c.labels(m, str(lid), tier)
            self._prefetch.labels(m, str(lid))
            self._stall.labels(m, str(lid))
            self._slack.labels(m, str(lid))
        self._steps.labels(m)
        self._step_time.labels(m)
        self._stall_fraction.labels(m).set(0.0)

    def observe_offload_step(self, step: StepStats) -> None:
        m = self.model_name
        for lid, s in step.layers.items():
            layer = str(lid)
            self._bytes.labels(m, layer, s.tier).inc(s.bytes)
            self._rows.labels(m, layer, s.tier).inc(s.rows)
            self._unique.labels(m, layer, s.tier).inc(s.unique_rows)
            self._hits.labels(m, layer, s.tier).inc(s.rows - s.fetched)
            self._misses.labels(m, layer, s.tier).inc(s.fetched)
            self._prefetch.labels(m, layer).observe(s.prefetch_s)
            self._stall.labels(m, layer).inc(s.stall_s)
            self._slack.labels(m, layer).inc(s.slack_s)
        self._steps.labels(m).inc()
        self._step_time.labels(m).inc(step.step_s)
        if self.fraction_source is not None:
            self._stall_fraction.labels(m).set(self.fraction_source())
