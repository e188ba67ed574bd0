import os
import threading
import time

import numpy as np
import pytest
import torch

from engine.generate import generate
from engine.kv_cache import KVCache
from engine.model_runner import ModelRunner
from offload.hostmem import HostBuffer
from offload.offloaded_model import OffloadedModel
from offload.paths import resolve_gather
from offload.plan import GatherError, LookupPlan
from offload.store import Placement, TableStore, cupy_ok

from .conftest import new_seq, tiny_model

PROMPTS = [[1, 2, 3, 4, 5], [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 11], [42], [7, 7, 7, 7]]


def _engines(model):
    for gather in ("worker", "resident"):
        for dedup in (False, True):
            yield gather, dedup, OffloadedModel.from_model(model, "cpu", gather, dedup=dedup)


def test_every_cpu_path_gives_identical_tokens_and_logits():
    model = tiny_model(2)
    ref = generate(model, PROMPTS, 40)
    rng = np.random.default_rng(0)
    ids = [rng.integers(0, 300, size=30).tolist() for _ in range(3)]
    for gather, dedup, engine in _engines(model):
        assert generate(model, PROMPTS, 40, rows=engine.prefetcher) == ref, (gather, dedup)
        # logits, ragged prefill chunks, compared bit for bit with the resident model
        outs = []
        for rows in (None, engine.prefetcher):
            cache = KVCache(model.config, num_blocks=32, block_size=4, max_seqs=3)
            runner = ModelRunner(model, cache, rows)
            seqs = [new_seq(cache) for _ in ids]
            a = runner.step(seqs, [ids[0][:7], ids[1][:1], ids[2][:13]], all_logits=True)
            b = runner.step(seqs, [ids[0][7:8], ids[1][1:9], ids[2][13:14]], all_logits=True)
            outs.append(torch.cat([a, b]))
        assert torch.equal(outs[0], outs[1]), (gather, dedup)
        engine.close()


def test_sequences_join_and_leave_between_steps_long_run():
    model = tiny_model(4)
    engine = OffloadedModel.from_model(model, "cpu", "worker", dedup=True)
    results = {}
    for rows in (None, engine.prefetcher):
        cache = KVCache(model.config, num_blocks=128, block_size=4, max_seqs=3)
        runner = ModelRunner(model, cache, rows)
        live: dict[int, tuple] = {}
        out = {i: [] for i in range(6)}
        pending = list(range(6))
        for step in range(120):
            while pending and len(live) < 3 and step % 7 == pending[0] % 7:
                i = pending.pop(0)
                live[i] = (new_seq(cache), PROMPTS[i % 4] + [i])
            if not live:
                if not pending:
                    break
                continue
            keys = sorted(live)
            logits = runner.step([live[k][0] for k in keys], [live[k][1] for k in keys])
            for row, k in enumerate(keys):
                tok = int(logits[row].argmax())
                out[k].append(tok)
                live[k] = (live[k][0], [tok])
                if len(out[k]) >= 10 + 5 * k:
                    cache.free(live.pop(k)[0])
        results[rows is None] = out
    assert results[True] == results[False]
    assert all(len(v) == 10 + 5 * k for k, v in results[True].items())
    assert engine.accountant.totals.steps > 50


def test_plan_indices_equal_reference_hashing_of_full_sequences():
    model = tiny_model()
    rng = np.random.default_rng(3)
    seqs = [rng.integers(0, 300, size=n).tolist() for n in (12, 5, 20)]
    engine = OffloadedModel.from_model(model, "cpu", "worker")
    hist = model.hasher.initial_history(3)
    got = {lid: [[] for _ in seqs] for lid in model.config.engram_layer_ids}
    pos = [0, 0, 0]
    for chunk in ([4, 1, 9], [1, 1, 1], [7, 3, 10]):
        new = [s[p : p + c] for s, p, c in zip(seqs, pos, chunk)]
        rows, hist = model.row_ids(hist, np.concatenate(new), np.array(chunk))
        plan = engine.prefetcher.plan(rows)
        off = 0
        for i, c in enumerate(chunk):
            for lid, lp in plan.layers.items():
                flat = lp.fetch.reshape(lp.num_tokens, lp.heads)
                got[lid][i].append(flat[off : off + c])
            off += c
            pos[i] += c
    for i, s in enumerate(seqs):
        full = model.hasher.hash(model.compress(np.array([s])))
        for lid in model.config.engram_layer_ids:
            expect = full[lid][0] + model.hasher.head_offsets(lid)
            np.testing.assert_array_equal(np.concatenate(got[lid][i]), expect)


def test_dedup_plan_reconstructs_rows():
    row_ids = {3: np.array([[5, 9], [5, 2], [9, 9]])}
    plan = LookupPlan.build(row_ids, {3: 10}, dedup=True)
    lp = plan.layers[3]
    assert lp.fetch.tolist() == [2, 5, 9] and lp.unique_rows == 3 and lp.rows == 6
    np.testing.assert_array_equal(lp.fetch[lp.inverse].reshape(3, 2), row_ids[3])


def test_unique_rows_counts_distinct_lookups_without_dedup():
    rng = np.random.default_rng(1)
    for n, high in ((0, 5), (1, 5), (7, 3), (4096, 3000), (4096, 1 << 40)):
        ids = rng.integers(0, high, n).reshape(-1, 1)
        lp = LookupPlan.build({0: ids}, {0: high}).layers[0]
        assert lp.inverse is None and lp.unique_rows == np.unique(ids).size


def test_bad_index_fails_on_the_host_naming_the_layer():
    with pytest.raises(GatherError, match="Engram layer 2: row 10 is outside"):
        LookupPlan.build({2: np.array([[1, 10]])}, {2: 10})


def test_worker_fault_surfaces_in_the_step_naming_the_layer():
    model = tiny_model()
    engine = OffloadedModel.from_model(model, "cpu", "worker")
    real = engine.prefetcher.gather_layer

    def failing(lp):
        if lp.layer_id == 2:
            raise RuntimeError("injected fault")
        return real(lp)

    engine.prefetcher.gather_layer = failing
    t = time.perf_counter()
    with pytest.raises(GatherError, match="Engram layer 2: gather failed: RuntimeError: injected"):
        generate(model, PROMPTS, 4, rows=engine.prefetcher)
    assert time.perf_counter() - t < 10
    engine.prefetcher.gather_layer = real  # the engine keeps serving after the fault
    assert generate(model, PROMPTS, 4, rows=engine.prefetcher) == generate(model, PROMPTS, 4)


def test_hung_gather_times_out_instead_of_hanging():
    model = tiny_model()
    engine = OffloadedModel.from_model(model, "cpu", "worker", timeout_s=0.5)
    release = threading.Event()
    real = engine.prefetcher.gather_layer

    def hang(lp):
        release.wait(5)
        return real(lp)

    engine.prefetcher.gather_layer = hang
    t = time.perf_counter()
    with pytest.raises(GatherError, match="Engram layer 0: rows not ready after"):
        generate(model, PROMPTS, 2, rows=engine.prefetcher)
    assert time.perf_counter() - t < 3
    release.set()
    engine.close()


def test_accounting_books_bytes_rows_and_stall_per_layer():
    model = tiny_model()
    engine = OffloadedModel.from_model(model, "cpu", "worker")
    generate(model, PROMPTS, 6, rows=engine.prefetcher)
    s = engine.accountant.summary()
    assert s["steps"] == 6
    width = model.config.engram_head_dim * 4  # float32 rows
    for lid in model.config.engram_layer_ids:
        layer = s["layers"][lid]
        tot = engine.accountant.totals.layers[lid]
        n_tokens = sum(len(p) for p in PROMPTS) + 5 * len(PROMPTS)
        assert tot.rows == n_tokens * model.config.engram_total_heads
        assert tot.bytes == tot.rows * width
        assert layer["tier"] == "cpu" and tot.unique_rows <= tot.rows
        assert tot.stall_s >= 0 and tot.slack_s >= 0 and tot.prefetch_s > 0
    assert 0.0 <= engine.accountant.stall_fraction < 1.0


def test_store_loads_checkpoint_tables_in_chunks(tmp_path):
    from models.checkpoint import ENGRAM_FILE, save_checkpoint, table_key

    model = tiny_model()
    save_checkpoint(model, tmp_path, table_dtype=torch.bfloat16)
    keys = {lid: table_key(lid) for lid in model.config.engram_layer_ids}
    store = TableStore.from_safetensors(
        tmp_path / ENGRAM_FILE, keys, "cpu", chunk_rows=37, progress=False
    )
    for lid in keys:
        assert store[lid].tensor.dtype == torch.bfloat16
        assert torch.equal(store[lid].tensor, model.engram_table(lid).detach().bfloat16())
    assert store.bytes_by_tier()["cpu"] == sum(t.nbytes for t in store.tables.values())
    engine = OffloadedModel.load(tmp_path, placement="cpu", gather="worker", progress=False)
    resident = OffloadedModel.load(tmp_path, placement="cpu", gather="resident", progress=False)
    assert engine.model.engram_table(0).is_meta  # the tables live only in the store
    a = generate(engine.model, PROMPTS, 8, rows=engine.prefetcher)
    assert a == generate(resident.model, PROMPTS, 8, rows=resident.prefetcher)
    buffers = [t.memory for t in engine.store.tables.values()]
    assert buffers and all(isinstance(b, HostBuffer) and b.tensor is not None for b in buffers)
    engine.close()  # the tables' host memory goes with the model, not at process exit
    assert all(b.tensor is None and b.registered_device is None for b in buffers)
    engine.close()
    resident.close()


@pytest.mark.gpu
@pytest.mark.skipif(not cupy_ok(), reason="needs CUDA and CuPy")
def test_gpu_closing_a_host_model_unregisters_its_pinned_tables(tmp_path):
    from models.checkpoint import save_checkpoint

    save_checkpoint(tiny_model(), tmp_path, table_dtype=torch.bfloat16)
    om = OffloadedModel.load(tmp_path, placement="host", gather="uva", device="cuda")
    buffers = [t.memory for t in om.store.tables.values()]
    assert buffers and all(getattr(b, "registered_device", 0) is not None for b in buffers)
    om.close()
    assert all(getattr(b, "registered_device", None) is None for b in buffers)


def test_placement_errors_are_clear():
    with pytest.raises(ValueError, match="unknown placement 'disk'"):
        Placement.parse("disk")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        TableStore.allocate({0: (4, 2)}, torch.float32, "host", "cpu")
    model = tiny_model()
    with pytest.raises(ValueError, match="does not work with placement 'cpu'"):
        OffloadedModel.from_model(model, "cpu", "uva")


def test_auto_on_plain_host_memory_uses_the_worker_only_with_a_spare_core():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(os.cpu_count() or 1)
        assert resolve_gather(Placement.CPU, "auto") == "resident"
        if (os.cpu_count() or 1) > 1:
            torch.set_num_threads(1)
            assert resolve_gather(Placement.CPU, "auto") == "worker"
    finally:
        torch.set_num_threads(before)
    assert resolve_gather(Placement.CPU, "worker") == "worker"
    assert resolve_gather(Placement.HOST, "auto") == "auto"


def test_requested_rows_are_in_the_order_the_model_reads_them():
    ids = {0: np.array([[9, 3], [7, 3], [1, 8]])}
    flat = ids[0].reshape(-1)
    for plan in (
        LookupPlan.build(ids, {0: 10}),
        LookupPlan.build(ids, {0: 10}, dedup=True),
        LookupPlan.build(ids, {0: 10}).sorted(),  # what the UVA path fetches
    ):
        np.testing.assert_array_equal(plan.layers[0].requested(), flat)
    assert not np.array_equal(LookupPlan.build(ids, {0: 10}).sorted().layers[0].fetch, flat)
