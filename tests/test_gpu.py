"""CUDA paths. Skipped without CUDA and CuPy; run on a GPU machine with ``pytest -m gpu``."""

import numpy as np
import pytest
import torch

from engine.generate import generate
from engine.kv_cache import KVCache
from engine.model_runner import ModelRunner
from offload.offloaded_model import OffloadedModel
from offload.plan import GatherError
from offload.store import TableStore, cupy_ok

from .conftest import new_seq, tiny_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not cupy_ok(), reason="needs CUDA and CuPy"),
]
PROMPTS = [[1, 2, 3, 4, 5], [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 11], [42], [7, 7, 7, 7]]


def _cuda_model(seed=2):
    return tiny_model(seed).to("cuda")


def test_mapped_pinned_table_reads_back_on_device():
    store = TableStore.allocate({0: (1000, 16)}, torch.float32, "host", "cuda")
    t = store[0]
    t.tensor.copy_(torch.arange(16000, dtype=torch.float32).view(1000, 16))
    view = t.device_view(torch.device("cuda"))
    assert view.is_cuda and view.data_ptr() == t.memory.ptr  # a view, not a copy on the GPU
    idx = torch.tensor([0, 999, 17], device="cuda")
    assert torch.equal(view[idx].cpu(), t.tensor[idx.cpu()])


def test_host_view_outlives_its_store():
    store = TableStore.allocate({0: (64, 8)}, torch.bfloat16, "host", "cuda")
    host = store[0].tensor
    host.copy_(torch.arange(512, dtype=torch.bfloat16).view(64, 8))
    del store  # the tensor alone must keep the pinned allocation alive
    torch.empty(64 << 20, dtype=torch.uint8).pin_memory()  # churn the pinned allocator
    assert torch.equal(host[63], torch.arange(504, 512, dtype=torch.bfloat16))


def test_gather_microbenchmark_measures_every_path_and_picks_a_crossover():
    from offload.autoselect import crossover_rows, measure_gathers

    store = TableStore.allocate({0: (1 << 16, 64)}, torch.bfloat16, "host", "cuda")
    rows = measure_gathers(store, torch.device("cuda"), (256, 1 << 14), repeats=2, resident=True)
    assert [r["rows"] for r in rows] == [256, 1 << 14]
    for r in rows:
        assert r["staged_s"] > 0 and r["uva_s"] > 0 and r["resident_s"] > 0
    c = crossover_rows(rows)
    assert c is None or c in (256, 1 << 14)


@pytest.mark.parametrize("gather", ["staged", "uva", "auto"])
@pytest.mark.parametrize("dedup", [False, True])
def test_offloaded_paths_match_resident_tokens_and_logits(gather, dedup):
    model = _cuda_model()
    resident = OffloadedModel.from_model(model, "gpu", "resident", device="cuda")
    engine = OffloadedModel.from_model(model, "host", gather, device="cuda", dedup=dedup)
    ref = generate(model, PROMPTS, 200, rows=resident.prefetcher)  # long: staging reused
    assert generate(model, PROMPTS, 200, rows=engine.prefetcher) == ref
    rng = np.random.default_rng(0)
    ids = [rng.integers(0, 300, size=30).tolist() for _ in range(3)]
    outs = []
    for rows in (resident.prefetcher, engine.prefetcher):
        cache = KVCache(model.config, 32, 4, 3, device="cuda")
        runner = ModelRunner(model, cache, rows)
        seqs = [new_seq(cache) for _ in ids]
        a = runner.step(seqs, [ids[0][:7], ids[1][:1], ids[2][:13]], all_logits=True)
        b = runner.step(seqs, [ids[0][7:8], ids[1][1:9], ids[2][13:14]], all_logits=True)
        outs.append(torch.cat([a, b]))
    assert torch.equal(outs[0], outs[1])
    s = engine.accountant.summary()
    assert s["steps"] > 200
    for layer in s["layers"].values():
        assert layer["tier"] == "host" and layer["bytes_per_step"] > 0
        assert layer["prefetch_ms_per_step"] > 0
    engine.close()


def test_out_of_range_row_is_refused_before_any_device_read():
    model = _cuda_model()
    engine = OffloadedModel.from_model(model, "host", "uva", device="cuda")
    lid = model.config.engram_layer_ids[0]
    rows = engine.store[lid].rows
    with pytest.raises(GatherError, match=f"Engram layer {lid}: row {rows} is outside"):
        engine.prefetcher.plan({lid: np.array([[0], [rows]])})
    torch.cuda.synchronize()  # the context is still healthy: no device-side assert fired


def test_staged_fault_surfaces_naming_the_layer():
    model = _cuda_model()
    engine = OffloadedModel.from_model(model, "host", "staged", device="cuda")
    real = engine.prefetcher.gather_layer

    def failing(lp, slot):
        if lp.layer_id == 2:
            raise RuntimeError("injected fault")
        return real(lp, slot)

    engine.prefetcher.gather_layer = failing
    with pytest.raises(GatherError, match="Engram layer 2: gather failed"):
        generate(model, PROMPTS, 3, rows=engine.prefetcher)
    engine.prefetcher.gather_layer = real
    resident = OffloadedModel.from_model(model, "gpu", "resident", device="cuda")
    assert generate(model, PROMPTS, 3, rows=engine.prefetcher) == generate(
        model, PROMPTS, 3, rows=resident.prefetcher
    )
