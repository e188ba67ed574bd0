"""A minimal io_uring for batches of reads, through ctypes: a step's reads in one syscall.

One ring per reader, set up once (``io_uring_setup``), its SQ/CQ rings and SQE array mapped
into numpy views. A batch's SQEs (``IORING_OP_READ``: file offset, destination address,
length) are written with a few vectorised numpy stores, the SQ tail advanced, and one
``io_uring_enter`` submits them (and, to wait, collects the completions: ``min_complete``).
ctypes drops the GIL for the call, so the forward thread runs meanwhile. Buffered reads of
pages not in the page cache go on in the kernel together (no ``fadvise`` needed first).

Memory ordering: the SQEs are written before the tail (numpy stores in program order; x86 is
TSO and the kernel reads the tail inside ``io_uring_enter``, itself a barrier); completions are
read after the CQ tail. Peeking at the CQ without a syscall relies on TSO, so elsewhere the
ring always asks the kernel (``io_uring_enter`` with ``GETEVENTS``) before reading CQEs.

The ring stays bounded: at most ``cq_entries`` reads are in flight; a larger batch is
submitted in chunks, waiting for earlier completions to make room. SQEs the kernel did not
take (a refused SQE stops the submission; ENOMEM/EAGAIN take none) are taken back out of the
ring and their reads fail (``-errno``), so no stale SQE is left for the next batch. One thread
at a time waits in the kernel (and only for as many completions as its batch lacks), without
the ring's lock: the others submit meanwhile, or wait for it to reap their completions too.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import mmap
import os
import platform
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

SYS_SETUP, SYS_ENTER, SYS_REGISTER = 425, 426, 427  # the same on every architecture
OP_READ = 22  # IORING_OP_READ (Linux 5.6)
REGISTER_PROBE, OP_SUPPORTED, PROBE_OPS = 8, 1, 256  # IORING_REGISTER_PROBE (Linux 5.6)
ENTER_GETEVENTS = 1
FEAT_SINGLE_MMAP = 1
OFF_SQ_RING, OFF_CQ_RING, OFF_SQES = 0, 0x8000000, 0x10000000
TSO = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")

SQE = np.dtype(
    [("opcode", "u1"), ("flags", "u1"), ("ioprio", "<u2"), ("fd", "<i4"), ("off", "<u8"),
     ("addr", "<u8"), ("len", "<u4"), ("rw_flags", "<u4"), ("user_data", "<u8"),
     ("buf_index", "<u2"), ("personality", "<u2"), ("splice_fd_in", "<i4"), ("pad", "<u8", 2)]
)  # fmt: skip
CQE = np.dtype([("user_data", "<u8"), ("res", "<i4"), ("flags", "<u4")])
PROBE_OP = np.dtype([("op", "u1"), ("resv", "u1"), ("flags", "<u2"), ("resv2", "<u4")])


class _SqOff(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint32) for n in
                ("head", "tail", "ring_mask", "ring_entries", "flags", "dropped", "array",
                 "resv1")] + [("user_addr", ctypes.c_uint64)]  # fmt: skip


class _CqOff(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint32) for n in
                ("head", "tail", "ring_mask", "ring_entries", "overflow", "cqes", "flags",
                 "resv1")] + [("user_addr", ctypes.c_uint64)]  # fmt: skip


class _Params(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint32) for n in
                ("sq_entries", "cq_entries", "flags", "sq_thread_cpu", "sq_thread_idle",
                 "features", "wq_fd")] + [("resv", ctypes.c_uint32 * 3), ("sq_off", _SqOff),
                                          ("cq_off", _CqOff)]  # fmt: skip


class UringUnavailable(OSError):
    """The kernel refuses io_uring here (ENOSYS, or EPERM under a container's seccomp), or
    has it without ``IORING_OP_READ`` (Linux 5.4/5.5)."""


@functools.cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc


def probe_ops(fd: int) -> frozenset[int]:
    """The opcodes ring ``fd``'s kernel supports (``IORING_REGISTER_PROBE``); none where the
    kernel has no probe (before 5.6, which also lacks ``IORING_OP_READ``)."""
    buf = (ctypes.c_uint8 * (16 + PROBE_OPS * PROBE_OP.itemsize))()  # zeroed, as it must be
    n = _libc().syscall(
        ctypes.c_long(SYS_REGISTER), ctypes.c_long(fd), ctypes.c_long(REGISTER_PROBE),
        buf, ctypes.c_long(PROBE_OPS),
    )  # fmt: skip
    if n < 0:
        return frozenset()
    ops = np.frombuffer(buf, PROBE_OP, min(buf[1], PROBE_OPS), 16)  # ops_len at byte 1
    return frozenset(ops["op"][(ops["flags"] & OP_SUPPORTED) != 0].tolist())


@dataclass
class Batch:
    """Reads submitted together: ``res[i]`` is read ``i``'s result once it completed."""

    id: int
    lens: np.ndarray
    res: np.ndarray = field(init=False)
    remaining: int = field(init=False)

    def __post_init__(self) -> None:
        self.res = np.zeros(self.lens.size, dtype=np.int64)
        self.remaining = int(self.lens.size)


class Ring:
    """An io_uring of ``entries`` SQEs (the kernel gives twice as many CQEs). ``probe``: the
    opcodes the kernel supports, given the ring's fd (a test passes an old kernel's)."""

    def __init__(
        self, entries: int = 1024, probe: Callable[[int], frozenset[int]] = probe_ops
    ) -> None:
        p = _Params()
        fd = _libc().syscall(ctypes.c_long(SYS_SETUP), ctypes.c_long(entries), ctypes.byref(p))
        if fd < 0:
            e = ctypes.get_errno()
            raise UringUnavailable(e, f"io_uring_setup: {os.strerror(e)}")
        self.fd = fd
        try:
            self.probed = probe(fd)
            if OP_READ not in self.probed:
                raise UringUnavailable(errno.EINVAL, "io_uring without IORING_OP_READ (Linux 5.6)")
            self._map(p)
        except BaseException as e:
            for m in ("_rings", "_sqe_map"):
                if getattr(self, m, None) is not None:
                    getattr(self, m).close()
            os.close(fd)
            if isinstance(e, OSError) and not isinstance(e, UringUnavailable):
                raise UringUnavailable(e.errno, f"io_uring rings: {e}") from e
            raise
        self.inflight = 0  # submitted, not yet reaped
        self._next = 0
        self._batches: dict[int, Batch] = {}
        self.lock = threading.Lock()  # the SQ, the CQ head, inflight and the batches
        self._reaped = threading.Condition(self.lock)  # the reaper reaped (or gave up)
        self._reaping = False  # a thread waits in the kernel: it alone moves the CQ head

    def _map(self, p: _Params) -> None:
        if not p.features & FEAT_SINGLE_MMAP:
            raise UringUnavailable(errno.ENOSYS, "io_uring without IORING_FEAT_SINGLE_MMAP")
        sq, cq = p.sq_off, p.cq_off
        size = max(sq.array + p.sq_entries * 4, cq.cqes + p.cq_entries * CQE.itemsize)
        prot, flags = mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED | mmap.MAP_POPULATE
        self._rings = mmap.mmap(self.fd, size, flags, prot, offset=OFF_SQ_RING)
        self._sqe_map = mmap.mmap(self.fd, p.sq_entries * SQE.itemsize, flags, prot,
                                  offset=OFF_SQES)  # fmt: skip
        u32 = lambda off, n=1: np.frombuffer(self._rings, np.uint32, n, off)
        self.sq_head, self.sq_tail = u32(sq.head), u32(sq.tail)
        self.sq_entries, self.cq_entries = p.sq_entries, p.cq_entries
        self.sq_mask, self.cq_mask = int(u32(sq.ring_mask)[0]), int(u32(cq.ring_mask)[0])
        u32(sq.array, p.sq_entries)[:] = np.arange(p.sq_entries, dtype=np.uint32)  # i -> SQE i
        self.cq_head, self.cq_tail = u32(cq.head), u32(cq.tail)
        self.cqes = np.frombuffer(self._rings, CQE, p.cq_entries, cq.cqes)
        self.sqes = np.frombuffer(self._sqe_map, SQE, p.sq_entries)
        self.sqes[:] = np.zeros((), SQE)
        # the SQE fields a read sets, as views made once (a decode step's batch is ~20 reads:
        # each field view and fancy index costs as much as the stores)
        self._fields = tuple(self.sqes[f] for f in ("opcode", "fd", "off", "addr", "len"))
        self._user = self.sqes["user_data"]

    def _queued(self) -> int:
        """SQEs in the ring the kernel has not taken."""
        return (int(self.sq_tail[0]) - int(self.sq_head[0])) & 0xFFFFFFFF

    def _enter(self, submit: int, wait: int) -> int:
        """The SQEs the kernel took. The kernel returns -EINTR only when it took none (an
        interrupted wait after a submission returns the count), so a retry resubmits."""
        flags = ENTER_GETEVENTS if wait else 0
        while True:
            n = _libc().syscall(
                ctypes.c_long(SYS_ENTER), ctypes.c_long(self.fd), ctypes.c_long(submit),
                ctypes.c_long(wait), ctypes.c_long(flags), None, ctypes.c_long(0),
            )  # fmt: skip
            if n >= 0:
                return n
            e = ctypes.get_errno()
            if e != errno.EINTR:
                raise OSError(e, f"io_uring_enter: {os.strerror(e)}")
            submit = self._queued() if submit else 0

    def _reap(self) -> None:
        head, tail = int(self.cq_head[0]), int(self.cq_tail[0])
        n = (tail - head) & 0xFFFFFFFF
        if not n:
            return
        c = self.cqes[(head + np.arange(n)) & self.cq_mask]  # a copy, read after the tail
        self.cq_head[0] = tail
        self.inflight -= n
        ids, idx = c["user_data"] >> 32, (c["user_data"] & 0xFFFFFFFF).astype(np.int64)
        if ids[0] == ids[-1] and (ids == ids[0]).all():  # one batch (a decode step's layer)
            b = self._batches[int(ids[0])]
            b.res[idx] = c["res"]
            b.remaining -= n
            return
        for bid in np.unique(ids).tolist():
            mine = ids == bid
            b = self._batches[bid]
            b.res[idx[mine]] = c["res"][mine]
            b.remaining -= int(mine.sum())

    def _await(self, done: Callable[[], bool], want: Callable[[], int]) -> None:
        """Until ``done()`` (the lock held; released while in the kernel). One thread at a
        time waits there, for ``want()`` completions; the others wait for it to reap."""
        while not done():
            if self._reaping:
                self._reaped.wait()
                continue
            if TSO:  # completions already there cost no syscall
                self._reap()
                if done():
                    return
            n, self._reaping = want(), True
            self.lock.release()
            try:
                self._enter(0, n)
            finally:
                self.lock.acquire()
                self._reaping = False
                self._reap()
                self._reaped.notify_all()

    def _push(self, b: Batch, fd: int, off, addr, lens, pos: int, k: int) -> bool:
        """Reads ``pos:pos+k`` of ``b`` written as SQEs and submitted (the lock held). False
        when the kernel did not take them all: the ones it did not, and the rest of ``b``,
        are failed (``-errno``) and their SQEs taken back."""
        tail = int(self.sq_tail[0])
        first = tail & self.sq_mask
        at = (  # a slice where the batch does not wrap round the ring
            slice(first, first + k)
            if first + k <= self.sq_entries
            else (tail + np.arange(k)) & self.sq_mask
        )
        op, fds, offs, addrs, lns = self._fields
        op[at], fds[at] = OP_READ, fd
        offs[at], addrs[at] = off[pos : pos + k], addr[pos : pos + k]
        lns[at] = lens[pos : pos + k]
        self._user[at] = (b.id << 32) | np.arange(pos, pos + k, dtype=np.uint64)
        self.sq_tail[0] = (tail + k) & 0xFFFFFFFF  # after the SQEs
        err = errno.ECANCELED  # a read after one the kernel refused (that one has its CQE)
        try:
            self._enter(k, 0)
        except OSError as e:
            err = e.errno or errno.EIO
        left = self._queued()
        self.inflight += k - left
        if not left:
            return True
        self.sq_tail[0] = self.sq_head[0]  # no stale SQE for the next submission
        first_failed = pos + k - left
        b.res[first_failed:] = -err
        b.remaining -= b.res.size - first_failed
        return False

    def submit(self, fd: int, off: np.ndarray, addr: np.ndarray, lens: np.ndarray,
               wait: bool = False) -> Batch:  # fmt: skip
        """Reads of ``lens[i]`` bytes at file offset ``off[i]`` of ``fd`` into address
        ``addr[i]``, submitted (and, with ``wait``, completed). The destinations must stay
        alive until :meth:`wait` returns. A read the kernel did not take has ``-errno`` as
        its result (never an exception here: the reads it took may still land)."""
        n = int(lens.size)
        with self.lock:
            b = Batch(self._next, lens)
            self._next = (self._next + 1) & 0xFFFFFFFF
            self._batches[b.id] = b
            pos = 0
            while pos < n:
                room = min(self.sq_entries, self.cq_entries - self.inflight)
                if room <= 0:  # the CQ could overflow: wait for a completion first
                    self._await(lambda: self.inflight < self.cq_entries, lambda: 1)
                    continue
                k = min(room, n - pos)
                if not self._push(b, fd, off, addr, lens, pos, k):
                    break
                pos += k
        if wait:
            self.wait(b)
        return b

    def wait(self, b: Batch) -> np.ndarray:
        """Until every read of ``b`` has completed; their results (bytes read, or -errno)."""
        with self.lock:
            self._await(lambda: not b.remaining, lambda: min(b.remaining, self.inflight))
            self._batches.pop(b.id, None)
        return b.res

    def close(self) -> None:
        with self.lock:
            # no read may write a buffer after its owner let it go
            self._await(lambda: not self.inflight, lambda: self.inflight)
            for name in (
                "_fields",
                "_user",
                "sqes",
                "cqes",
                "sq_head",
                "sq_tail",
                "cq_head",
                "cq_tail",
            ):
                self.__dict__.pop(name, None)
            if getattr(self, "_rings", None) is not None:
                self._rings.close()
                self._sqe_map.close()
                self._rings = None
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1
