"""Prometheus metrics: the serving set under vLLM's own ``vllm:`` names and under ``engram_``
names (``--metrics-names``), the offload set, and the standard process collectors.

One source of truth, two names: every observation the engine reports (a token, a finished
sequence, the scheduler's state) feeds both serving families at once. The ``vllm:`` family has
vLLM's names, labels (``model_name``, ``engine``) and buckets, so vLLM's Grafana dashboard and
the autoscalers built on ``vllm:num_requests_waiting`` read this server unchanged. Offload
figures come from the engine's accountant, one observation per step; names follow Prometheus
conventions (base units, ``_total`` counters).
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)

from engine.engine import EngineStats
from engine.sequence import Sequence
from offload.accounting import Accountant, StepStats

from .config import METRICS_NAMES
from .observe import observe_many
from .offload_metrics import OffloadCounters

LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
PREFETCH_BUCKETS = (
    1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 1.0,
)  # fmt: skip
# vLLM's buckets (vllm/v1/metrics/loggers.py)
VLLM_TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
    10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
VLLM_TOKEN_LATENCY_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0,
)  # fmt: skip
VLLM_REQUEST_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
    240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip
FINISH_REASONS = ("stop", "length", "abort", "error")


def buckets_1_2_5(max_value: int) -> list[int]:
    """vLLM's token-count buckets: 1, 2, 5, 10, 20, 50, ... up to ``max_value``."""
    out, scale = [], 1
    while True:
        for m in (1, 2, 5):
            if m * scale > max_value:
                return out or [1]
            out.append(m * scale)
        scale *= 10


@dataclass
class Serving:
    """One family of serving metrics, its children already labelled."""

    running: Gauge
    waiting: Gauge
    kv: Gauge
    ttft: Histogram
    itl: Histogram
    e2e: Histogram
    queue: Histogram
    prompt: Counter
    gen: Counter
    preempt: Counter
    success: dict[str, Counter]


@dataclass
class VllmRequest:
    """vLLM's per-request histograms, observed when a sequence (or all n of a prompt) ends."""

    prompt_tokens: Histogram
    generation_tokens: Histogram
    max_generation_tokens: Histogram
    params_n: Histogram
    params_max_tokens: Histogram
    inference: Histogram
    prefill: Histogram
    decode: Histogram
    time_per_output_token: Histogram


def serving_family(r: CollectorRegistry, prefix: str, labels: dict, buckets: dict) -> Serving:
    names, values = list(labels), list(labels.values())

    def make(kind, name, doc, extra=(), **kw):
        return kind(prefix + name, doc, names + list(extra), registry=r, **kw)

    success = make(Counter, "request_success", "Finished sequences by reason.", ["finished_reason"])
    return Serving(
        running=make(Gauge, "num_requests_running", "Sequences in the running batch.").labels(
            *values
        ),
        waiting=make(Gauge, "num_requests_waiting", "Sequences waiting to be scheduled.").labels(
            *values
        ),
        kv=make(Gauge, "kv_cache_usage_perc", "KV cache usage (1 means 100 percent).").labels(
            *values
        ),
        ttft=make(
            Histogram,
            "time_to_first_token_seconds",
            "Time to first token.",
            buckets=buckets["ttft"],
        ).labels(*values),
        itl=make(
            Histogram,
            "inter_token_latency_seconds",
            "Time between output tokens.",
            buckets=buckets["token"],
        ).labels(*values),
        e2e=make(
            Histogram,
            "e2e_request_latency_seconds",
            "Arrival to last token.",
            buckets=buckets["request"],
        ).labels(*values),
        queue=make(
            Histogram,
            "request_queue_time_seconds",
            "Arrival to first schedule.",
            buckets=buckets["request"],
        ).labels(*values),
        prompt=make(Counter, "prompt_tokens", "Prompt tokens received.").labels(*values),
        gen=make(Counter, "generation_tokens", "Tokens generated.").labels(*values),
        preempt=make(
            Counter, "num_preemptions", "Sequences preempted (KV freed, recomputed later)."
        ).labels(*values),
        success={reason: success.labels(*values, reason) for reason in FINISH_REASONS},
    )


def vllm_request_family(r: CollectorRegistry, labels: dict, max_model_len: int) -> VllmRequest:
    names, values = list(labels), list(labels.values())
    tokens = buckets_1_2_5(max_model_len)

    def hist(name, doc, buckets):
        return Histogram("vllm:" + name, doc, names, buckets=buckets, registry=r).labels(*values)

    return VllmRequest(
        prompt_tokens=hist("request_prompt_tokens", "Number of prefill tokens processed.", tokens),
        generation_tokens=hist(
            "request_generation_tokens", "Number of generation tokens processed.", tokens
        ),
        max_generation_tokens=hist(
            "request_max_num_generation_tokens",
            "Histogram of maximum number of requested generation tokens.",
            tokens,
        ),
        params_n=hist(
            "request_params_n", "Histogram of the n request parameter.", [1, 2, 5, 10, 20]
        ),
        params_max_tokens=hist(
            "request_params_max_tokens", "Histogram of the max_tokens request parameter.", tokens
        ),
        inference=hist(
            "request_inference_time_seconds",
            "Histogram of time spent in RUNNING phase for request.",
            VLLM_REQUEST_BUCKETS,
        ),
        prefill=hist(
            "request_prefill_time_seconds",
            "Histogram of time spent in PREFILL phase for request.",
            VLLM_REQUEST_BUCKETS,
        ),
        decode=hist(
            "request_decode_time_seconds",
            "Histogram of time spent in DECODE phase for request.",
            VLLM_REQUEST_BUCKETS,
        ),
        time_per_output_token=hist(
            "request_time_per_output_token_seconds",
            "Histogram of time_per_output_token_seconds per request.",
            VLLM_TOKEN_LATENCY_BUCKETS,
        ),
    )


class Metrics(EngineStats):
    def __init__(
        self,
        model_name: str,
        registry: CollectorRegistry | None = None,
        names: str = "both",
        max_model_len: int = 2048,
    ) -> None:
        if names not in METRICS_NAMES:
            raise ValueError(f"metrics names must be one of {', '.join(METRICS_NAMES)}")
        self.registry = r = registry or CollectorRegistry()
        self.model_name = model_name
        ProcessCollector(registry=r)  # process_cpu_seconds_total, process_resident_memory_bytes..
        PlatformCollector(registry=r)  # python_info
        GCCollector(registry=r)  # python_gc_*
        self.families: list[Serving] = []
        if names in ("both", "engram"):
            ours = {"ttft": LATENCY_BUCKETS, "token": LATENCY_BUCKETS, "request": LATENCY_BUCKETS}
            self.families.append(serving_family(r, "engram_", {"model_name": model_name}, ours))
        self.vllm: VllmRequest | None = None
        if names in ("both", "vllm"):
            labels = {"model_name": model_name, "engine": "0"}  # one engine per server
            theirs = {
                "ttft": VLLM_TTFT_BUCKETS,
                "token": VLLM_TOKEN_LATENCY_BUCKETS,
                "request": VLLM_REQUEST_BUCKETS,
            }
            self.families.append(serving_family(r, "vllm:", labels, theirs))
            self.vllm = vllm_request_family(r, labels, max_model_len)
        self._groups: dict[str, list[int]] = {}  # request id -> [sequences left, most tokens]
        m = ["model_name"]

        def gauge(name, doc, labels=()):
            return Gauge(name, doc, m + list(labels), registry=r)

        def counter(name, doc, labels=()):
            return Counter(name, doc, m + list(labels), registry=r)

        self._errors = counter(
            "engram_request_errors", "Requests answered with an error, by HTTP status.", ["status"]
        )
        # --- offload: counters from the accountant at scrape time (offload_metrics.py), the
        # histograms observed per step ------------------------------------------------------
        lt = ["layer", "tier"]
        self.offload = OffloadCounters(model_name)
        r.register(self.offload)
        self._file_read = Histogram(
            "engram_offload_file_read_duration_seconds",
            "Time one step spent reading one layer's missing rows from the file.",
            m + lt,
            buckets=PREFETCH_BUCKETS,
            registry=r,
        )
        self._file_wait = Histogram(
            "engram_offload_file_wait_duration_seconds",
            "Time one layer's gather waited for its rows' file reads in one step.",
            m + lt,
            buckets=PREFETCH_BUCKETS,
            registry=r,
        )
        self._hot_layers: set[int] = set()
        self._prefetch = Histogram(
            "engram_offload_prefetch_duration_seconds",
            "Issue-to-ready time of one layer's rows.",
            m + ["layer"],
            buckets=PREFETCH_BUCKETS,
            registry=r,
        )
        self._stall_fraction = gauge(
            "engram_offload_stall_fraction", "Stall time / step time over recent steps."
        )
        self._table_bytes = gauge("engram_offload_table_bytes", "Engram table bytes.", ["tier"])
        self._link = gauge(
            "engram_offload_link_bandwidth_bytes_per_second",
            "Host-to-device copy ceiling measured at start-up.",
        )
        # --- per Engram memory (label memory: the base model's name for its own layers), as
        # vLLM labels LoRA adapters by name
        mem = ["memory"]
        self._mem_requests = counter(
            "engram_memory_requests", "Finished sequences per Engram memory.", mem
        )
        self._mem_prompt = counter(
            "engram_memory_prompt_tokens", "Prompt tokens of finished sequences per memory.", mem
        )
        self._mem_generation = counter(
            "engram_memory_generation_tokens", "Generated tokens of finished sequences.", mem
        )
        self._mem_rows = counter("engram_memory_rows", "Engram rows looked up per memory.", mem)
        self._mem_bytes = counter("engram_memory_bytes", "Engram row bytes moved per memory.", mem)
        self._mem_hits = counter(
            "engram_memory_cache_hits", "Rows served without a transfer (hot cache, repeats).", mem
        )
        self._mem_stall = counter(
            "engram_memory_stall_seconds", "Time compute waited for a memory's rows.", mem
        )
        # what each step adds to a memory's series (_observe_memory), in this order
        self._mem_step_counters = (self._mem_rows, self._mem_bytes, self._mem_hits, self._mem_stall)
        self._mem_version = gauge(
            "engram_memory_version", "The version of each memory new requests get.", mem
        )
        self.scheduler_state(0, 0, 0.0)

    # --- EngineStats: called from the engine thread ------------------------------------------
    def prompt_tokens(self, n: int) -> None:
        for f in self.families:
            f.prompt.inc(n)

    def generation_tokens(self, n: int) -> None:
        for f in self.families:
            f.gen.inc(n)

    def first_token(self, ttft_s: float, queue_s: float) -> None:
        for f in self.families:
            f.ttft.observe(ttft_s)
            f.queue.observe(queue_s)

    def inter_token(self, seconds: float) -> None:
        for f in self.families:
            f.itl.observe(seconds)

    def inter_tokens(self, seconds: list[float]) -> None:
        for f in self.families:
            observe_many(f.itl, seconds)

    def finished(self, reason: str, e2e_s: float | None = None, seq: Sequence | None = None):
        for f in self.families:
            f.success[reason].inc()
            if e2e_s is not None:
                f.e2e.observe(e2e_s)
        if self.vllm is not None and seq is not None:
            self._vllm_finished(seq, e2e_s is not None)
        if seq is not None:
            m, label = self.model_name, self.memory_label(seq.memory)
            self._mem_requests.labels(m, label).inc()
            self._mem_prompt.labels(m, label).inc(len(seq.prompt_ids))
            self._mem_generation.labels(m, label).inc(len(seq.output_ids))

    def _vllm_finished(self, seq: Sequence, completed: bool) -> None:
        """vLLM's per-request histograms: phases and token counts of a sequence that ran to
        its end; n and the most tokens generated once every sequence of its prompt is done."""
        v, gen = self.vllm, len(seq.output_ids)
        if completed and seq.first_token_at is not None and seq.scheduled_at is not None:
            first, last, started = seq.first_token_at, seq.last_token_at, seq.scheduled_at
            v.prompt_tokens.observe(len(seq.prompt_ids))
            v.generation_tokens.observe(gen)
            v.params_max_tokens.observe(seq.params.max_tokens)
            v.prefill.observe(first - started)
            v.decode.observe(last - first)
            v.inference.observe(last - started)
            v.time_per_output_token.observe((last - first) / (gen - 1) if gen > 1 else 0.0)
        group = self._groups.setdefault(seq.request_id, [seq.params.n, 0])
        group[0] -= 1
        group[1] = max(group[1], gen)
        if group[0] <= 0:
            del self._groups[seq.request_id]
            v.params_n.observe(seq.params.n)
            v.max_generation_tokens.observe(group[1])

    def preempted(self, n: int) -> None:
        for f in self.families:
            f.preempt.inc(n)

    def scheduler_state(self, running: int, waiting: int, kv_usage: float) -> None:
        for f in self.families:
            f.running.set(running)
            f.waiting.set(waiting)
            f.kv.set(kv_usage)

    # --- HTTP and offload ---------------------------------------------------------------------

    def error(self, status: int) -> None:
        self._errors.labels(self.model_name, str(status)).inc()

    # --- Engram memories ----------------------------------------------------------------------
    def memory_label(self, memory) -> str:
        return self.model_name if memory is None or memory.base else memory.name

    def watch_memory(self, memory) -> None:
        """Count a memory's steps under its name from now on (engine/memories.py Memory)."""
        m, label = self.model_name, self.memory_label(memory)
        for c in (self._mem_requests, self._mem_prompt, self._mem_generation):
            c.labels(m, label)
        series = [c.labels(m, label) for c in self._mem_step_counters]  # from zero, as these
        self._mem_version.labels(m, label).set(memory.version)
        memory.rows.accountant.subscribe(lambda step: self._observe_memory(series, step))

    def forget_memory(self, name: str) -> None:
        """An unloaded memory serves no new requests: its series go (names come and go with
        loads; kept series would grow without bound)."""
        families = (self._mem_requests, self._mem_prompt, self._mem_generation, self._mem_rows)
        for c in (*families, self._mem_bytes, self._mem_hits, self._mem_stall, self._mem_version):
            try:
                c.remove(self.model_name, name)
            except KeyError:
                pass

    def _observe_memory(self, series: list, step: StepStats) -> None:
        """A step's rows, bytes, hits and stall, on the memory's series (made once)."""
        rows = nbytes = hits = 0
        stall = 0.0
        for s in step.layers.values():
            rows += s.rows
            nbytes += s.bytes
            hits += s.rows - s.fetched
            stall += s.stall_s
        for child, v in zip(series, (rows, nbytes, hits, stall)):
            child.inc(v)

    def set_offload_static(self, table_bytes: dict[str, int], link_bps: float) -> None:
        for tier, n in table_bytes.items():
            self._table_bytes.labels(self.model_name, tier).set(n)
        self._link.labels(self.model_name).set(link_bps)

    def watch_offload(
        self, accountant: Accountant, layers: list[int], tier: str, hot: list[int] = ()
    ) -> None:
        """Export ``accountant``'s figures: every per-layer series from zero at once, so
        dashboards have data before traffic (``hot``: the layers with a hot-row cache); the
        counters and the stall fraction read when scraped, the histograms fed per step."""
        m = self.model_name
        self._hot_layers = set(hot)
        self.offload.watch(accountant, {lid: tier for lid in layers}, self._hot_layers)
        self._step_hists = {lid: self._layer_hists(lid, tier) for lid in layers}
        self._stall_fraction.labels(m).set_function(lambda: accountant.stall_fraction)
        accountant.subscribe(self.observe_offload_step)

    def observe_offload_step(self, step: StepStats) -> None:
        """A step's per-layer histograms (the engine's thread: no more than these)."""
        hists = self._step_hists
        for lid, s in step.layers.items():
            got = hists.get(lid)
            if got is None or (s.tier == "file") != (len(got) == 3):  # a layer not seen yet
                got = hists[lid] = self._layer_hists(lid, s.tier)
            got[0].observe(s.prefetch_s)
            if s.tier == "file":
                got[1].observe(s.file_read_s)
                got[2].observe(s.file_wait_s)

    def _layer_hists(self, lid: int, tier: str) -> list:
        m, layer = self.model_name, str(lid)
        hists = [self._prefetch.labels(m, layer)]
        if tier == "file":
            hists += [h.labels(m, layer, tier) for h in (self._file_read, self._file_wait)]
        return hists
