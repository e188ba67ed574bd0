"""The CUDA row paths after issue 14: the Triton kernel inside UvaGather on a real mapped table,
the threaded staged path, FP8 rows on every path, huge-page host tables registered with CUDA,
and 'auto' measuring the kernel. Skipped without CUDA and CuPy; ``pytest -m gpu`` on a GPU."""

import numpy as np
import pytest
import torch

from engine.generate import generate
from offload.autoselect import (
    AutoGather,
    best_programs,
    crossover_rows,
    grid_sizes,
    measure_gathers,
)
from offload.cuda_gather import StagedGather, UvaGather
from offload.hostmem import HostBuffer, PinnedBuffer
from offload.offloaded_model import OffloadedModel
from offload.rowformat import dequantize_fp8, quantize_fp8
from offload.store import TableStore, cupy_ok
from offload.uva_kernel import gather_rows

from .conftest import tiny_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not cupy_ok(), reason="needs CUDA and CuPy"),
]
PROMPTS = [[1, 2, 3, 4, 5], [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 11], [42], [7, 7, 7, 7]]
HOST_GATHERS = ["staged", "uva", "auto"]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def _model(head_dim=32):
    return tiny_model(2, engram_head_dim=head_dim).to("cuda")


def _row_ids(model, n=300, seed=0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for lid in model.config.engram_layer_ids:
        ids = rng.integers(
            0, model.engram_table(lid).shape[0], (n, model.config.engram_total_heads)
        )
        ids[: n // 3] = ids[-(n // 3) :]  # duplicates
        out[lid] = ids
    return out


def _rows_via(prefetcher, row_ids: dict) -> dict[int, torch.Tensor]:
    plan = prefetcher.plan(row_ids)
    pending = prefetcher.start(plan)
    try:
        got = {lid: pending.rows(lid).clone() for lid in row_ids}
    finally:
        pending.close()
    return {lid: t.cpu() for lid, t in got.items()}


def _fp8_reference(model, lid, ids, dtype=torch.float32) -> torch.Tensor:
    q = quantize_fp8(model.engram_table(lid).detach().float().cpu())
    return dequantize_fp8(q[torch.from_numpy(ids.reshape(-1))], dtype)


# --- host memory ---------------------------------------------------------------------------------
@pytest.mark.parametrize("huge", [True, False])
def test_host_tier_tables_are_registered_viewed_and_gathered(huge):
    store = TableStore.allocate({0: (1 << 14, 64)}, torch.bfloat16, "host", "cuda", huge_pages=huge)
    table = store[0]
    host = table.tensor
    host.copy_(torch.randn(1 << 14, 64).to(torch.bfloat16))
    d = store.describe()
    assert d["registered"] and d["placement"] == "host" and d["huge_pages_requested"] is huge
    if huge:
        assert isinstance(table.memory, HostBuffer) and d["memory"] == [table.memory.kind]
        assert table.memory.kind in ("thp", "hugetlb", "none")
    else:
        assert isinstance(table.memory, PinnedBuffer) and d["memory"] == ["cuda-pinned"]
    assert host.is_pinned()
    view = table.device_view(torch.device("cuda"))
    assert view.is_cuda and view.shape == host.shape
    idx = torch.from_numpy(np.random.default_rng(0).integers(0, 1 << 14, 5000)).cuda()
    out = torch.empty((5000, 64), dtype=torch.bfloat16, device="cuda")
    gather_rows(view, idx, out)
    assert torch.equal(_bits(out.cpu()), _bits(host[idx.cpu()]))
    # async copies from the table are real pinned copies
    dev = host[:1000].to("cuda", non_blocking=True)
    torch.cuda.synchronize()
    assert torch.equal(_bits(dev.cpu()), _bits(host[:1000]))


# --- every host path, bf16 bit for bit and fp8 against the reference ----------------------------
@pytest.mark.parametrize("gather", HOST_GATHERS)
@pytest.mark.parametrize("dedup", [False, True])
def test_bf16_rows_on_every_host_path_are_bit_identical_to_resident(gather, dedup):
    model = _model()
    kw = dict(device="cuda", dedup=dedup, dtype=torch.bfloat16)
    resident = OffloadedModel.from_model(model, "gpu", "resident", **kw)
    engine = OffloadedModel.from_model(model, "host", gather, **kw)
    ids = _row_ids(model)
    want, got = _rows_via(resident.prefetcher, ids), _rows_via(engine.prefetcher, ids)
    for lid in ids:
        assert torch.equal(_bits(got[lid]), _bits(want[lid])), (gather, dedup, lid)
    engine.close()


@pytest.mark.parametrize("gather", ["resident", *HOST_GATHERS])
@pytest.mark.parametrize("dedup", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_rows_on_every_path_equal_the_reference_dequantisation(gather, dedup, dtype):
    model = _model()
    placement = "gpu" if gather == "resident" else "host"
    engine = OffloadedModel.from_model(
        model, placement, gather, "cuda", dedup, dtype=dtype, row_format="fp8"
    )
    ids = _row_ids(model, seed=1)
    got = _rows_via(engine.prefetcher, ids)
    for lid in ids:
        ref = _fp8_reference(model, lid, ids[lid], dtype)
        assert got[lid].dtype == dtype
        assert torch.equal(_bits(got[lid].reshape(ref.shape)), _bits(ref)), (gather, dedup, lid)
    engine.close()


@pytest.mark.parametrize("gather", HOST_GATHERS)
def test_fp8_tokens_identical_across_paths_and_bytes_halve(gather):
    model = _model(head_dim=16)  # one scale byte per 16-value row, like the built-in model
    resident = OffloadedModel.from_model(model, "gpu", "resident", "cuda", row_format="fp8")
    ref = generate(model, PROMPTS, 120, rows=resident.prefetcher)  # long: buffers reused
    engine = OffloadedModel.from_model(model, "host", gather, "cuda", row_format="fp8")
    assert generate(model, PROMPTS, 120, rows=engine.prefetcher) == ref
    plain = OffloadedModel.from_model(model, "host", gather, "cuda", dtype=torch.bfloat16)
    generate(model, PROMPTS, 120, rows=plain.prefetcher)
    fp8, bf16 = engine.accountant.totals.layers, plain.accountant.totals.layers
    for lid in fp8:
        assert fp8[lid].rows == bf16[lid].rows
        assert fp8[lid].bytes * 32 == bf16[lid].bytes * 17  # 17 bytes per row instead of 32
    engine.close()
    plain.close()


# --- the UVA path uses the kernel, sorted on the host ---------------------------------------------
def test_uva_gather_runs_the_kernel_on_host_sorted_rows_with_a_bounded_grid():
    model = _model()
    engine = OffloadedModel.from_model(model, "host", "uva", "cuda", dtype=torch.bfloat16)
    pf = engine.prefetcher
    assert isinstance(pf, UvaGather) and pf.kernel and pf.places_rows
    ids = _row_ids(model, n=2000)
    plan = pf.plan(ids)
    for lp in plan.layers.values():
        assert np.all(np.diff(lp.fetch) >= 0) and lp.positions is not None
    pf.max_programs = 3  # a small grid still covers every row
    got = _rows_via(pf, ids)
    pf.kernel = False  # the fallback (no Triton) gives the same rows
    again = _rows_via(pf, ids)
    for lid in ids:
        want = model.engram_table(lid).detach().to(torch.bfloat16).cpu()[ids[lid].reshape(-1)]
        assert torch.equal(_bits(got[lid].reshape(want.shape)), _bits(want))
        assert torch.equal(_bits(again[lid]), _bits(got[lid]))


def test_staged_path_gathers_on_several_host_threads():
    store = TableStore.allocate({0: (1 << 16, 64)}, torch.bfloat16, "host", "cuda")
    store[0].tensor.copy_(torch.randn(1 << 16, 64).to(torch.bfloat16))
    pf = StagedGather(store, "cuda", host_threads=3)
    assert pf.threaded.num_threads == 3
    ids = {0: np.random.default_rng(2).integers(0, 1 << 16, (50000, 1))}
    for _ in range(3):  # both staging slots, then reuse
        got = _rows_via(pf, ids)[0]
        assert torch.equal(_bits(got.reshape(-1, 64)), _bits(store[0].tensor[ids[0].reshape(-1)]))
    pf.close()


# --- 'auto' measures the kernel ---------------------------------------------------------------
def test_auto_measures_the_kernel_at_several_grid_sizes_and_keeps_the_best():
    store = TableStore.allocate({0: (1 << 16, 64)}, torch.bfloat16, "host", "cuda")
    grid = grid_sizes(torch.device("cuda"))
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    assert len(grid) == 3 and max(grid) == sms // 2  # never more than half the SMs
    rows = measure_gathers(
        store, "cuda", (256, 1 << 16), repeats=2, programs=grid, resident=True, index_select=True
    )
    for r in rows:
        assert r["staged_s"] > 0 and r["uva_s"] > 0 and r["resident_s"] > 0
        assert r["index_select_s"] > 0 and r["uva_programs"] in grid
        assert set(r["uva_grid_s"]) == {str(p) for p in grid}
        assert r["uva_s"] == min(r["uva_grid_s"].values())
    assert best_programs(rows) in grid
    assert crossover_rows(rows) in (None, 256, 1 << 16)
    auto = AutoGather(store, "cuda")
    assert auto.measured is not None and auto.uva.max_programs in grid
    # the grid was chosen beside compute: every candidate's joined step was measured
    choice = auto.grid
    assert choice is not None and choice.programs == auto.uva.max_programs
    assert set(choice.step_s) == set(grid) and choice.compute_s > 0 and choice.why
    assert all(r["uva_programs"] == auto.uva.max_programs for r in auto.measured)
    ids = {0: np.random.default_rng(3).integers(0, 1 << 16, (700, 1))}
    plan = auto.plan(ids)
    assert (plan.layers[0].positions is not None) == (auto.pick(700) is auto.uva)
    got = _rows_via(auto, ids)[0]
    assert torch.equal(_bits(got.reshape(-1, 64)), _bits(store[0].tensor[ids[0].reshape(-1)]))
    auto.close()
