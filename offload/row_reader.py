"""Explicit parallel reads of table rows from a safetensors file into chosen cache slots.

A step's misses are known on the host before the forward pass, so they are read with
``preadv`` (GIL released) by a small thread pool, never through page faults of a mapping.
Rows adjacent in the file are coalesced into one ``preadv`` whose buffers are the (scattered)
victim slots, at most ``IOV_MAX`` buffers per call. Split fp8 tables (V4.1: values and scales
in two tensors) take one read per run for each tensor; the slot holds our packed row (values,
then scale bytes). The file is opened with ``POSIX_FADV_RANDOM`` so the kernel does not read
ahead around every row.

Before the reads, every run's byte range is announced with ``POSIX_FADV_WILLNEED``: the kernel
queues all of a step's page reads at once (asynchronously, like an io_uring batch), and the
``preadv`` calls that follow wait for pages already on their way instead of one disk round
trip each. Measured on the CI machine's disk, page cache dropped, 46 random 32-byte rows of a
6 MB file: 2.6 ms read one after another, 0.8 ms on 8 threads, 0.3 ms announced first.
"""

from __future__ import annotations

import functools
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from models.safetensors_header import TableFileError

from .table_load import TableSource
from .thread_names import name_os_thread
from .uring import Batch, Ring, UringUnavailable, probe_ops

log = logging.getLogger(__name__)
FILE_IO = ("auto", "uring", "pread")  # --file-io: auto is io_uring where the kernel allows it

IOV_MAX = 1024  # buffers per preadv (Linux's UIO_MAXIOV)
PAGE = 4096  # the page cache's unit: announced spans are whole pages
# a thread takes at least this many runs: a decode step's misses are read inline by the gather
# that needs them, a prefill's or a warm start's thousands by all threads. Their pages were
# announced first, so the disk reads are in flight together and more threads only add hand-offs
# (and CPU beside the forward pass; ``python -m bench.plan_replay`` times a step's reads)
RUNS_PER_THREAD = 256
SMALL = 64  # page_spans: offsets up to this many in a plain loop (numpy's per-call cost wins)


def run_bounds(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Starts and ends (index arrays into ``rows``, sorted) of the runs where the row ids are
    consecutive, each at most IOV_MAX long: a step's few dozen scattered misses in a few numpy
    calls, no Python loop (a run longer than IOV_MAX, from warm starts and prefills, is split
    with one)."""
    starts = np.concatenate(([0], np.flatnonzero(np.diff(rows) != 1) + 1))
    ends = np.append(starts[1:], rows.size)  # runs partition the indices
    if rows.size and (ends - starts).max() > IOV_MAX:
        pieces = [np.arange(a, b, IOV_MAX) for a, b in zip(starts.tolist(), ends.tolist())]
        starts = np.concatenate(pieces)
        ends = np.append(starts[1:], rows.size)
    return starts, ends


def runs_of(rows: np.ndarray) -> list[tuple[int, int]]:
    """[a, b) index ranges of ``rows`` (sorted) where the row ids are consecutive, each at most
    IOV_MAX long."""
    if rows.size == 0:
        return []
    starts, ends = run_bounds(rows)
    return list(zip(starts.tolist(), ends.tolist()))


def page_spans(offsets: np.ndarray, nbytes: int, page: int = PAGE) -> list[tuple[int, int]]:
    """[lo, hi) byte spans, page-aligned, covering ``nbytes`` at each of ``offsets``
    (ascending): rows on the same or neighbouring pages share one span (one syscall)."""
    if offsets.size <= SMALL:  # a decode step's few dozen: a loop beats ten numpy calls
        out: list[tuple[int, int]] = []
        first = last = -1
        for o in offsets.tolist():
            lo, hi = o // page, (o + nbytes - 1) // page + 1
            if lo > last:
                if last >= 0:
                    out.append((first * page, last * page))
                first = lo
            last = hi
        if last >= 0:
            out.append((first * page, last * page))
        return out
    lo, hi = offsets // page, (offsets + nbytes - 1) // page + 1
    cuts = np.flatnonzero(lo[1:] > hi[:-1]) + 1
    starts = lo[np.concatenate(([0], cuts))] * page
    ends = hi[np.concatenate((cuts - 1, [lo.size - 1]))] * page
    return list(zip(starts.tolist(), ends.tolist()))


class RowReader:
    """Reads rows of one table (``src``) of file ``path`` into rows of a uint8 cache array."""

    io = "pread"

    def __init__(self, path: str, src: TableSource, threads: int = 4) -> None:
        if threads < 1:
            raise ValueError(f"file read threads must be at least 1, got {threads}")
        self.path, self.src, self.threads = path, src, threads
        self.fd = os.open(path, os.O_RDONLY)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_RANDOM)
        self._pool = (
            ThreadPoolExecutor(threads - 1, "engram-file", name_os_thread) if threads > 1 else None
        )
        rows = max(src.rows, 1)
        self.parts = [(src.values, 0, src.values.nbytes // rows)]  # (tensor, column, bytes/row)
        if src.scales is not None:
            self.parts.append((src.scales, self.parts[0][2], src.scales.nbytes // rows))

    @property
    def row_bytes(self) -> int:
        return sum(n for _, _, n in self.parts)

    def read(
        self, rows: np.ndarray, slots: np.ndarray, cache: np.ndarray, announced: bool = False
    ) -> int:
        """Row ``rows[i]`` (ascending, unique) of the file into ``cache[slots[i]]`` (a
        C-contiguous uint8 ``[n, row_bytes]`` array); returns the bytes read. ``announced``:
        the caller has announced ``rows`` already (no second ``fadvise`` per span). A short
        file is a TableFileError naming the tensor."""
        if rows.size == 0:
            return 0
        starts, ends = run_bounds(rows)
        if starts.size > 1 and not announced:
            self.announce(rows)
        flat = memoryview(cache).cast("B")  # slices of it are the preadv buffers
        stride = cache.shape[1]
        firsts, slot_list = rows[starts], slots.tolist()
        groups = _balance(starts, ends, self.threads)
        work = lambda g: self._read_runs(
            firsts[g[0]].tolist(), slot_list, flat, stride, g[1].tolist(), g[2].tolist()
        )
        futures = [self._pool.submit(work, g) for g in groups[1:]] if self._pool else []
        work(groups[0])
        for f in futures:
            f.result()
        return int(rows.size) * self.row_bytes

    def announce(self, rows: np.ndarray) -> None:
        """Queue the page reads of ``rows`` (ascending, unique) in the kernel and return: a
        later :meth:`read` of them finds their pages arrived or on their way."""
        if not hasattr(os, "posix_fadvise") or rows.size == 0:
            return
        for info, _, per_row in self.parts:
            for lo, hi in page_spans(info.start + rows.astype(np.int64) * per_row, per_row):
                os.posix_fadvise(self.fd, lo, hi - lo, os.POSIX_FADV_WILLNEED)

    def _read_runs(self, firsts, slot_list, flat, stride, starts, ends) -> None:
        """One ``preadv`` per run and tensor part (``firsts``: each run's first file row;
        ``starts``/``ends``: its rows' indices into ``slot_list``)."""
        for first, a, b in zip(firsts, starts, ends):
            for info, col, per_row in self.parts:
                bufs = [flat[s * stride + col : s * stride + col + per_row] for s in slot_list[a:b]]
                self._preadv(info, bufs, info.start + first * per_row, per_row)

    def _preadv(self, info, bufs: list, offset: int, per_row: int, got: int | None = None) -> None:
        """``bufs`` (``per_row`` bytes each) from file ``offset`` on; ``got``: bytes of them
        already read (an io_uring read that ended short), else all are read here."""
        want = per_row * len(bufs)
        if got is None:
            got = os.preadv(self.fd, bufs, offset)
        while got < want:  # a short read: finish row by row from where it stopped
            k, done = divmod(got, per_row)
            n = os.preadv(self.fd, [bufs[k][done:]], offset + got)
            if n == 0:
                raise TableFileError(
                    f"{self.path}: tensor {info.name}: file ended at byte {offset + got} "
                    "(truncated?)"
                )
            got += n

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _balance(
    starts: np.ndarray, ends: np.ndarray, threads: int
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Runs (``starts``/``ends``, partitioning the rows) split into at most ``threads``
    groups of about equal rows, in order: (run numbers, starts, ends) per group. A decode
    step's few dozen runs are one group (no hand-off)."""
    k = max(1, min(threads, -(-starts.size // RUNS_PER_THREAD)))
    if k == 1:
        return [(np.arange(starts.size), starts, ends)]
    group = np.minimum(k - 1, starts * k // max(int(ends[-1]), 1))  # rows before each run
    cuts = np.searchsorted(group, np.arange(1, k))
    runs = np.arange(starts.size)
    parts = zip(np.split(runs, cuts), np.split(starts, cuts), np.split(ends, cuts))
    return [p for p in parts if p[0].size]


@dataclass
class Pending:
    """A batch of row reads submitted to a ring: where each landed in the cache array."""

    batch: Batch
    cache: np.ndarray  # kept alive until the reads are reaped
    off: np.ndarray  # file offset of each read
    at: np.ndarray  # byte offset in ``cache`` of each read
    lens: np.ndarray
    rows: int  # reads per tensor part (read i is of part i // rows)


class UringRowReader(RowReader):
    """Reads rows through one io_uring: an ``IORING_OP_READ`` per row and tensor part (no
    coalescing: a run's rows go to scattered slots anyway), a whole batch in one
    ``io_uring_enter`` while it fits the ring. :meth:`submit` and :meth:`finish` split
    a read so the plan can submit it and the gather reap it. ``advise`` (default): the plan
    still announces the pages (:meth:`announce`), so their disk reads start a layer's compute
    before the gather submits; unannounced, the gather waits for the disk (the bench rows
    ``file + DRAM``, ``file + DRAM, pread`` and ``file + DRAM, io_uring unannounced`` of
    ``engram-bench --tiers``)."""

    io = "uring"

    def __init__(
        self, path: str, src: TableSource, entries: int = 1024, advise: bool = True,
        probe=probe_ops,
    ) -> None:  # fmt: skip
        super().__init__(path, src, 1)  # the kernel reads in parallel: no thread pool
        self.advise = advise
        try:
            self.ring = Ring(entries, probe)
        except BaseException:
            super().close()
            raise

    def submit(
        self, rows: np.ndarray, slots: np.ndarray, cache: np.ndarray, wait: bool = False
    ) -> Pending:
        if not (cache.flags.c_contiguous and cache.dtype == np.uint8 and cache.ndim == 2):
            raise ValueError("rows are read into a C-contiguous uint8 [n, row_bytes] array")
        rows, slots = rows.astype(np.uint64), slots.astype(np.uint64)
        stride, parts = np.uint64(cache.shape[1]), self.parts
        # one read per row and tensor part, part after part (read i is of part i // rows)
        off = np.concatenate([rows * np.uint64(n) + np.uint64(t.start) for t, _, n in parts])
        at = np.concatenate([slots * stride + np.uint64(col) for _, col, _ in parts])
        lens = np.concatenate([np.full(rows.size, n, np.uint32) for _, _, n in parts])
        addr = at + np.uint64(cache.ctypes.data)
        batch = self.ring.submit(self.fd, off, addr, lens, wait)
        return Pending(batch, cache, off, at, lens, int(rows.size))

    def finish(self, p: Pending) -> int:
        """Until ``p``'s reads are in the cache; the bytes read. A read that failed or
        ended short (the file ends: truncated?) is a TableFileError naming the tensor."""
        res = self.ring.wait(p.batch)
        for i in np.flatnonzero(res != p.lens).tolist():
            self._finish_short(p, i, int(res[i]))
        return int(p.lens.sum(dtype=np.int64))

    def _finish_short(self, p: Pending, i: int, got: int) -> None:
        info = self.parts[i // max(p.rows, 1)][0]
        off, want = int(p.off[i]), int(p.lens[i])
        if got < 0:
            raise TableFileError(
                f"{self.path}: tensor {info.name}: read at byte {off}: {os.strerror(-got)}"
            )
        at = int(p.at[i])
        self._preadv(info, [memoryview(p.cache).cast("B")[at : at + want]], off, want, got)

    def read(
        self, rows: np.ndarray, slots: np.ndarray, cache: np.ndarray, announced: bool = False
    ) -> int:
        if rows.size == 0:
            return 0
        return self.finish(self.submit(rows, slots, cache, wait=True))

    def announce(self, rows: np.ndarray) -> None:
        """With ``advise``, the pages announced as the preadv reader does (an ``fadvise`` per
        page span: their disk reads start before the ring's reads are submitted). Without,
        nothing: the kernel reads the missing pages of the submitted reads together anyway.
        (Not through the ring: advice submitted there runs on the kernel's io workers, which
        cost more CPU beside the forward pass than the syscalls.)"""
        if self.advise:
            super().announce(rows)

    def close(self) -> None:
        if getattr(self, "ring", None) is not None:
            self.ring.close()
            self.ring = None
        super().close()


def open_reader(
    path: str, src: TableSource, threads: int = 4, io: str = "auto", entries: int = 1024,
    probe=probe_ops,
) -> RowReader:  # fmt: skip
    """A reader of ``io`` (FILE_IO): ``auto`` takes io_uring and falls back to ``preadv``
    (logged once) where the kernel refuses it or lacks its read (``probe``: the opcodes a
    ring's kernel supports); ``uring`` refuses to fall back. The file's own errors (missing,
    unreadable) are raised as they are."""
    if io not in FILE_IO:
        raise ValueError(f"unknown file I/O {io!r}; use one of {', '.join(FILE_IO)}")
    if io != "pread":
        try:
            return UringRowReader(path, src, entries, probe=probe)
        except UringUnavailable as e:
            if io == "uring":
                raise UringUnavailable(e.errno, f"--file-io uring: {e}") from None
            _fallback(str(e))
    return RowReader(path, src, threads)


@functools.cache
def _fallback(why: str) -> None:
    log.warning("io_uring unavailable (%s): file tier rows read with preadv", why)
