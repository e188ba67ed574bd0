"""The io_uring row reader: rows read through one ring bit-identical to the file and to the
preadv reader (scattered, coalesced, more than the ring holds), a truncated file a typed
error, the fallback to preadv where io_uring cannot be set up, and the file tier submitting
its reads in the plan."""

import logging
import os
import threading

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
from offload.uring import OP_READ, Ring, UringUnavailable

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


def _in_thread(fn, timeout=20.0):
    """``fn()``'s result, or its error; a call still blocked after ``timeout`` fails the test
    (a daemon thread: a hang does not keep the test run alive)."""
    out: dict = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            out["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"hung for {timeout} s"
    if "error" in out:
        raise out["error"]
    return out.get("value")


def test_a_batch_the_kernel_takes_in_part_fails_typed_and_the_ring_reads_on(uring, tmp_path):
    """The kernel stops taking a batch's SQEs at one it refuses at submission (here invalid
    SQE flags, as an unknown opcode would be): that read and the ones not taken fail typed,
    wait returns, and the next batch reads its own rows (no stale SQE left in the ring)."""
    path, keys = write_tables(tmp_path, "bf16")
    src = table_source(read_header(path), keys[1])
    ur = UringRowReader(str(path), src, entries=8)
    want = stored(src, path)
    rows, slots = np.arange(3, 11), np.arange(8)
    out = np.zeros((8, ur.row_bytes), np.uint8)
    ur.ring.sqes["flags"][1] = 0x80  # no such IOSQE_* flag: io_uring_enter takes 2 of 8
    with pytest.raises(TableFileError, match=src.values.name):
        _in_thread(lambda: ur.read(rows, slots, out))
    assert ur.ring.inflight == 0 and not ur.ring._batches
    assert ur.ring.sq_tail[0] == ur.ring.sq_head[0]  # the SQEs not taken are not left queued
    ur.ring.sqes["flags"][1] = 0
    out[:] = 0
    other = np.arange(40, 48)
    assert _in_thread(lambda: ur.read(other, slots, out)) == 8 * ur.row_bytes
    assert np.array_equal(out, want[other])
    _in_thread(ur.close)


def test_a_ring_without_op_read_is_unavailable_and_auto_falls_back(uring, tmp_path, caplog):
    """Linux 5.4/5.5 set up a ring but have no IORING_OP_READ: the probe finds it missing."""
    assert OP_READ in (ops := Ring(2).probed) and len(ops) > 1  # this kernel's real probe
    with pytest.raises(UringUnavailable, match="IORING_OP_READ"):
        Ring(2, probe=lambda fd: frozenset({0, 1, 2}))
    path, keys = write_tables(tmp_path, "bf16")
    src = table_source(read_header(path), keys[1])
    old = lambda fd: frozenset(range(OP_READ))  # a 5.5 kernel's opcodes
    with caplog.at_level(logging.WARNING):
        r = open_reader(str(path), src, 2, "auto", probe=old)
    assert type(r) is RowReader and "IORING_OP_READ" in caplog.text
    out = np.zeros((2, r.row_bytes), np.uint8)
    r.read(np.array([5, 9]), np.array([1, 0]), out)
    assert np.array_equal(out[[1, 0]], stored(src, path)[[5, 9]])
    with pytest.raises(UringUnavailable, match="--file-io uring"):
        open_reader(str(path), src, 2, "uring", probe=old)


def test_a_missing_file_is_the_file_error_not_io_uring(uring, tmp_path, caplog):
    path, keys = write_tables(tmp_path, "bf16")
    src = table_source(read_header(path), keys[1])
    for io in ("auto", "uring"):
        with caplog.at_level(logging.WARNING), pytest.raises(FileNotFoundError):
            open_reader(str(tmp_path / "gone.safetensors"), src, 2, io)
    assert "io_uring" not in caplog.text


def test_one_callers_wait_does_not_wait_for_another_callers_reads(uring, tmp_path):
    """A read of a fifo completes only once the fifo is written: while one batch's read stays
    in flight, another batch on the same ring (also a fifo, written a little later, so its
    wait goes to the kernel) is waited for alone."""
    fifos = []
    for name in ("stuck", "late"):
        os.mkfifo(tmp_path / name)
        rfd = os.open(tmp_path / name, os.O_RDONLY | os.O_NONBLOCK)
        fifos.append((rfd, os.open(tmp_path / name, os.O_WRONLY)))
        os.set_blocking(rfd, True)
    (stuck_r, stuck_w), (late_r, late_w) = fifos
    ring = Ring(8)
    bufs = np.zeros((2, 4), np.uint8)
    one = lambda fd, buf: ring.submit(
        fd, np.zeros(1, np.uint64), np.array([buf.ctypes.data], np.uint64), np.array([4], np.uint32)
    )
    stuck = one(stuck_r, bufs[0])
    late = one(late_r, bufs[1])
    threading.Timer(0.2, os.write, (late_w, b"wxyz")).start()
    try:
        assert _in_thread(lambda: ring.wait(late), timeout=10).tolist() == [4]
        assert bytes(bufs[1]) == b"wxyz" and ring.inflight == 1
    finally:
        os.write(stuck_w, b"abcd")
        assert _in_thread(lambda: ring.wait(stuck), timeout=10).tolist() == [4]
    assert bytes(bufs[0]) == b"abcd"
    _in_thread(ring.close)
    for pair in fifos:
        for f in pair:
            os.close(f)
