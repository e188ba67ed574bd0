"""The io_uring row reader: rows read through one ring bit-identical to the file and to the
preadv reader (scattered, coalesced, more than the ring holds), a truncated file a typed
error, the fallback to preadv where io_uring cannot be set up, and the file tier submitting
its reads in the plan."""

import logging
import os

import numpy as np
import pytest
import torch

from models.safetensors_header import TableFileError, read_header
from offload.file_gather import FileTierGather
from offload.file_tier import open_file_tier
from offload.paths import make_prefetcher
from offload.row_reader import RowReader, UringRowReader, open_reader
from offload.store import Placement, TableStore
from offload.table_load import table_source
from offload.uring import Ring, UringUnavailable

from .test_file_tier import run_steps, steps, write_tables

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def uring():
    try:
        Ring(2).close()
    except OSError as e:
        pytest.skip(f"the kernel refuses io_uring here: {e}")


def readers(path, key, entries=1024):
    src = table_source(read_header(path), key)
    return src, UringRowReader(str(path), src, entries=entries), RowReader(str(path), src, 2)


def stored(src, path) -> np.ndarray:
    """Every row's stored bytes, straight from the file (values, then scales)."""
    raw = np.fromfile(path, dtype=np.uint8)
    parts = [src.values] + ([src.scales] if src.scales is not None else [])
    cols = [raw[p.start : p.start + p.nbytes].reshape(src.rows, -1) for p in parts]
    return np.concatenate(cols, axis=1)


CASES = {
    "scattered": lambda rng, n: np.sort(rng.choice(n, 70, replace=False)),
    "coalesced": lambda rng, n: np.concatenate([np.arange(10, 60), np.arange(500, 2600)]),
    "over the ring": lambda rng, n: np.sort(rng.choice(n, 300, replace=False)),
}


@pytest.mark.parametrize("fmt", ["bf16", "v41"])
@pytest.mark.parametrize("case", list(CASES))
def test_rows_bit_identical_to_the_file_and_to_preadv(uring, tmp_path, fmt, case):
    path, keys = write_tables(tmp_path, fmt)
    src, ur, pr = readers(path, keys[1], entries=16 if case == "over the ring" else 1024)
    want = stored(src, path)
    rng = np.random.default_rng(0)
    rows = CASES[case](rng, src.rows)
    slots = rng.permutation(rows.size + 7)[: rows.size]  # scattered victim slots
    a = np.zeros((rows.size + 7, ur.row_bytes), np.uint8)
    b = np.zeros_like(a)
    assert ur.read(rows, slots, a) == pr.read(rows, slots, b) == rows.size * ur.row_bytes
    assert np.array_equal(a[slots], want[rows]) and np.array_equal(a, b)
    c = np.zeros_like(a)  # announced and submitted first, reaped later: the plan's order
    ur.advise = True
    ur.announce(rows)
    pending = ur.submit(rows, slots, c)
    assert ur.finish(pending) == rows.size * ur.row_bytes and np.array_equal(a, c)
    assert ur.ring.inflight == 0
    ur.close()
    pr.close()


def test_truncated_file_is_a_typed_error_naming_the_tensor(uring, tmp_path):
    path, keys = write_tables(tmp_path, "bf16")
    src, ur, pr = readers(path, keys[3])
    os.truncate(path, path.stat().st_size - 3 * src.row_bytes - 5)  # after the readers opened
    out = np.zeros((4, ur.row_bytes), np.uint8)
    rows, slots = np.array([0, src.rows - 3, src.rows - 1]), np.array([0, 1, 2])
    for reader in (ur, pr):
        with pytest.raises(TableFileError) as e:
            reader.read(rows, slots, out)
        assert "truncated" in str(e.value) and src.values.name in str(e.value)
    assert ur.ring.inflight == 0  # the ring is usable again
    assert ur.read(rows[:1], slots[:1], out) == ur.row_bytes
    ur.close()
    pr.close()


def test_auto_falls_back_to_preadv_when_the_ring_is_refused(uring, tmp_path, caplog):
    path, keys = write_tables(tmp_path, "bf16")
    src = table_source(read_header(path), keys[1])
    assert open_reader(str(path), src, 2, "auto").io == "uring"
    assert open_reader(str(path), src, 2, "pread").io == "pread"
    with caplog.at_level(logging.WARNING):  # 0 entries: io_uring_setup refuses (EINVAL)
        r = open_reader(str(path), src, 2, "auto", entries=0)
    assert type(r) is RowReader and "io_uring unavailable" in caplog.text
    out = np.zeros((3, r.row_bytes), np.uint8)
    r.read(np.array([1, 2, 40]), np.array([2, 0, 1]), out)
    assert np.array_equal(out[[2, 0, 1]], stored(src, path)[[1, 2, 40]])
    with pytest.raises(UringUnavailable, match="--file-io uring"):
        open_reader(str(path), src, 2, "uring", entries=0)
    with pytest.raises(ValueError, match="unknown file I/O"):
        open_reader(str(path), src, 2, "mmap")


@pytest.mark.parametrize("submit_in_plan", [False, True])
def test_file_tier_over_io_uring_serves_the_host_tables_rows(uring, tmp_path, submit_in_plan):
    path, keys = write_tables(tmp_path, "fp8")
    host = TableStore.from_safetensors(path, keys, "cpu", progress=False)
    rows = {lid: t.rows for lid, t in host.tables.items()}
    budget = sum(t.nbytes for t in host.tables.values()) // 20
    cache, tier = open_file_tier(path, keys, budget, Placement.CPU, CPU, file_io="uring")
    tier.submit_in_plan = submit_in_plan
    assert all(d["file_io"] == "uring" for d in tier.describe().values())
    pf = FileTierGather(make_prefetcher(cache, "worker", CPU), tier)
    ref = make_prefetcher(host, "worker", CPU)
    ids_list = list(steps(rows, 30))
    for g, w in zip(run_steps(pf, ids_list), run_steps(ref, ids_list)):
        for lid in keys:
            assert torch.equal(g[lid].view(torch.uint8), w[lid].view(torch.uint8))
    s = pf.accountant.summary()["layers"]
    assert all(s[lid]["file_misses"] > 0 for lid in keys)
    assert all(fl.reader.ring.inflight == 0 for fl in tier.layers.values())
    assert not any(fl.cache.pins.any() for fl in tier.layers.values())
    pf.close()
    ref.close()
