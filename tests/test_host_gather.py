"""Threaded host gather for the staged path (offload.host_gather)."""

import json

import numpy as np
import pytest
import torch

from offload.host_gather import ThreadedGather, measure_host_gather, memcpy_bytes


def _table(rows=20000, width=64, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(-(2**15), 2**15, (rows, width), dtype=torch.int32, generator=g)
    return raw.to(torch.int16).view(dtype) if dtype.itemsize == 2 else raw.to(dtype)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("m", [0, 1, 7, 12345])
def test_threaded_gather_equals_index_select(threads, m):
    table = _table()
    idx = torch.from_numpy(np.random.default_rng(m).integers(0, table.shape[0], m))
    out = torch.empty((m, 64), dtype=torch.bfloat16)
    with ThreadedGather(threads) as g:
        got = g.gather(table, idx, out)
    assert got.data_ptr() == out.data_ptr() or m == 0
    assert torch.equal(got.view(torch.int16), table[idx].view(torch.int16))


def test_numpy_indices_and_a_larger_staging_buffer():
    table = _table(1000, 24, torch.float32)
    idx = np.array([999, 0, 0, 500, 3])
    out = torch.full((10, 24), -1.0)
    with ThreadedGather(2) as g:
        got = g.gather(table, idx, out)
    assert got.shape == (5, 24) and torch.equal(got, table[torch.from_numpy(idx)])
    assert bool((out[5:] == -1).all())  # rows past the request are untouched


def test_a_bad_row_in_any_thread_raises():
    table = _table(5000, 64)
    idx = torch.randint(0, 5000, (20000,))
    idx[-1] = 5000  # in the last thread's share
    with ThreadedGather(4) as g, pytest.raises(IndexError):
        g.gather(table, idx, torch.empty((20000, 64), dtype=torch.bfloat16))


def test_bad_arguments_are_refused():
    table = _table(100, 8)
    with pytest.raises(ValueError, match="at least 1"):
        ThreadedGather(0)
    with ThreadedGather(1) as g:
        with pytest.raises(ValueError, match="allocate"):
            g.gather(table, torch.tensor([1, 2]), torch.empty((1, 8), dtype=torch.bfloat16))
        with pytest.raises(ValueError, match="allocate"):
            g.gather(table, torch.tensor([1]), torch.empty((1, 8), dtype=torch.float32))


def test_memcpy_copies_the_bytes():
    src = torch.arange(1000, dtype=torch.int32)
    dst = torch.zeros(1000, dtype=torch.int32)
    memcpy_bytes(dst, src, 400)
    assert torch.equal(dst[:100], src[:100]) and not dst[100:].any()


def test_measure_reports_every_thread_count_and_the_memcpy_baseline():
    table = _table(4096, 64)
    r = measure_host_gather(table, 2048, threads_list=(1, 2), repeats=2, pin=False)
    assert (r["rows"], r["row_bytes"], r["bytes"], r["pinned"]) == (2048, 128, 2048 * 128, False)
    assert [e["threads"] for e in r["gather"]] == [1, 2]
    for e in [r["memcpy"], *r["gather"]]:
        assert 0 < e["gbps_min"] <= e["gbps"] <= e["gbps_max"]
    explicit = measure_host_gather(table, np.arange(10), threads_list=(1,), repeats=1, pin=False)
    assert explicit["rows"] == 10


def test_command_prints_rates_and_the_table_memory(capsys):
    from offload.host_gather import main

    args = ["--table-mib", "2", "--rows", "100", "--threads", "1", "2", "--repeats", "1"]
    assert main([*args, "--no-huge-pages"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["table"]["kind"] == "none" and out["table"]["bytes"] == 2 << 20
    assert [r["rows"] for r in out["results"]] == [100]
    with pytest.raises(SystemExit):
        main(["--threads", "0"])
    assert "must be at least 1" in capsys.readouterr().err
