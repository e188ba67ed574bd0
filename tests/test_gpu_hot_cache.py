"""The hot-row cache on CUDA: rows assembled on the device bit-identical to the paths without
it (resident, staged, UVA, auto; bf16 and fp8; sorted and de-duplicated plans), greedy tokens
identical through the engine, and a graphed decode step that makes no host sync."""

import numpy as np
import pytest
import torch

from engine.config import EngineConfig
from engine.engine import Engine
from engine.kv_cache import KVCache
from engine.model_runner import ModelRunner
from engine.sampling import SamplingParams
from offload.hot_cache import HotCache
from offload.hot_rows import HotRows
from offload.offloaded_model import OffloadedModel
from offload.store import cupy_ok

from .conftest import new_seq, tiny_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not cupy_ok(), reason="needs CUDA and CuPy")]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def _ids(model, n=300, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for lid in model.config.engram_layer_ids:
        rows = model.engram_table(lid).shape[0]
        ids = (rng.zipf(1.3, (n, model.config.engram_total_heads)) * 7919 + lid) % rows
        out[lid] = ids.astype(np.int64)
    return out


def _hot(prefetcher, ids, share=0.5, **kw):
    caches = {}
    for lid, t in prefetcher.store.tables.items():
        uniq, counts = np.unique(ids[lid], return_counts=True)
        top = uniq[np.argsort(-counts, kind="stable")][: max(1, int(uniq.size * share))]
        caches[lid] = HotCache(t, top.size, "cuda", top, **kw)
    return HotRows(prefetcher, caches)


def _rows_via(prefetcher, ids):
    plan = prefetcher.plan(ids)
    pending = prefetcher.start(plan)
    try:
        got = {lid: pending.rows(lid).clone() for lid in ids}
    finally:
        pending.close()
    return {lid: t.cpu() for lid, t in got.items()}


@pytest.mark.parametrize(
    "placement,gather", [("gpu", "resident"), ("host", "staged"), ("host", "uva"), ("host", "auto")]
)
@pytest.mark.parametrize("dedup", [False, True])
@pytest.mark.parametrize("row_format", ["auto", "fp8"])
def test_cuda_rows_bit_identical_with_hot_cache(placement, gather, dedup, row_format):
    model = tiny_model(2, engram_head_dim=32).to("cuda")
    kw = dict(device="cuda", dedup=dedup, dtype=torch.bfloat16, row_format=row_format)
    om = OffloadedModel.from_model(model, placement, gather, **kw)
    ids = _ids(model)
    want = _rows_via(om.prefetcher, ids)
    hot = _hot(om.prefetcher, ids)
    got = _rows_via(hot, ids)
    for lid in ids:
        assert torch.equal(_bits(got[lid]), _bits(want[lid])), lid
    hot.flush()  # CUDA steps are booked once their events have run
    assert all(0 < s.hits < s.rows for s in om.accountant.last.layers.values())
    om.close()


@pytest.mark.parametrize("policy", ["static", "adaptive"])
def test_engine_tokens_identical_with_hot_cache(policy):
    model = tiny_model(2).to("cuda")
    om = OffloadedModel.from_model(model, "host", "uva", device="cuda")
    adaptive = dict(adaptive=True, refresh_every=2, max_replace=16) if policy == "adaptive" else {}
    hot = _hot(om.prefetcher, _ids(model), 0.3, **adaptive)
    outs = []
    for rows in (om.prefetcher, hot):
        engine = Engine(model, EngineConfig(max_num_seqs=4, max_num_batched_tokens=64), rows)
        seqs = [
            engine.add(f"r{i}", p, SamplingParams(max_tokens=16, temperature=0.0))[0]
            for i, p in enumerate([[1, 2, 3], [4, 5, 6, 7], [8]])
        ]
        engine.run_until_done()
        assert engine.fault is None
        outs.append([s.output_ids for s in seqs])
    assert outs[0] == outs[1]
    if policy == "adaptive":
        assert all(c.stats.replaced > 0 for c in hot.caches.values())
    om.close()


def test_a_decode_step_with_hot_rows_makes_no_host_sync():
    model = tiny_model(2).to("cuda")
    om = OffloadedModel.from_model(model, "host", "uva", device="cuda")
    hot = _hot(om.prefetcher, _ids(model), 0.3)
    cache = KVCache(model.config, 256, 16, 8, device="cuda")
    runner = ModelRunner(
        model, cache, rows=hot, attention="triton", decode_graphs=True, capture=True
    )
    seqs = [new_seq(runner.cache) for _ in range(3)]
    tokens = runner.step(seqs, [[1, 2, 3], [4, 5], [6]]).argmax(-1).tolist()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            logits = runner.step(seqs, [[t] for t in tokens])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert runner.graphs.steps == 3 and logits.shape[0] == 3
    om.close()
