"""The offload counters, read from the accountant's totals at scrape time, equal the per-step
sums the server counted before (names, labels, values), from zero before the first step."""

import random
import threading

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from offload.accounting import Accountant, LayerStats, StepStats
from server.metrics import Metrics
from server.startup import forget_steps


def samples(m: Metrics) -> dict:
    out = {}
    for fam in text_string_to_metric_families(generate_latest(m.registry).decode()):
        for s in fam.samples:
            if fam.name.startswith("engram_offload") and not s.name.endswith("_created"):
                out[s.name, tuple(sorted(s.labels.items()))] = s.value
    return out


def steps(tier: str, hot: set[int], n: int, seed: int = 0) -> list[StepStats]:
    rng, out = random.Random(seed), []
    for _ in range(n):
        st = StepStats(step_s=rng.uniform(1e-3, 1e-2), num_tokens=4)
        for lid in (2, 5):
            rows = rng.randint(10, 100)
            hits = rng.randint(0, rows // 2) if lid in hot else 0
            fetched = rng.randint(0, rows - hits)
            st.layers[lid] = LayerStats(
                lid,
                tier,
                rows=rows,
                unique_rows=rows - rng.randint(0, 5),
                fetched=fetched,
                bytes=64 * fetched,
                hits=hits,
                prefetch_s=rng.uniform(0, 1e-3),
                stall_s=rng.uniform(0, 1e-4),
                slack_s=rng.uniform(0, 1e-4),
                file_hits=rng.randint(0, 9),
                file_misses=rng.randint(0, 9),
                file_bytes=rng.randint(0, 999),
                file_read_s=rng.uniform(0, 1e-3),
                file_wait_s=rng.uniform(0, 1e-3),
            )
        out.append(st)
    return out


def expected(tier: str, hot: set[int], booked: list[StepStats]) -> dict:
    """What one counter per series, incremented per step, holds after ``booked``."""
    want: dict = {}

    def add(name, value, layer=None, tier_=None):
        labels = {"model_name": "m"}
        if layer is not None:
            labels["layer"] = str(layer)
        if tier_ is not None:
            labels["tier"] = tier_
        key = (name, tuple(sorted(labels.items())))
        want[key] = want.get(key, 0) + value

    for st in [StepStats(layers={lid: LayerStats(lid, tier) for lid in (2, 5)}), *booked]:
        add("engram_offload_steps_total", 1 if st.step_s else 0)
        add("engram_offload_step_seconds_total", st.step_s)
        for lid, s in st.layers.items():
            add("engram_offload_bytes_total", s.bytes, lid, s.tier)
            add("engram_offload_rows_total", s.rows, lid, s.tier)
            add("engram_offload_unique_rows_total", s.unique_rows, lid, s.tier)
            add("engram_offload_cache_hits_total", s.rows - s.hits - s.fetched, lid, s.tier)
            add("engram_offload_cache_misses_total", s.fetched, lid, s.tier)
            if lid in hot:
                add("engram_offload_cache_queries_total", s.rows, lid, "hot")
                add("engram_offload_cache_hits_total", s.hits, lid, "hot")
                add("engram_offload_cache_misses_total", s.rows - s.hits, lid, "hot")
            if tier == "file":
                add("engram_offload_dram_cache_hits_total", s.file_hits, lid, s.tier)
                add("engram_offload_dram_cache_misses_total", s.file_misses, lid, s.tier)
                add("engram_offload_file_read_bytes_total", s.file_bytes, lid, s.tier)
            add("engram_offload_stall_seconds_total", s.stall_s, lid)
            add("engram_offload_slack_seconds_total", s.slack_s, lid)
    return want


@pytest.mark.parametrize("tier,hot", [("cpu", {2}), ("file", set())])
def test_offload_counters_are_the_sums_of_the_steps(tier, hot):
    m, acc = Metrics("m"), Accountant()
    acc.record(steps(tier, hot, 1, seed=9)[0])  # booked before the server watches: not traffic
    forget_steps(acc)
    m.watch_offload(acc, [2, 5], tier, sorted(hot))
    got = samples(m)
    for key in expected(tier, hot, []):  # every series, from zero
        assert got[key] == 0, key
    booked = steps(tier, hot, 30)
    for st in booked:
        acc.record(st)
    got = samples(m)
    for key, value in expected(tier, hot, booked).items():
        assert got[key] == pytest.approx(value, rel=1e-12, abs=1e-15), key
    stall = sum(st.stall_s for st in booked) / sum(st.step_s for st in booked)
    assert got["engram_offload_stall_fraction", (("model_name", "m"),)] == pytest.approx(stall)
    count = got[
        "engram_offload_prefetch_duration_seconds_count", (("layer", "2"), ("model_name", "m"))
    ]
    assert count == len(booked)  # histograms: one observation per step and layer
    waits = [k for k in got if k[0] == "engram_offload_file_wait_duration_seconds_count"]
    assert [got[k] for k in waits] == ([len(booked)] * 2 if tier == "file" else [])


def test_offload_families_are_there_before_the_model_loads():
    got = generate_latest(Metrics("m").registry).decode()
    assert "# TYPE engram_offload_bytes_total counter" in got
    assert "engram_offload_bytes_total{" not in got  # no series until the layers are known


def test_a_scrape_reads_the_totals_of_whole_steps():
    """The counters' collector copies the totals under the accountant's lock: while a step
    is being booked (the lock held) it waits, so it never sees a layer's rows without its hits
    and fetches (a hits counter made of their difference would go down at the next scrape)."""
    m, acc = Metrics("m"), Accountant()
    m.watch_offload(acc, [2, 5], "cpu", [2])
    done = threading.Event()
    with acc._lock:  # a step half booked
        scraper = threading.Thread(target=lambda: (list(m.offload.collect()), done.set()))
        scraper.start()
        assert not done.wait(0.2)
    assert done.wait(10)
    scraper.join()
    snap = acc.snapshot()
    acc.record(steps("cpu", {2}, 1)[0])
    assert snap.steps == 0 and all(s.rows == 0 for s in snap.layers.values())  # a copy
