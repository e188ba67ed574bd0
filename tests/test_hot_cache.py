"""The hot-row cache on the CPU paths: the hit/miss split against a reference set lookup, rows
bit-identical with and without the cache (every CPU gather path, plain and fp8 rows, sorted
and de-duplicated plans), adaptive refresh never changing a row a step reads, and its cost
bounded by the configured replacements."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.generate import generate
from offload.hot_cache import HotCache, HotCacheError, parse_hot_rows, weakest
from offload.hot_rows import HotRows, HotSettings, with_hot_cache
from offload.offloaded_model import OffloadedModel
from offload.store import TableStore

from .conftest import tiny_model


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def _rows_via(prefetcher, row_ids):
    plan = prefetcher.plan(row_ids)
    pending = prefetcher.start(plan)
    try:
        return {lid: pending.rows(lid).clone() for lid in row_ids}
    finally:
        pending.close()


def _zipf_ids(model, n=48, seed=0):
    """Lookups with a few very frequent rows (so a small cache hits) and repeats (for dedup)."""
    rng = np.random.default_rng(seed)
    heads = model.config.engram_total_heads
    out = {}
    for lid in model.config.engram_layer_ids:
        rows = model.engram_table(lid).shape[0]
        ids = np.minimum(rng.zipf(1.3, (n, heads)) - 1, rows - 1).astype(np.int64)
        ids = (ids * 7919 + lid) % rows
        ids[: n // 4] = rng.integers(0, rows, (n // 4, heads))
        out[lid] = ids
    return out


def _caches(store, ids, device="cpu", **kw):
    """Hot caches holding the most frequent half of each layer's requested rows."""
    out = {}
    for lid, t in store.tables.items():
        uniq, counts = np.unique(ids[lid], return_counts=True)
        top = uniq[np.argsort(-counts, kind="stable")][: max(1, uniq.size // 2)]
        out[lid] = HotCache(t, top.size, device, top, **kw)
    return out


@pytest.mark.parametrize("row_format", ["auto", "fp8"])
@pytest.mark.parametrize("gather", ["resident", "worker"])
@pytest.mark.parametrize("dedup", [False, True])
@pytest.mark.parametrize("sort", [False, True])
def test_rows_bit_identical_with_hot_cache(row_format, gather, dedup, sort):
    model = tiny_model().to(torch.bfloat16) if row_format == "auto" else tiny_model()
    om = OffloadedModel.from_model(model, "cpu", gather, dedup=dedup, row_format=row_format)
    ids = _zipf_ids(model)
    hot = HotRows(om.prefetcher, _caches(om.store, ids))
    if sort:  # the sorted plan the UVA path sends
        om.prefetcher.plan = lambda r, p=om.prefetcher.plan: p(r).sorted()
    try:
        ref = _rows_via(om.prefetcher, ids)
        got = _rows_via(hot, ids)
        for lid in ids:
            assert torch.equal(_bits(got[lid]), _bits(ref[lid])), lid
        st_ = om.accountant.last.layers
        assert all(0 < s.hits < s.rows for s in st_.values())  # both halves were exercised
    finally:
        om.close()


@settings(max_examples=60, deadline=None)
@given(
    held=st.lists(st.integers(0, 63), max_size=40),
    asked=st.lists(st.integers(0, 63), min_size=0, max_size=80),
)
def test_split_equals_set_lookup(held, asked):
    table = torch.arange(64 * 4, dtype=torch.float32).view(64, 4)
    store = TableStore.allocate({0: (64, 4)}, torch.float32, "cpu", "cpu")
    store[0].tensor.copy_(table)
    cache = HotCache(store[0], max(1, len(held)), "cpu", np.array(held, np.int64))
    flat = np.array(asked, np.int64)
    sp = cache.split(flat)
    ref = set(held)
    assert sp.hit_pos.tolist() == [i for i, x in enumerate(asked) if x in ref]
    assert sp.miss_pos.tolist() == [i for i, x in enumerate(asked) if x not in ref]
    assert sp.miss_ids.tolist() == [x for x in asked if x not in ref]
    # every hit's slot holds exactly the requested row
    assert torch.equal(cache.rows[torch.from_numpy(sp.hit_slots)], table[flat[sp.hit_pos]])


def test_all_hits_and_all_misses_book_the_step():
    model = tiny_model()
    om = OffloadedModel.from_model(model, "cpu", "resident")
    ids = _zipf_ids(model)
    everything = {
        lid: HotCache(t, t.rows, "cpu", np.arange(t.rows)) for lid, t in om.store.tables.items()
    }
    ref = _rows_via(om.prefetcher, ids)
    got = _rows_via(HotRows(om.prefetcher, everything), ids)
    assert all(torch.equal(got[lid], ref[lid]) for lid in ids)
    last = om.accountant.last.layers
    assert all(s.hits == s.rows and s.bytes == 0 for s in last.values())
    empty = {lid: HotCache(t, 4, "cpu", None) for lid, t in om.store.tables.items()}
    got = _rows_via(HotRows(om.prefetcher, empty), ids)
    assert all(torch.equal(got[lid], ref[lid]) for lid in ids)
    assert all(s.hits == 0 for s in om.accountant.last.layers.values())


def test_greedy_tokens_identical_with_hot_cache():
    model = tiny_model()
    om = OffloadedModel.from_model(model, "cpu", "worker")
    prompts = [[1, 2, 3, 4, 5], [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 11], [42], [7, 7, 7, 7]]
    ref = generate(model, prompts, max_new_tokens=12, rows=om.prefetcher)
    for policy in ("static", "adaptive"):
        ids = _zipf_ids(model)
        caches = _caches(
            om.store, ids, adaptive=policy == "adaptive", refresh_every=2, max_replace=8
        )
        hot = HotRows(om.prefetcher, caches)
        got = generate(model, prompts, max_new_tokens=12, rows=hot)
        assert got == ref, policy
        hits = om.accountant.totals.layers
        assert all(s.hits > 0 for s in hits.values())
    om.close()


def test_adaptive_refresh_never_changes_a_row_a_step_reads():
    """Refreshes run between planning and reading (a step in flight), and between steps; every
    step's rows equal the table's."""
    model = tiny_model()
    om = OffloadedModel.from_model(model, "cpu", "resident")
    caches = {
        lid: HotCache(t, 32, "cpu", None, adaptive=True, refresh_every=1, max_replace=8)
        for lid, t in om.store.tables.items()
    }
    hot = HotRows(om.prefetcher, caches)
    replaced = 0
    for step in range(30):
        ids = _zipf_ids(model, n=16, seed=step % 5)
        ref = _rows_via(om.prefetcher, ids)
        plan = hot.plan(ids)
        pending = hot.start(plan)
        for c in caches.values():  # a refresh while this step is in flight
            c._hits.append(np.arange(c.held, dtype=np.int64)[:0])
            c._misses.append(np.random.default_rng(step).integers(0, c.table.rows, 64))
            replaced += c.refresh()
        got = {lid: pending.rows(lid) for lid in ids}
        pending.close()  # and the scheduled refresh between steps
        for lid in ids:
            assert torch.equal(got[lid], ref[lid]), (step, lid)
    assert replaced > 0
    for c in caches.values():
        assert c.held <= c.capacity
        assert max(c.stats.seconds) < 0.5  # bounded: at most max_replace rows per refresh
        held = torch.from_numpy(c.mapping.ids)
        slots = torch.from_numpy(c.mapping.slots)
        assert torch.equal(c.rows[slots], c.table.tensor[held])  # the mapping is exact


def test_refresh_replaces_at_most_max_replace():
    store = TableStore.allocate({0: (1000, 4)}, torch.float32, "cpu", "cpu")
    cache = HotCache(store[0], 100, "cpu", np.arange(100), adaptive=True, max_replace=10)
    cache._misses.append(np.repeat(np.arange(500, 700), 5))
    assert cache.refresh() == 10
    assert cache.held == 100
    assert cache.refresh() == 0  # nothing counted since


def test_parse_hot_rows_and_settings():
    assert parse_hot_rows("0", 1000) == 0
    assert parse_hot_rows("128", 1000) == 128
    assert parse_hot_rows("0.01", 1000) == 10
    assert parse_hot_rows(5000, 1000) == 1000
    for bad in ("-1", "1.5", "lots"):
        with pytest.raises(HotCacheError, match="--hot-rows"):
            parse_hot_rows(bad, 1000)
    om = OffloadedModel.from_model(tiny_model(), "cpu", "resident")
    assert with_hot_cache(om.prefetcher, HotSettings(0)) is om.prefetcher
    with pytest.raises(HotCacheError, match="--hot-rows-file"):
        with_hot_cache(om.prefetcher, HotSettings(16, policy="static"))
    hot = with_hot_cache(om.prefetcher, HotSettings(16, policy="adaptive"))
    assert {d["capacity_rows"] for d in hot.describe().values()} == {16}


def test_engine_tokens_identical_with_adaptive_refresh_while_overlapped():
    """Overlapped steps: the next step planned, and caches refreshed, while one runs."""
    from engine.config import EngineConfig
    from engine.engine import Engine
    from engine.sampling import SamplingParams

    model = tiny_model()
    om = OffloadedModel.from_model(model, "cpu", "worker")
    outs = []
    for hot in (False, True):
        rows = om.prefetcher
        if hot:
            caches = {
                lid: HotCache(t, 24, "cpu", None, adaptive=True, refresh_every=1, max_replace=6)
                for lid, t in om.store.tables.items()
            }
            rows = HotRows(om.prefetcher, caches)
        cfg = EngineConfig(max_num_seqs=4, max_num_batched_tokens=64, no_overlap=False)
        engine = Engine(model, cfg, rows)
        seqs = [
            engine.add(f"r{i}", p, SamplingParams(max_tokens=20, temperature=0.0))[0]
            for i, p in enumerate([[1, 2, 3], [4, 5, 6, 7], [8], [9, 9, 9]])
        ]
        engine.run_until_done()
        assert engine.fault is None
        assert engine.overlap is not None
        outs.append([s.output_ids for s in seqs])
        engine.close()
    assert outs[0] == outs[1]
    assert all(c.stats.replaced > 0 for c in caches.values())
    om.close()


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 3), min_size=1, max_size=60), st.integers(1, 60))
def test_weakest_are_the_k_lowest_scores(scores, k):
    score = np.array(scores, np.float64) * 0.5
    k = min(k, score.size)
    got = weakest(score, k)
    assert len(set(got.tolist())) == k
    assert sorted(score[got].tolist()) == sorted(score.tolist())[:k]


def test_start_up_gather_check_covers_the_hot_path():
    from engine.kernel_check import check_gather

    om = OffloadedModel.from_model(tiny_model(), "cpu", "worker", row_format="fp8")
    hot = with_hot_cache(om.prefetcher, HotSettings(0.3, policy="adaptive"))
    for c in hot.caches.values():  # a half-full cache: the check's rows hit and miss
        c._misses.append(np.arange(0, c.table.rows, 2))
        c.max_replace = c.capacity
        c.refresh()
    checked = check_gather(hot, torch.device("cpu"))
    assert [c.kernel for c in checked] == [
        "Engram row gather (worker, fp8 rows)",
        "Engram row gather (worker + hot rows, fp8 rows)",
    ]
    assert all(c.ok for c in checked)
    om.close()


def test_mapping_equals_a_reference_through_refreshes_and_compactions():
    """Refreshes change the mapping by its delta (base entries cleared in place, the delta
    merged into a new base now and then); after each one every lookup equals a reference
    dict of what the slots hold, and every held slot holds its row."""
    table = torch.arange(5000 * 4, dtype=torch.float32).view(5000, 4)
    store = TableStore.allocate({0: (5000, 4)}, torch.float32, "cpu", "cpu")
    store[0].tensor.copy_(table)
    cache = HotCache(store[0], 300, "cpu", np.arange(0, 600, 2), True, max_replace=16, sample=64)
    cache.compact_at = 40
    rng = np.random.default_rng(3)
    compactions, delta, held_open = 0, 0, []
    for step in range(240):
        flat = np.minimum(rng.zipf(1.2, 96) * 3, 4999).astype(np.int64)
        sp = cache.split(flat)
        held_open.append(sp.version)  # steps close a few steps later: open across refreshes
        if len(held_open) > 3:
            cache.release(held_open.pop(0))
        if step % 2 == 0:
            cache.refresh()
        m = cache.mapping
        compactions += m.add_ids.size < delta
        delta = m.add_ids.size
        ref = {int(r): s for s, r in enumerate(cache.row_of.tolist()) if r >= 0}
        ids, slots = m.items()
        assert dict(zip(ids.tolist(), slots.tolist())) == ref and cache.held == len(ref) <= 300
        assert torch.equal(cache.rows[torch.from_numpy(slots)], table[torch.from_numpy(ids)])
        probe = rng.integers(0, 5000, 200)
        assert m.lookup(probe).tolist() == [ref.get(p, -1) for p in probe.tolist()]
    assert cache.stats.replaced > 100 and compactions > 0
