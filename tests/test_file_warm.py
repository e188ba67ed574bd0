"""The file tier's DRAM cache warmed from a profile before serving, CLOCK with counts, and
reads announced to the kernel: rows stay bit-identical, warmed rows are booked as hits."""

import numpy as np
import pytest
import torch

from offload.file_cache import SlotCache
from offload.file_gather import FileTierGather
from offload.file_tier import open_file_tier
from offload.hot_rows import HotSettings, warm_file_tier
from offload.paths import make_prefetcher
from offload.profile import HOT_ROWS_FILE, LayerProfile, write_hot_rows
from offload.store import Placement, TableStore

from .test_file_tier import CPU, run_steps, steps, write_tables


@pytest.mark.parametrize("fmt", ["bf16", "v41"])
@pytest.mark.parametrize("lazy", [True, False])
def test_warm_rows_are_bit_identical_and_booked_as_hits(tmp_path, fmt, lazy):
    path, keys = write_tables(tmp_path, fmt)
    host = TableStore.from_safetensors(path, keys, "cpu", progress=False)
    cache, tier = open_file_tier(path, keys, 400 * host[1].row_bytes, Placement.CPU, CPU)
    tier.lazy_reads = lazy
    ranked = np.random.default_rng(0).permutation(3000)
    ranked = np.concatenate(([-1, 5000], ranked))  # rows outside the table are ignored
    placed = tier.warm({1: ranked, 3: ranked[ranked < 1500], 7: ranked})  # 7: not in the tier
    slots = {lid: fl.cache.slots for lid, fl in tier.layers.items()}
    assert placed == slots and 7 not in placed
    assert not any(fl.cache.pins.any() for fl in tier.layers.values())
    assert tier.describe()["1"]["warm_rows"] == slots[1]
    pf = FileTierGather(make_prefetcher(cache, "worker", CPU), tier)
    top = ranked[2:][: slots[1]]
    in3 = ranked[(ranked >= 0) & (ranked < 1500)][: slots[3]]
    ids = {1: top[:40].reshape(10, 4), 3: in3[:40].reshape(10, 4)}
    (got,) = run_steps(pf, [ids])
    for lid in keys:
        want = host[lid].decode(host[lid].tensor[torch.from_numpy(ids[lid].reshape(-1))])
        assert torch.equal(got[lid].reshape(want.shape).view(torch.uint8), want.view(torch.uint8))
    layers = pf.accountant.totals.layers
    assert all((layers[lid].file_hits, layers[lid].file_misses) == (40, 0) for lid in keys)
    ids_list = list(steps({1: 3000, 3: 1500}, 20))  # then misses are read as before
    ref = make_prefetcher(host, "resident", CPU)
    for g, w in zip(run_steps(pf, ids_list), run_steps(ref, ids_list)):
        assert all(torch.equal(g[lid].view(torch.uint8), w[lid].view(torch.uint8)) for lid in g)
    pf.close()
    ref.close()


def test_preload_fills_free_slots_once_and_skips_held_rows():
    c = SlotCache(rows=1000, slots=10)
    held, _, _ = c.admit(np.array([3, 4]))  # a step in flight pins two slots
    rows, slots = c.preload(np.array([4, 900, 7, 8, 9, 10, 11, 12, 13, 14, 15]))
    assert rows.tolist() == [7, 8, 9, 10, 11, 12, 13, 900]  # 4 held; 8 free slots, ranked first
    assert not set(slots.tolist()) & set(held.tolist())
    assert (c.directory.lookup(rows) == slots).all() and (c.pins[slots] == 1).all()
    c.release(slots)
    c.release(held)
    assert not c.pins.any()


@pytest.mark.parametrize("max_ref,kept", [(3, True), (1, False)])
def test_clock_counts_keep_a_row_read_often_past_a_stream_of_one_hit_rows(max_ref, kept):
    c = SlotCache(rows=10_000, slots=10, max_ref=max_ref)
    for _ in range(4):  # read by four steps
        s, _, _ = c.admit(np.array([0]))
        c.release(s)
    for r in range(1, 26):  # 2.5 turns of the hand of rows read once
        s, _, _ = c.admit(np.array([r]))
        c.release(s)
    assert (c.directory.lookup(np.array([0]))[0] >= 0) == kept


def test_warm_from_the_profile_beside_the_checkpoint_skips_a_static_hot_set(tmp_path):
    path, keys = write_tables(tmp_path, "bf16")
    _, tier = open_file_tier(path, keys, 100 * 128, Placement.CPU, CPU)
    prof = {
        lid: LayerProfile(np.arange(n - 1, -1, -1), np.ones(n, np.int64), n, n)
        for lid, n in ((1, 3000), (3, 1500))
    }  # rows ranked from the last
    write_hot_rows(tmp_path / HOT_ROWS_FILE, prof, {"corpus": "test"})
    assert warm_file_tier(tier, HotSettings(rows=0)) == {}  # no profile: nothing placed
    hot = HotSettings(rows=5, policy="static").with_default_file(tmp_path)
    placed = warm_file_tier(tier, hot)
    assert placed == {lid: fl.cache.slots for lid, fl in tier.layers.items()}
    held = tier.layers[1].cache.row_of_slot
    assert 2999 not in held and 2994 in held  # the hot cache's five rows are not in DRAM
    tier.close()


def test_load_warms_the_dram_cache_from_the_profile_and_serves_the_same_tokens(tiny_ckpt, tmp_path):
    """OffloadedModel.load with --placement file and a --hot-rows-file (no hot cache): the DRAM
    caches start filled from the profile, and greedy tokens equal all-host serving's."""
    from engine.generate import generate
    from models.checkpoint import ENGRAM_FILE, table_key
    from models.config import ModelConfig
    from models.safetensors_header import read_header
    from offload.file_tier import table_bytes
    from offload.offloaded_model import OffloadedModel
    from offload.table_load import table_source

    lids = ModelConfig.load(tiny_ckpt).engram_layer_ids
    sizes = table_bytes(tiny_ckpt / ENGRAM_FILE, {i: table_key(i) for i in lids})
    header = read_header(tiny_ckpt / ENGRAM_FILE)
    rows = {lid: table_source(header, table_key(lid)).rows for lid in lids}
    prof = {  # any ranking will do: the rows backwards
        lid: LayerProfile(np.arange(n)[::-1].copy(), np.ones(n, np.int64), n, n)
        for lid, n in rows.items()
    }
    write_hot_rows(tmp_path / "p.safetensors", prof, {"corpus": "test"})
    hot = HotSettings(rows=0, file=tmp_path / "p.safetensors")
    om = OffloadedModel.load(
        tiny_ckpt, placement="file", host_memory_bytes=sum(sizes.values()) // 4, hot=hot,
        progress=False,
    )  # fmt: skip
    ref = OffloadedModel.load(tiny_ckpt, placement="cpu", progress=False)
    try:
        info = om.file_tier.describe()
        assert all(info[str(lid)]["warm_rows"] == info[str(lid)]["cache_slots"] for lid in lids)
        prompts = [[5, 9, 2, 7, 1, 3], [4, 4, 8]]
        want = generate(ref.model, prompts, max_new_tokens=8, rows=ref.prefetcher)
        assert generate(om.model, prompts, max_new_tokens=8, rows=om.prefetcher) == want
    finally:
        om.close()
        ref.close()
