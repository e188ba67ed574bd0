"""Engram tables in shared memory on a node: loaded once, mapped by every engine process.

The first engine to need a table streams it from the checkpoint into a file in the shared
directory (``/dev/shm``, or a hugetlbfs mount: huge pages for free), under a temporary name,
and renames it to its final name only when every row is in: the final name *is* the READY
mark, so a load killed half way never leaves a table another engine attaches to. An ``flock``
per table serialises loaders (it dies with its holder), so engines starting together load each
table once and the others wait, then attach. The files outlive the engines: a restarted engine
maps them again in seconds. The name carries the checkpoint's identity (path, size, mtime, the
tensor, the stored row format and shape), so a changed checkpoint never attaches to stale rows.

Each table maps as a :class:`SharedBuffer` (a :class:`~offload.hostmem.HostBuffer` over the
file, MAP_SHARED), so the pinned host tier registers it with CUDA through the same path.
Free space is checked (statvfs) before anything loads: a table that does not fit is refused
with one line giving the bytes needed and where to get them; every page is then reserved
through the mapping before a row is written (``reserve``), so a space that runs out anyway
refuses the same way instead of a SIGBUS mid-load.

NUMA (``offload.numa``): a table's pages are bound, as its file is allocated, to the node of the
GPU that reads it; the node is part of the name, so engines on several nodes keep one copy per
node and engines of one node share one. The node's free memory is checked with the space.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import mmap
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import numa
from .hostmem import HUGE_PAGE, HostBuffer, huge_bytes_in, thp_mode
from .shm_mounts import SHM, default_dir, hugetlbfs_mounts, shmem_huge, statvfs_free

log = logging.getLogger(__name__)

SUBDIR = "engram-serve"
SUFFIX = ".rows"
MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # Linux 5.14; Python lacks it


class SharedSpaceError(ValueError):
    """The shared directory cannot hold the tables (one line: bytes needed and the fix)."""


def table_name(
    path: str | Path, key: str, stored: str, shape: tuple[int, ...], node: int | None = None
) -> str:
    """The shared file's name for tensor ``key`` of the checkpoint file at ``path``, stored as
    ``stored`` (e.g. 'fp8', 'torch.bfloat16') in ``shape``: ``<family>-<version>.rows``, where
    the family is the file, tensor, row layout and NUMA node (``-n<node>``: one copy per node),
    and the version the file's size and mtime."""
    p = Path(path).resolve()
    st = p.stat()
    where = hashlib.sha256(f"{p}|{key}|{stored}|{list(shape)}".encode()).hexdigest()[:8]
    version = hashlib.sha256(f"{where}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    on = "" if node is None else f"-n{node}"
    return f"{p.parent.name}-{key.replace('/', '_')}-{where}{on}-{version}{SUFFIX}"


def family(name: str) -> str:
    """A table name less its version: every version of one tensor of one checkpoint file."""
    return name.removesuffix(SUFFIX).rsplit("-", 1)[0]


def stale_versions(root: Path, name: str) -> list[Path]:
    """Other versions of ``name``'s table (the checkpoint changed since they were loaded).
    Unlinking them is safe: an engine that still maps one keeps its pages until it exits."""
    return [p for p in root.glob(family(name) + "-*" + SUFFIX) if p.name != name]


def _round_up(n: int, to: int) -> int:
    return -(-max(n, 1) // to) * to


def reserve(buf: SharedBuffer, node: int | None, final: Path) -> None:
    """Every page of ``buf``'s file allocated now, so a full tmpfs or hugetlbfs pool fails here
    (SharedSpaceError) and never as SIGBUS later. Faulted in through the mapping, so its
    huge-page advice and NUMA policy apply ('advise' mounts give huge pages only this way);
    posix_fallocate on kernels before 5.14 (no MADV_POPULATE_WRITE)."""
    try:
        with numa.bound(node):
            try:
                buf._mm.madvise(MADV_POPULATE_WRITE)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                fd = os.open(buf.path, os.O_RDWR)
                try:
                    os.posix_fallocate(fd, 0, buf.span)
                finally:
                    os.close(fd)
    except OSError as e:
        # populating reports a fault it could not satisfy (a full tmpfs, an empty hugetlbfs
        # pool) as EFAULT
        why = "no space left" if e.errno in (errno.EFAULT, errno.ENOSPC) else e.strerror
        raise SharedSpaceError(
            f"cannot reserve {buf.span} bytes for {final} ({why}); give the shared "
            "directory room (Docker shm_size, a Kubernetes memory-medium emptyDir) or pass "
            "--shared-tables-dir DIR"
        ) from None


class SharedBuffer(HostBuffer):
    """A HostBuffer over a shared file (MAP_SHARED); ``register()`` and views as HostBuffer's."""

    def __init__(self, path: Path, nbytes: int, huge_pages: bool = True) -> None:
        self.nbytes, self.huge_pages, self.path = nbytes, huge_pages, path
        self.thp_mode = thp_mode()
        fd = os.open(path, os.O_RDWR)
        try:
            size = os.fstat(fd).st_size
            if size < nbytes:
                raise OSError(f"{path}: {size} bytes, want {nbytes}")
            prot = mmap.PROT_READ | mmap.PROT_WRITE
            self._mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=prot)
        finally:
            os.close(fd)  # the mapping keeps the file open
        self.kind = "shared"
        if huge_pages and hasattr(mmap, "MADV_HUGEPAGE"):  # shmem THP ('advise' mode)
            try:
                self._mm.madvise(mmap.MADV_HUGEPAGE)
            except OSError:
                pass
        self.span = size
        self._range = torch.frombuffer(self._mm, dtype=torch.uint8, count=size)
        self.tensor = self._range[:nbytes]
        self.ptr = self._range.data_ptr()
        self.registered_device = None
        self._finalizer = None
        self.numa: numa.NumaChoice | None = None  # where the loader bound the pages
        self.shmem_huge = shmem_huge(path.parent)

    def placement(self, smaps: str | None = None) -> dict:
        """Where this table sits: the file, the NUMA node asked for and why, the node of 64
        sampled pages, and whether its pages are huge (from ``smaps`` when the caller has
        read /proc/self/smaps already)."""
        choice = self.numa or numa.NumaChoice(None, "not bound")
        huge = (
            self.huge_bytes()
            if smaps is None
            else huge_bytes_in(smaps, self.ptr, self.ptr + self.span)
        )
        return {
            "path": str(self.path),
            "numa_node": choice.node,
            "numa_why": choice.why,
            "pages_by_node": numa.pages_by_node(self.ptr, self.nbytes),
            "huge_pages_allowed": self.shmem_huge,
            "huge_bytes": min(huge, self.nbytes),
        }

    def describe(self) -> dict:
        return {**super().describe(), **self.placement()}


@dataclass
class TableSpec:
    """One table to share: its file name, stored dtype and shape (rows, bytes or values)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, int]

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.shape[1] * torch.empty((), dtype=self.dtype).element_size()


@dataclass
class SharedTables:
    """Where shared tables live. ``directory`` None: a hugetlbfs mount with room, else
    /dev/shm. ``free``: bytes free at a path (statvfs; tests pass their own)."""

    directory: Path | None = None
    huge_pages: bool = True
    free: Callable[[Path], int] = statvfs_free
    numa_policy: str = "auto"  # auto: the node of the engine's GPU; off; or a node number
    sys_root: Path = numa.SYS  # where NUMA facts are read (tests pass a fake tree)
    bus_id: Callable[[int], str | None] = numa.pci_bus_id
    numa_choice: numa.NumaChoice | None = None  # what place() chose
    attached: list[str] = field(default_factory=list)  # names this process attached to
    loaded: list[str] = field(default_factory=list)  # names this process loaded

    def root(self, need: int) -> Path:
        base = Path(self.directory) if self.directory else default_dir(need, self.free)
        if self.directory is None or base in (SHM, *hugetlbfs_mounts()):
            base = base / SUBDIR
        base.mkdir(parents=True, exist_ok=True)
        return base

    def block(self, root: Path) -> int:
        """The size files round up to: 2 MiB (hugetlbfs needs it; shmem THP wants it)."""
        return HUGE_PAGE if (self.huge_pages or root.parent in hugetlbfs_mounts()) else 4096

    def place(self, device: torch.device) -> numa.NumaChoice:
        """The NUMA node for ``device``'s tables; unbound (with a warning) where the kernel
        refuses memory policies."""
        choice = numa.choose(self.numa_policy, device, self.sys_root, self.bus_id)
        if choice.node is not None:
            try:
                with numa.bound(choice.node):
                    pass
            except OSError as e:
                log.warning("shared tables: cannot bind to NUMA node %d (%s)", choice.node, e)
                choice = numa.NumaChoice(None, f"binding to node {choice.node} refused: {e}")
        self.numa_choice = choice
        return choice

    def check_space(self, specs: list[TableSpec]) -> Path:
        """The directory, after refusing (SharedSpaceError) tables that will not fit, and
        (NumaRoomError) tables whose NUMA node has not the room."""
        total = sum(s.nbytes for s in specs)
        root = self.root(total)
        step = self.block(root)
        missing = [s for s in specs if not (root / s.name).exists()]
        need = sum(_round_up(s.nbytes, step) for s in missing)
        stale = {p for s in missing for p in stale_versions(root, s.name)}
        free = self.free(root) + sum(p.stat().st_size for p in stale if p.exists())
        if need > free:
            gib = -(-need // (1 << 30))
            raise SharedSpaceError(
                f"shared tables need {need} bytes ({gib} GiB) in {root}, which has {free} free; "
                f"give it room (Docker: --shm-size={gib + 1}g / compose shm_size; Kubernetes: an "
                f"emptyDir {{medium: Memory, sizeLimit: {gib + 1}Gi}} volume) or pass "
                "--shared-tables-dir DIR on a filesystem with room"
            )
        if self.numa_choice is not None and self.numa_choice.node is not None:
            numa.check_room(self.numa_choice.node, need, self.sys_root)
        return root

    def open(
        self, root: Path, spec: TableSpec, fill: Callable[[SharedBuffer], None]
    ) -> SharedBuffer:
        """The table mapped from ``root``: attached when READY, else loaded by ``fill`` under
        the table's lock (waiting for another loader, then attaching to what it made)."""
        final = root / spec.name
        buf = self._attach(final, spec)
        if buf is not None:
            return buf
        with open(root / (family(spec.name) + ".lock"), "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            buf = self._attach(final, spec)
            if buf is not None:
                return buf
            for stale in root.glob(family(spec.name) + "-*.tmp-*"):  # a loader died mid-load
                stale.unlink(missing_ok=True)
            for old in stale_versions(root, spec.name):  # their space is what we need
                log.info("shared table %s: removing %s (the checkpoint changed)", spec.name, old)
                old.unlink(missing_ok=True)
            tmp = root / f"{spec.name}.tmp-{os.getpid()}"
            size = _round_up(spec.nbytes, self.block(root))
            node = self.numa_choice.node if self.numa_choice else None
            try:
                fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
                try:
                    os.ftruncate(fd, size)
                finally:
                    os.close(fd)
                buf = SharedBuffer(tmp, spec.nbytes, self.huge_pages)  # huge-page advice first
                buf.numa = self.numa_choice
                if node is not None:
                    try:  # the file's own policy: its pages go (and come back from swap) there
                        numa.bind_range(buf.ptr, buf.span, node)
                    except OSError as e:
                        log.warning("shared table %s: mbind refused (%s)", spec.name, e)
                reserve(buf, node, final)
                fill(buf)
                buf.path = final
                os.rename(tmp, final)  # READY: complete, under its final name
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
        self.loaded.append(spec.name)
        log.info("shared table %s: loaded into %s%s", spec.name, root, self._where(buf))
        return buf

    def _where(self, buf: SharedBuffer, huge: bool = True) -> str:
        """Where ``buf`` sits, for the log; ``huge``: with its huge-page bytes (reads smaps:
        tens of ms in a process with torch, so an attach leaves it to /v1/offload)."""
        choice = buf.numa or numa.NumaChoice(None, "not bound")
        node = "no NUMA node" if choice.node is None else f"NUMA node {choice.node}"
        counts = numa.pages_by_node(buf.ptr, buf.nbytes)
        pages = ", ".join(f"node {k}: {v}" for k, v in sorted(counts.items()))
        where = f" on {node} ({choice.why}; sampled pages {pages})"
        if huge:
            where += f"; {buf.huge_bytes()} bytes in huge pages ({buf.shmem_huge})"
        return where

    def _attach(self, final: Path, spec: TableSpec) -> SharedBuffer | None:
        if not final.exists():
            return None
        buf = SharedBuffer(final, spec.nbytes, self.huge_pages)
        buf.numa = self.numa_choice
        self.attached.append(spec.name)
        where = self._where(buf, huge=False)
        log.info("shared table %s: attached (no load) from %s%s", spec.name, final.parent, where)
        return buf


def mapping_pss(pid: int, path: str | Path) -> int:
    """Proportional set size, in bytes, of process ``pid``'s mappings of file ``path``."""
    want, total, inside = str(path), 0, False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            parts = line.split()
            if parts and "-" in parts[0] and len(parts) >= 5 and ":" in parts[3]:
                inside = len(parts) >= 6 and parts[5] == want
            elif inside and line.startswith("Pss:"):
                total += int(parts[1]) * 1024
    return total
