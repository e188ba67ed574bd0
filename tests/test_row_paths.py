"""Row formats end to end on the CPU paths: FP8 tables from engram-quantize or quantised at load,
every path returning the reference dequantisation, sorted plans, huge-page table memory, and
the UVA layer gather (Triton interpreter here; the CUDA runs are in test_gpu_rows.py)."""

import numpy as np
import pytest
import torch

from engine.generate import generate
from models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from models.llama import EngramForCausalLM
from offload.cuda_gather import GrownBuffers, uva_gather
from offload.offloaded_model import OffloadedModel
from offload.plan import LookupPlan
from offload.quantize import quantize_checkpoint
from offload.rowformat import RowFormat, dequantize_fp8, quantize_fp8
from offload.store import TableStore

from .conftest import tiny_model

PROMPTS = [[1, 2, 3, 4, 5], [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 11], [42], [7, 7, 7, 7]]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def _reference_model(model, stored=torch.float32):
    """The model with each table (as ``stored``) replaced by its fp8 round trip: what every
    path must serve."""
    ref = EngramForCausalLM(model.config).eval()
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        for lid in ref.config.engram_layer_ids:
            t = ref.engram_table(lid)
            t.copy_(dequantize_fp8(quantize_fp8(t.to(stored).float()), torch.float32))
    return ref


def _rows_via(prefetcher, row_ids: dict) -> dict[int, torch.Tensor]:
    plan = prefetcher.plan(row_ids)
    pending = prefetcher.start(plan)
    try:
        return {lid: pending.rows(lid).cpu() for lid in row_ids}
    finally:
        pending.close()


def _row_ids(model, n=40, seed=0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for lid in model.config.engram_layer_ids:
        rows = model.engram_table(lid).shape[0]
        ids = rng.integers(0, rows, (n, model.config.engram_total_heads))
        ids[: n // 2] = ids[n // 2 :]  # duplicates, for dedup
        out[lid] = ids
    return out


# --- narrow rows ---------------------------------------------------------------------------------
@pytest.mark.parametrize("width", [1, 3, 16, 31])
def test_rows_under_32_values_have_one_scale_each(width):
    fmt = RowFormat("fp8", width)
    assert (fmt.groups, fmt.row_bytes) == (1, width + 1)
    x = torch.randn(50, width) * torch.exp2(torch.randint(-10, 10, (50, 1)).float())
    packed = quantize_fp8(x)
    assert packed.shape == (50, width + 1)
    deq = dequantize_fp8(packed, torch.float32)
    amax = x.abs().amax(1, keepdim=True)
    assert bool(((deq - x).abs() <= amax / 16).all())
    values, scales = quantize_fp8(x, packed=False)
    assert torch.equal(dequantize_fp8(values, torch.float32, scales=scales), deq)


# --- sorted plans ----------------------------------------------------------------------------
def test_sorted_plan_fetches_in_order_and_keeps_positions():
    plan = LookupPlan.build({3: np.array([[9, 2], [7, 2], [0, 9]])}, {3: 10})
    s = plan.sorted()
    lp = s.layers[3]
    assert lp.fetch.tolist() == [0, 2, 2, 7, 9, 9]
    placed = np.empty(6, dtype=np.int64)
    placed[lp.positions] = lp.fetch
    assert placed.tolist() == [9, 2, 7, 2, 0, 9]
    assert sorted(s.host_arrays()) == ["fetch3", "positions3"]
    dedup = LookupPlan.build({3: np.array([[9, 2]])}, {3: 10}, dedup=True)
    assert dedup.sorted().layers[3] is dedup.layers[3]  # np.unique is sorted already


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("kernel", [True, False])
@pytest.mark.parametrize("dedup", [False, True])
def test_uva_layer_gather_places_rows_in_request_order(fp8, kernel, dedup):
    if kernel:
        pytest.importorskip("triton")
    store = TableStore.allocate({0: (500, 32)}, torch.bfloat16, "cpu", fp8=fp8)
    table = store[0]
    src = torch.randn(500, 32)
    table.tensor.copy_(quantize_fp8(src) if fp8 else src.to(torch.bfloat16))
    ids = np.random.default_rng(1).integers(0, 500, (37, 3))
    plan = LookupPlan.build({0: ids}, {0: 500}, dedup).sorted()
    lp = plan.layers[0]
    out = torch.empty((lp.fetch.size, 32), dtype=table.row_dtype)
    pos = None if lp.positions is None else torch.from_numpy(lp.positions)
    uva_gather(table.tensor, table, torch.from_numpy(lp.fetch), pos, out, 3, kernel)
    if dedup:
        out = out[torch.from_numpy(lp.inverse)]
    ref = table.decode(table.tensor[torch.from_numpy(ids.reshape(-1))])
    assert torch.equal(_bits(out), _bits(ref))


def test_a_sorted_plan_on_a_path_that_does_not_place_rows_is_unsorted():
    model = tiny_model(2)
    engine = OffloadedModel.from_model(model, "cpu", "worker")
    ids = _row_ids(model)
    plan = engine.prefetcher.plan(ids).sorted()
    pending = engine.prefetcher.start(plan)
    for lid, want in ids.items():
        got = pending.rows(lid)
        assert torch.equal(got, model.engram_table(lid).detach()[torch.from_numpy(want)])
    pending.close()
    engine.close()


def test_grown_buffers_grow_geometrically_and_reuse():
    bufs = GrownBuffers()
    a = bufs.get("k", 10, (4,), torch.float32)
    assert a.shape == (10, 4)
    b = bufs.get("k", 900, (4,), torch.float32)
    assert b.data_ptr() == a.data_ptr()  # 1024 rows at least: no new allocation
    c = bufs.get("k", 2000, (4,), torch.float32)
    assert c.shape == (2000, 4) and bufs._bufs["k"].shape[0] == 2048
    assert bufs.get("k", 3, (8,), torch.float32).shape == (3, 8)  # another row shape: new
    bufs.clear()
    assert not bufs._bufs


# --- every CPU path serves the reference dequantisation ------------------------------------------
@pytest.mark.parametrize("gather", ["resident", "worker", "auto"])
@pytest.mark.parametrize("dedup", [False, True])
def test_fp8_rows_on_every_cpu_path_equal_the_reference(gather, dedup):
    model = tiny_model(2, engram_head_dim=32)
    engine = OffloadedModel.from_model(model, "cpu", gather, dedup=dedup, row_format="fp8")
    ids = _row_ids(model)
    got = _rows_via(engine.prefetcher, ids)
    for lid, want in ids.items():
        q = quantize_fp8(model.engram_table(lid).detach().float())
        ref = dequantize_fp8(q[torch.from_numpy(want.reshape(-1))], torch.float32)
        assert got[lid].dtype == torch.float32
        assert torch.equal(got[lid].reshape(ref.shape), ref), (gather, dedup, lid)
    engine.close()


def test_fp8_tokens_match_the_dequantised_model_and_bytes_halve():
    model = tiny_model(2)  # 8 values per row: one scale byte per row
    ref = generate(_reference_model(model), PROMPTS, 12)
    plain = OffloadedModel.from_model(model, "cpu", "worker", dtype=torch.bfloat16)
    generate(model, PROMPTS, 12, rows=plain.prefetcher)
    for gather in ("resident", "worker"):
        for dedup in (False, True):
            engine = OffloadedModel.from_model(model, "cpu", gather, dedup=dedup, row_format="fp8")
            assert generate(model, PROMPTS, 12, rows=engine.prefetcher) == ref, (gather, dedup)
            if not dedup:
                fp8, bf16 = engine.accountant.totals.layers, plain.accountant.totals.layers
                for lid in fp8:
                    assert fp8[lid].rows == bf16[lid].rows
                    assert fp8[lid].bytes * 16 == bf16[lid].bytes * 9  # 9 bytes vs 16 per row
            engine.close()
    plain.close()


# --- checkpoints ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8")
    model = tiny_model(5, engram_head_dim=32)
    save_checkpoint(model, root / "bf16", table_dtype=torch.bfloat16)
    quantize_checkpoint(root / "bf16", root / "packed")
    quantize_checkpoint(root / "bf16", root / "split", packed=False)
    return model, root


def _store(directory, model, **kw):
    return TableStore.from_checkpoint(
        directory, model.config.engram_layer_ids, "cpu", progress=False, **kw
    )


def test_quantise_at_load_equals_engram_quantize_output(checkpoints):
    model, root = checkpoints
    at_load = _store(root / "bf16", model, row_format="fp8")
    packed = _store(root / "packed", model)
    split = _store(root / "split", model, row_format="fp8")
    for lid in model.config.engram_layer_ids:
        a, b, c = at_load[lid], packed[lid], split[lid]
        assert a.fp8 and b.fp8 and c.fp8 and a.tensor.dtype == torch.uint8
        assert torch.equal(a.tensor, b.tensor) and torch.equal(a.tensor, c.tensor)
        assert a.row_bytes == 33 and a.width == 32 and a.row_dtype == torch.bfloat16
    assert at_load.describe()["row_formats"] == ["fp8"]
    assert _store(root / "bf16", model).describe()["row_formats"] == ["bf16"]


def test_fp8_checkpoint_dequantised_at_load_and_row_dtype(checkpoints):
    model, root = checkpoints
    plain = _store(root / "packed", model, row_format="f32")
    fp8 = _store(root / "packed", model, row_dtype=torch.float16)
    for lid in model.config.engram_layer_ids:
        assert plain[lid].tensor.dtype == torch.float32 and not plain[lid].fp8
        assert torch.equal(plain[lid].tensor, dequantize_fp8(fp8[lid].tensor, torch.float32))
        assert fp8[lid].decode(fp8[lid].tensor[:3]).dtype == torch.float16
    with pytest.raises(ValueError, match="unknown row format 'int4'"):
        _store(root / "packed", model, row_format="int4")


def test_fp8_checkpoint_serves_the_same_tokens_on_every_cpu_path(checkpoints):
    model, root = checkpoints
    ref = generate(_reference_model(model, torch.bfloat16), PROMPTS, 10)
    for layout in ("packed", "split"):
        loaded, _ = load_checkpoint(root / layout, load_tables=False)  # .scales tolerated
        assert loaded.engram_table(model.config.engram_layer_ids[0]).is_meta
        for gather in ("resident", "worker"):
            om = OffloadedModel.load(root / layout, "cpu", gather, progress=False)
            assert om.store.describe()["row_formats"] == ["fp8"]
            assert generate(om.model, PROMPTS, 10, rows=om.prefetcher) == ref, (layout, gather)
            om.close()
    om = OffloadedModel.load(root / "bf16", "cpu", "worker", progress=False, row_format="fp8")
    assert generate(om.model, PROMPTS, 10, rows=om.prefetcher) == ref
    om.close()
    with pytest.raises(CheckpointError, match="FP8 rows"):
        load_checkpoint(root / "packed")


def test_eval_loads_the_rows_a_gather_returns(checkpoints):
    from training.evaluate import load_with_row_format

    model, root = checkpoints
    fp8, _ = load_with_row_format(root / "bf16", "fp8")
    same, _ = load_with_row_format(root / "packed", "auto")
    bf16, _ = load_with_row_format(root / "bf16", "auto")
    for lid in model.config.engram_layer_ids:
        table = model.engram_table(lid).detach().to(torch.bfloat16).float()
        assert torch.equal(
            fp8.engram_table(lid), dequantize_fp8(quantize_fp8(table), torch.float32)
        )
        assert torch.equal(same.engram_table(lid), fp8.engram_table(lid))
        assert torch.equal(bf16.engram_table(lid), table)


# --- table memory --------------------------------------------------------------------------------
@pytest.mark.parametrize("huge", [True, False])
def test_cpu_tables_in_huge_page_memory_are_described(huge):
    store = TableStore.allocate(
        {0: (3000, 64), 1: (10, 64)}, torch.bfloat16, "cpu", huge_pages=huge
    )
    store[0].tensor.copy_(torch.ones(3000, 64))
    d = store.describe()
    assert d["placement"] == "cpu" and d["huge_pages_requested"] is huge
    assert d["bytes"] == (3000 + 10) * 128 and d["row_formats"] == ["bf16"]
    assert d["registered"] is False and 0 <= d["huge_bytes"] <= 8 << 20
    if huge:
        assert set(d["memory"]) <= {"thp", "hugetlb", "none"}
    else:
        assert d["memory"] == ["plain"] and store[0].memory is None
