"""The file tier: rows read from the safetensors file into a small DRAM cache, translated to
cache slots, and gathered by the ordinary paths; bit-identical to the host-resident table."""

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from models.safetensors_header import TableFileError
from offload.file_cache import CapacityError, HashDirectory, SlotCache
from offload.file_gather import FileTierGather
from offload.file_tier import open_file_tier
from offload.paths import make_prefetcher
from offload.plan import GatherError
from offload.quantize import quantize_table_file
from offload.row_reader import runs_of
from offload.rowformat import quantize_fp8
from offload.store import Placement, TableStore

V41 = "model.layers.3.engram.embed"
CPU = torch.device("cpu")


def write_tables(tmp_path, fmt: str, rows: int = 3000, width: int = 64):
    """A tables file with layers 1 and 3 in ``fmt`` (bf16, fp8 packed, v41 split fp8)."""
    torch.manual_seed(0)
    a = (torch.randn(rows, width) * 3).to(torch.bfloat16)
    b = (torch.randn(rows // 2, width) * 3).to(torch.bfloat16)
    if fmt == "v41":
        width = 256
        a = torch.randn(rows, width) * torch.logspace(-3, 2, rows)[:, None]
        values, scales = quantize_fp8(a, packed=False)
        bv, bs = quantize_fp8(torch.randn(rows // 2, width), packed=False)
        path = tmp_path / "v41.safetensors"
        save_file(
            {
                f"{V41}.weight": values,
                f"{V41}.scale": scales.view(torch.float8_e8m0fnu),
                "b.weight": bv,
                "b.scale": bs.view(torch.float8_e8m0fnu),
            },
            str(path),
        )
        return path, {1: f"{V41}.weight", 3: "b.weight"}
    path = tmp_path / "t.safetensors"
    save_file({"a": a, "b": b, "other": torch.arange(5)}, str(path))
    if fmt == "fp8":
        q = tmp_path / "q.safetensors"
        quantize_table_file(path, q, ["a", "b"], packed=True)
        path = q
    return path, {1: "a", 3: "b"}


def steps(rows: dict[int, int], n: int, tokens: int = 12, heads: int = 4, seed: int = 0):
    """Zipf-ish row ids per layer (a few hot rows, a long tail), n steps."""
    rng = np.random.default_rng(seed)
    for _ in range(n):
        yield {
            lid: np.minimum(rng.zipf(1.3, (tokens, heads)) * 7 - 7, r - 1).astype(np.int64)
            for lid, r in rows.items()
        }


def run_steps(pf, ids_list):
    out = []
    for ids in ids_list:
        plan = pf.plan(ids)
        pending = pf.start(plan)
        out.append({lid: pending.rows(lid).clone() for lid in ids})
        pending.close()
    pf.flush()
    return out


@pytest.mark.parametrize("fmt", ["bf16", "fp8", "v41"])
@pytest.mark.parametrize(
    "gather,dedup,sort",
    [
        ("worker", False, False),
        ("worker", True, False),
        ("resident", False, True),
        ("resident", True, False),
    ],
)
def test_rows_are_bit_identical_to_the_host_table(tmp_path, fmt, gather, dedup, sort):
    path, keys = write_tables(tmp_path, fmt)
    host = TableStore.from_safetensors(path, keys, "cpu", progress=False)
    rows = {lid: t.rows for lid, t in host.tables.items()}
    budget = sum(t.nbytes for t in host.tables.values()) // 20  # C: 5% of the rows
    cache, tier = open_file_tier(path, keys, budget, Placement.CPU, CPU, threads=3)
    assert all(cache[lid].rows < rows[lid] // 10 for lid in keys)
    pf = FileTierGather(make_prefetcher(cache, gather, CPU, dedup), tier)
    ref = make_prefetcher(host, gather, CPU, dedup)
    if sort:  # a sorted plan (what the UVA kernel gets), unsorted by the pending rows
        pf.inner.plan = lambda ids, p=pf.inner.plan: p(ids).sorted()
    ids_list = list(steps(rows, 30))
    got, want = run_steps(pf, ids_list), run_steps(ref, ids_list)
    for g, w in zip(got, want):
        for lid in keys:
            assert g[lid].dtype == w[lid].dtype
            assert torch.equal(g[lid].view(torch.uint8), w[lid].view(torch.uint8))
    s = pf.accountant.summary()["layers"]
    assert all(s[lid]["tier"] == "file" for lid in keys)
    assert all(s[lid]["file_hits"] > 0 and s[lid]["file_misses"] > 0 for lid in keys)
    assert not any(fl.cache.pins.any() for fl in tier.layers.values())  # every pin released
    pf.close()
    ref.close()


def test_directory_lookups_equal_a_reference_dict():
    rng = np.random.default_rng(1)
    for kind in ("dense", "hash"):
        c = SlotCache(rows=10_000, slots=300, directory=kind)
        where: dict[int, int] = {}
        for _ in range(200):
            want = np.unique(rng.integers(0, 10_000, rng.integers(1, 120)))
            slots, miss, victims = c.admit(want)
            assert set(miss.tolist()) == {r for r in want.tolist() if r not in where}
            for s in victims.tolist():  # evicted rows leave the reference
                where = {r: v for r, v in where.items() if v != s}
            where.update(zip(miss.tolist(), victims.tolist()))
            assert [where[r] for r in want.tolist()] == slots.tolist()
            assert (c.row_of_slot[slots] == want).all()
            c.release(slots)
            probe = rng.integers(0, 10_000, 500)
            got = c.directory.lookup(probe)
            assert got.tolist() == [where.get(r, -1) for r in probe.tolist()]


def test_directory_is_the_smaller_structure():
    assert SlotCache(rows=1000, slots=500).directory_kind == "dense"
    big = SlotCache(rows=384_000_000 // 1000, slots=1000)  # V4.1's rows / 1000, 0.26% cached
    assert big.directory_kind == "hash"
    assert HashDirectory.nbytes_for(384_000_000, 6_000_000) < 384_000_000 * 4 // 4


def test_pinned_rows_are_never_evicted_and_too_many_pins_is_a_typed_error():
    c = SlotCache(rows=1000, slots=10)
    first, _, _ = c.admit(np.arange(6))
    second, miss, victims = c.admit(np.arange(100, 104))  # overlapped: 6 still pinned
    assert not set(victims.tolist()) & set(first.tolist())
    with pytest.raises(CapacityError, match="pinned"):
        c.admit(np.arange(200, 202))  # 10 slots, all pinned
    assert c.pins.sum() == 10  # the failed admit took no pins
    c.release(first)
    third, _, victims = c.admit(np.arange(200, 206))
    assert not set(victims.tolist()) & set(second.tolist())


def test_overlapped_steps_never_overwrite_rows_a_step_still_reads(tmp_path):
    path, keys = write_tables(tmp_path, "bf16")
    host = TableStore.from_safetensors(path, keys, "cpu", progress=False)
    rows = {lid: t.rows for lid, t in host.tables.items()}
    row_bytes = host[1].row_bytes
    cache, tier = open_file_tier(path, keys, 220 * row_bytes, Placement.CPU, CPU, threads=2)
    pf = FileTierGather(make_prefetcher(cache, "worker", CPU), tier)
    ids_list = list(steps(rows, 40, tokens=8, seed=3))
    prev = None  # step k+1 is planned (its misses read, victims evicted) before step k reads
    for ids in ids_list + [None]:
        nxt = None
        if ids is not None:
            plan = pf.plan(ids)
            nxt = (ids, pf.start(plan))
        if prev is not None:
            pids, pending = prev
            for lid in keys:
                want = host[lid].tensor[torch.from_numpy(pids[lid].reshape(-1))]
                got = pending.rows(lid).reshape(want.shape)
                assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
            pending.close()
        prev = nxt
    pf.close()


class SlowReads:
    """A tier's readers held back until released: reads issued at plan time are still in
    flight when the step starts (what a slow disk does)."""

    def __init__(self, tier):
        self.gate = threading.Event()
        self.started = 0
        for fl in tier.layers.values():
            read = fl.reader.read

            def slow(rows, slots, cache, announced=False, read=read):
                self.started += 1
                assert self.gate.wait(10)
                return read(rows, slots, cache, announced)

            fl.reader.read = slow


def test_misses_are_read_while_the_step_goes_on_and_a_layer_waits_for_its_own(tmp_path):
    """The plan returns with the reads in flight; a gather waits for its layer's reads (and
    for earlier steps' reads of rows it found cached) before reading the DRAM cache."""
    path, keys = write_tables(tmp_path, "fp8")
    host = TableStore.from_safetensors(path, keys, "cpu", progress=False)
    cache, tier = open_file_tier(path, keys, 400 * host[1].row_bytes, Placement.CPU, CPU)
    pf = FileTierGather(make_prefetcher(cache, "resident", CPU), tier)
    slow = SlowReads(tier)
    ids = {1: np.arange(40).reshape(10, 4), 3: np.arange(100, 140).reshape(10, 4)}
    timer = threading.Timer(0.3, slow.gate.set)
    timer.start()
    try:
        first = pf.start(pf.plan(ids))  # reads issued, held back
        again = pf.start(pf.plan(ids))  # every row "cached": its reads are the first step's
        assert not slow.gate.is_set() and not any(f.done() for f in tier.layers[1].recent)
        hot_fill = ThreadPoolExecutor(1).submit(tier.read_rows, 1, ids[1])  # a hot-cache fill
    except BaseException:
        slow.gate.set()
        raise
    for pending in (again, first):
        for lid in keys:
            want = host[lid].decode(host[lid].tensor[torch.from_numpy(ids[lid].reshape(-1))])
            got = pending.rows(lid).reshape(want.shape)
            assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
    first.close()
    again.close()
    want1 = host[1].tensor[torch.from_numpy(ids[1].reshape(-1))].view(torch.uint8).numpy()
    assert np.array_equal(hot_fill.result(10), want1)  # it waited for the rows to land
    layer = pf.accountant.totals.layers[1]
    assert layer.file_wait_s > 0.05 and layer.file_misses == 40  # waited, read once
    pf.flush()
    assert not any(fl.cache.pins.any() for fl in tier.layers.values())
    pf.close()


@pytest.mark.parametrize("in_plan", [False, True])
def test_the_first_read_of_a_step_announces_every_layers_misses(tmp_path, in_plan):
    """By default the plan announces every layer's misses to the kernel; without
    ``announce_in_plan`` it makes no syscall and the step's first gather announces every
    layer's, once, before it reads its own. Rows are the file's either way."""
    path, keys = write_tables(tmp_path, "bf16")
    host = TableStore.from_safetensors(path, keys, "cpu", progress=False)
    cache, tier = open_file_tier(path, keys, 400 * host[1].row_bytes, Placement.CPU, CPU)
    tier.announce_in_plan = in_plan
    announced = []
    for lid, fl in tier.layers.items():
        real = fl.reader.announce
        fl.reader.announce = lambda rows, lid=lid, real=real: (announced.append(lid), real(rows))
    pf = FileTierGather(make_prefetcher(cache, "resident", CPU), tier)
    ids = {1: np.arange(0, 400, 10).reshape(10, 4), 3: np.arange(100, 140).reshape(10, 4)}
    plan = pf.plan(ids)
    assert announced == ([1, 3] if in_plan else [])
    pending = pf.start(plan)
    got = pending.rows(3)  # the step's first read: both layers announced before it
    assert announced == [1, 3]
    for lid in (1, 3):
        want = host[lid].tensor[torch.from_numpy(ids[lid].reshape(-1))]
        rows = got if lid == 3 else pending.rows(1)
        assert torch.equal(rows.reshape(want.shape).view(torch.uint8), want.view(torch.uint8))
    pending.close()
    assert announced == [1, 3]  # once a step
    assert pf.accountant.totals.layers[1].file_misses == 40
    pf.close()


def test_a_failed_read_fails_the_layer_that_needs_it_and_empties_its_slots(tmp_path):
    path, keys = write_tables(tmp_path, "bf16")
    cache, tier = open_file_tier(path, keys, 400 * 128, Placement.CPU, CPU)
    pf = FileTierGather(make_prefetcher(cache, "worker", CPU), tier)
    os_fd = tier.layers[3].reader.fd
    tier.layers[3].reader.fd = os.open(os.devnull, os.O_RDONLY)  # reads return nothing
    pending = pf.start(pf.plan({1: np.arange(8).reshape(2, 4), 3: np.arange(8).reshape(2, 4)}))
    assert pending.rows(1).shape[0] == 2
    with pytest.raises(GatherError, match="Engram layer 3: gather failed: TableFileError"):
        pending.rows(3)
    pending.close()
    pf.flush()
    fl = tier.layers[3]
    assert not fl.cache.pins.any() and (fl.cache.directory.lookup(np.arange(8)) < 0).all()
    os.close(tier.layers[3].reader.fd)
    tier.layers[3].reader.fd = os_fd
    pending = pf.start(pf.plan({1: np.arange(8).reshape(2, 4), 3: np.arange(8).reshape(2, 4)}))
    assert pending.rows(3).shape[0] == 2  # read again, the tier serves on
    pending.close()
    pf.close()


def test_a_step_larger_than_the_cache_names_the_flag(tmp_path):
    path, keys = write_tables(tmp_path, "bf16")
    cache, tier = open_file_tier(path, keys, 30 * 128, Placement.CPU, CPU)
    pf = FileTierGather(make_prefetcher(cache, "worker", CPU), tier)
    with pytest.raises(CapacityError, match="--host-memory-bytes"):
        pf.plan({1: np.arange(400).reshape(100, 4), 3: np.zeros((100, 4), dtype=np.int64)})
    assert not any(fl.cache.pins.any() for fl in tier.layers.values())
    pf.close()


def test_truncated_file_is_refused_before_serving(tmp_path):
    path, keys = write_tables(tmp_path, "bf16")
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(TableFileError) as e:
        open_file_tier(path, keys, 1 << 16, Placement.CPU, CPU)
    assert "\n" not in str(e.value) and "truncated" in str(e.value)


def test_runs_coalesce_adjacent_rows():
    assert runs_of(np.array([1, 2, 3, 7, 9, 10])) == [(0, 3), (3, 4), (4, 6)]
    assert runs_of(np.arange(2500)) == [(0, 1024), (1024, 2048), (2048, 2500)]


def held_out_prompts(n: int = 4, chars: int = 160) -> list[str]:
    from training.corpus import read_text, split_files

    _, val = split_files()
    return [read_text(p)[:chars] for p in val[:n]]


def test_tables_larger_than_host_memory_served_end_to_end_with_identical_tokens(tiny_ckpt):
    """The real server: host-resident vs the file tier with --host-memory-bytes a quarter of
    the tables (chosen automatically); greedy tokens identical, the tier visible in
    /v1/offload and /metrics."""
    import httpx
    import openai

    from models.checkpoint import ENGRAM_FILE, table_key
    from models.config import ModelConfig
    from offload.file_tier import table_bytes

    from .live import serve

    lids = ModelConfig.load(tiny_ckpt).engram_layer_ids
    total = sum(table_bytes(tiny_ckpt / ENGRAM_FILE, {i: table_key(i) for i in lids}).values())
    prompts = held_out_prompts()

    def tokens(**kw):
        with serve(tiny_ckpt, max_num_seqs=4, max_num_batched_tokens=8, **kw) as s:
            c = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)
            out = [
                c.completions.create(model=s.cfg.model_name, prompt=p, max_tokens=24, temperature=0)
                .choices[0]
                .text
                for p in prompts
            ]
            return out, httpx.get(s.url + "/v1/offload").json(), httpx.get(s.url + "/metrics").text

    want, host_info, _ = tokens()
    got, info, metrics = tokens(host_memory_bytes=total // 4)
    assert got == want and any(want)
    assert host_info["file_tier"] is None
    assert info["table_bytes"]["file"] == total and 0 < info["table_bytes"]["cpu"] <= total // 4
    for lid in lids:
        layer = info["accounting"]["layers"][str(lid)]
        assert layer["tier"] == "file" and layer["file_misses"] > 0
        assert info["file_tier"][str(lid)]["cache_slots"] < info["file_tier"][str(lid)]["rows"]
        assert f'engram_offload_dram_cache_misses_total{{layer="{lid}",model_name=' in metrics or (
            f'layer="{lid}"' in metrics and "engram_offload_dram_cache_misses_total" in metrics
        )
    assert 'tier="file"' in metrics and "engram_offload_file_read_bytes_total" in metrics
    waited = [
        line for line in metrics.splitlines()
        if line.startswith("engram_offload_file_wait_duration_seconds_count")
    ]  # fmt: skip
    assert len(waited) == len(lids) and all(float(w.split()[-1]) > 0 for w in waited)


def test_file_layers_put_only_those_tables_in_the_file_and_bad_values_are_refused(tiny_ckpt):
    """--file-layers: mixed placement from the command line (one layer in the file, the rest
    whole in host memory), same greedy tokens; ids that are not Engram layers, or no budget,
    refused in one line before loading."""
    import httpx
    import openai

    from models.config import ModelConfig
    from server.cli import parse_args, validate

    from .live import serve

    lids = ModelConfig.load(tiny_ckpt).engram_layer_ids
    m = ["--model", str(tiny_ckpt), "--host-memory-bytes", "100000"]
    for bad, says in (("1,x", "give Engram layer ids"), ("99", "not Engram layers"), ("", "ids")):
        err = validate(parse_args([*m, "--file-layers", bad]))
        assert err is not None and says in err and "\n" not in err and "--file-layers" in err
    err = validate(parse_args(["--model", str(tiny_ckpt), "--file-layers", str(lids[0])]))
    assert err == "--file-layers needs --host-memory-bytes (the DRAM cache)"

    def run(**kw):
        with serve(tiny_ckpt, max_num_seqs=4, max_num_batched_tokens=8, **kw) as s:
            c = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)
            p = held_out_prompts(2)
            r = c.completions.create(model=s.cfg.model_name, prompt=p, max_tokens=12, temperature=0)
            return [ch.text for ch in r.choices], httpx.get(s.url + "/v1/offload").json()

    want, _ = run()
    got, info = run(file_layers=str(lids[-1]), host_memory_bytes=100_000)
    assert got == want
    assert list(info["file_tier"]) == [str(lids[-1])]
    tiers = {lid: info["accounting"]["layers"][str(lid)]["tier"] for lid in lids}
    assert tiers[lids[-1]] == "file" and all(tiers[lid] != "file" for lid in lids[:-1])


def test_a_dram_cache_two_steps_could_overflow_is_refused_at_start_up(tiny_ckpt):
    from .live import serve

    with pytest.raises(RuntimeError, match="--host-memory-bytes"):
        with serve(tiny_ckpt, max_num_batched_tokens=64, placement="file", host_memory_bytes=4096):
            pass


def test_placement_file_needs_a_budget():
    from engine.config import EngineConfig

    with pytest.raises(ValueError, match="--host-memory-bytes"):
        EngineConfig(placement="file").check()
    EngineConfig(placement="file", host_memory_bytes=1 << 20).check()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fmt", ["bf16", "fp8", "v41"])
@pytest.mark.parametrize("gather", ["staged", "uva"])
def test_gpu_pinned_dram_cache_rows_are_bit_identical(tmp_path, fmt, gather):
    """The DRAM cache in pinned, device-mapped host memory, read by the staged copy and the
    UVA kernel (sorted plans), with overlapped steps: rows equal the host table's, decoded."""
    from offload.store import cupy_ok

    if not cupy_ok():
        pytest.skip("the pinned host tier needs CuPy")
    dev = torch.device("cuda")
    path, keys = write_tables(tmp_path, fmt)
    host = TableStore.from_safetensors(path, keys, "cpu", progress=False)
    rows = {lid: t.rows for lid, t in host.tables.items()}
    budget = sum(t.nbytes for t in host.tables.values()) // 20
    cache, tier = open_file_tier(path, keys, budget, Placement.HOST, dev, threads=4)
    assert all(cache[lid].memory.registered_device is not None for lid in keys)
    pf = FileTierGather(make_prefetcher(cache, gather, dev), tier)
    for ids in steps(rows, 30, seed=5):
        pending = pf.start(pf.plan(ids))
        for lid in keys:
            t = host[lid]
            want = t.decode(t.tensor[torch.from_numpy(ids[lid].reshape(-1))])
            got = pending.rows(lid).reshape(want.shape[0], -1).cpu()
            assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
        pending.close()
    pf.flush()
    assert not any(fl.cache.pins.any() for fl in tier.layers.values())
    pf.close()
    cache.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fmt", ["bf16", "v41"])
@pytest.mark.parametrize("gather", ["staged", "uva"])
@pytest.mark.parametrize("policy", ["static", "adaptive"])
def test_gpu_hot_rows_over_the_pinned_dram_cache_are_bit_identical(tmp_path, fmt, gather, policy):
    """HBM hot cache -> pinned DRAM cache -> file, read by the staged copy and the UVA kernel
    with the reads issued asynchronously: rows equal the host table's, decoded."""
    from offload.hot_cache import HotCache
    from offload.hot_rows import HotRows, row_sources
    from offload.store import cupy_ok

    if not cupy_ok():
        pytest.skip("the pinned host tier needs CuPy")
    dev = torch.device("cuda")
    path, keys = write_tables(tmp_path, fmt)
    host = TableStore.from_safetensors(path, keys, "cpu", progress=False)
    rows = {lid: t.rows for lid, t in host.tables.items()}
    budget = sum(t.nbytes for t in host.tables.values()) // 20
    cache, tier = open_file_tier(path, keys, budget, Placement.HOST, dev, threads=4)
    pf = FileTierGather(make_prefetcher(cache, gather, dev), tier)
    sources, adaptive = row_sources(pf), policy == "adaptive"
    caches = {
        lid: HotCache(
            cache[lid], 32, dev, None if adaptive else np.arange(32) * 7, adaptive, 2, 8,
            source=sources[lid],
        )
        for lid in keys
    }  # fmt: skip
    hot = HotRows(pf, caches)
    for ids in steps(rows, 30, seed=7):
        pending = hot.start(hot.plan(ids))
        for lid in keys:
            t = host[lid]
            want = t.decode(t.tensor[torch.from_numpy(ids[lid].reshape(-1))])
            got = pending.rows(lid).reshape(want.shape[0], -1).cpu()
            assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
        pending.close()
    hot.flush()
    assert all(s.hits > 0 for s in hot.accountant.totals.layers.values())
    assert not any(fl.cache.pins.any() for fl in tier.layers.values())
    hot.close()
    cache.close()


def test_the_tier_choice_says_why():
    from offload.file_tier import choose_tier

    sizes = {1: 3 << 20, 2: 1 << 20}
    use, why = choose_tier(None, sizes, 1 << 20)
    assert use and "exceed --host-memory-bytes 1048576" in why and "layer 1 3.0 MiB" in why
    use, why = choose_tier(None, sizes, 8 << 20)
    assert not use and "within --host-memory-bytes" in why
    assert not choose_tier("cpu", sizes, 0)[0]
    assert choose_tier("file", sizes, 8 << 20)[0]


@pytest.mark.parametrize("fmt", ["bf16", "fp8", "v41"])
@pytest.mark.parametrize("policy", ["static", "adaptive"])
@pytest.mark.parametrize(
    "gather,dedup,sort",
    [("worker", False, False), ("worker", True, False), ("resident", False, True)],
)
def test_hot_rows_over_the_file_tier_are_bit_identical(tmp_path, fmt, policy, gather, dedup, sort):
    """file + DRAM cache + hot cache: hot rows filled and refreshed through the file tier's
    reader (held DRAM rows copied, the rest read from the file), every step's rows equal to
    the host-resident table's; the DRAM cache is never left pinned."""
    from offload.hot_cache import HotCache
    from offload.hot_rows import HotRows, row_sources

    path, keys = write_tables(tmp_path, fmt)
    host = TableStore.from_safetensors(path, keys, "cpu", progress=False)
    rows = {lid: t.rows for lid, t in host.tables.items()}
    budget = sum(t.nbytes for t in host.tables.values()) // 20
    cache, tier = open_file_tier(path, keys, budget, Placement.CPU, CPU, threads=3)
    pf = FileTierGather(make_prefetcher(cache, gather, CPU, dedup), tier)
    if sort:
        pf.inner.plan = lambda ids, p=pf.inner.plan: p(ids).sorted()
    sources = row_sources(pf)
    assert {lid: s.rows for lid, s in sources.items()} == rows  # the file's rows, not slots
    adaptive = policy == "adaptive"
    caches = {  # static: rows 0..31 (Zipf's head below); adaptive: starts empty
        lid: HotCache(
            cache[lid],
            32,
            CPU,
            None if adaptive else np.arange(32) * 7,
            adaptive=adaptive,
            refresh_every=2,
            max_replace=8,
            source=sources[lid],
        )
        for lid in keys
    }
    hot = HotRows(pf, caches)
    ref = make_prefetcher(host, gather, CPU, dedup)
    ids_list = list(steps(rows, 30, seed=2))
    got, want = run_steps(hot, ids_list), run_steps(ref, ids_list)
    for g, w in zip(got, want):
        for lid in keys:
            assert torch.equal(g[lid].view(torch.uint8), w[lid].view(torch.uint8))
    s = hot.accountant.summary()["layers"]
    assert all(s[lid]["hot_hit_rate"] > 0 and s[lid]["file_misses"] > 0 for lid in keys), s
    for lid, c in caches.items():  # the hot rows are the file's rows, bit for bit
        held = host[lid].tensor[torch.from_numpy(c.mapping.ids)]
        assert torch.equal(
            c.rows[torch.from_numpy(c.mapping.slots)].view(torch.uint8), held.view(torch.uint8)
        )
        assert c.held > 0 and (not adaptive or c.stats.replaced > 0)
    assert not any(fl.cache.pins.any() for fl in tier.layers.values())
    hot.close()
    ref.close()


def test_file_tier_read_rows_copies_held_rows_and_reads_the_rest(tmp_path):
    path, keys = write_tables(tmp_path, "v41")
    host = TableStore.from_safetensors(path, keys, "cpu", progress=False)
    cache, tier = open_file_tier(path, keys, 64 * host[1].row_bytes, Placement.CPU, CPU)
    pf = FileTierGather(make_prefetcher(cache, "worker", CPU), tier)
    run_steps(pf, [{1: np.arange(10, 30).reshape(5, 4), 3: np.zeros((5, 4), np.int64)}])
    ids = np.array([29, 5, 10, 2999, 5, 11])  # held, not held, repeats, any order
    got = tier.read_rows(1, ids)
    want = host[1].tensor[torch.from_numpy(ids)].view(torch.uint8).numpy()
    assert np.array_equal(got, want) and not tier.layers[1].cache.pins.any()
    info = tier.describe()["1"]
    assert (info["hot_fill_rows_copied"], info["hot_fill_rows_read"]) == (3, 2)
    with pytest.raises(GatherError, match="outside the table"):
        tier.read_rows(1, np.array([3000]))
    pf.close()


def test_hot_rows_with_the_file_tier_load_and_pass_the_start_up_check(tiny_ckpt):
    """OffloadedModel.load with --placement file and an adaptive hot cache: the caches count
    the file's rows, and the start-up gather check reads the hot path against the file."""
    from engine.kernel_check import check_gather
    from models.checkpoint import ENGRAM_FILE, table_key
    from models.config import ModelConfig
    from offload.file_tier import table_bytes
    from offload.hot_rows import HotSettings
    from offload.offloaded_model import OffloadedModel

    lids = ModelConfig.load(tiny_ckpt).engram_layer_ids
    total = sum(table_bytes(tiny_ckpt / ENGRAM_FILE, {i: table_key(i) for i in lids}).values())
    om = OffloadedModel.load(
        tiny_ckpt,
        placement="file",
        host_memory_bytes=total // 4,
        hot=HotSettings("0.05", None, "adaptive", 4, 16),
        progress=False,
    )
    try:
        assert om.file_tier is not None and om.hot is not None
        for lid, c in om.hot.caches.items():
            assert c.table_rows == om.file_tier.layers[lid].rows > c.table.rows
            c._misses.append(np.arange(0, c.table_rows, 3))  # half full: the check hits, misses
            c.max_replace = c.capacity
            c.refresh()
        checked = check_gather(om.prefetcher, torch.device("cpu"))
        assert len(checked) == 2 and all(c.ok for c in checked), checked
        assert "+ hot rows" in checked[-1].kernel
    finally:
        om.close()


def test_mixed_placement_one_table_in_the_file_one_in_host_memory(tiny_ckpt):
    """file_layers: the first Engram layer's table stays in the file behind a DRAM cache, the
    other is loaded whole; greedy tokens equal all-host serving's (with an adaptive hot cache
    over both), each layer booked under its own tier, the start-up gather check passes."""
    from engine.generate import generate
    from engine.kernel_check import check_gather
    from models.checkpoint import ENGRAM_FILE, table_key
    from models.config import ModelConfig
    from offload.file_tier import table_bytes
    from offload.hot_rows import HotSettings
    from offload.offloaded_model import OffloadedModel

    lids = ModelConfig.load(tiny_ckpt).engram_layer_ids
    sizes = table_bytes(tiny_ckpt / ENGRAM_FILE, {i: table_key(i) for i in lids})
    prompts = [[1, 2, 3, 4, 5], [9, 8, 7, 6, 5, 4, 3, 2, 1], [42, 42]]
    host = OffloadedModel.load(tiny_ckpt, "cpu", "worker", progress=False)
    want = generate(host.model, prompts, max_new_tokens=10, rows=host.prefetcher)
    host.close()
    for hot in (None, HotSettings("0.05", None, "adaptive", 2, 16)):
        om = OffloadedModel.load(
            tiny_ckpt,
            "cpu",
            "worker",
            progress=False,
            host_memory_bytes=sizes[lids[0]] // 4,
            file_layers=[lids[0]],
            hot=hot,
        )
        try:
            assert list(om.file_tier.layers) == [lids[0]]
            assert om.store[lids[1]].rows == om.prefetcher.table_rows[lids[1]]
            assert om.tier_bytes()["file"] == sizes[lids[0]]
            got = generate(om.model, prompts, max_new_tokens=10, rows=om.prefetcher)
            assert got == want
            layers = om.accountant.summary()["layers"]
            assert layers[lids[0]]["tier"] == "file" and layers[lids[0]]["file_misses"] > 0
            assert layers[lids[1]]["tier"] == "cpu" and "file_misses" not in layers[lids[1]]
            assert all(c.ok for c in check_gather(om.prefetcher, torch.device("cpu")))
        finally:
            om.close()
    with pytest.raises(ValueError, match="--host-memory-bytes"):
        OffloadedModel.load(tiny_ckpt, "cpu", progress=False, file_layers=[lids[0]])
