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
with one line giving the bytes needed and where to get them.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import mmap
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .hostmem import HUGE_PAGE, HostBuffer, thp_mode

log = logging.getLogger(__name__)

SHM = Path("/dev/shm")
MOUNTS = Path("/proc/mounts")
SUBDIR = "engram-serve"
SUFFIX = ".rows"


class SharedSpaceError(ValueError):
    """The shared directory cannot hold the tables (one line: bytes needed and the fix)."""


def statvfs_free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def hugetlbfs_mounts(mounts: Path = MOUNTS) -> list[Path]:
    try:
        lines = mounts.read_text().splitlines()
    except OSError:
        return []
    return [Path(p[1]) for p in (ln.split() for ln in lines) if len(p) > 2 and p[2] == "hugetlbfs"]


def default_dir(need: int, free: Callable[[Path], int] = statvfs_free) -> Path:
    """A writable hugetlbfs mount with room for ``need`` bytes, else /dev/shm."""
    for mount in hugetlbfs_mounts():
        try:
            if os.access(mount, os.W_OK) and free(mount) >= need:
                return mount
        except OSError:
            continue
    return SHM


def table_name(path: str | Path, key: str, stored: str, shape: tuple[int, ...]) -> str:
    """The shared file's name for tensor ``key`` of the checkpoint file at ``path``, stored as
    ``stored`` (e.g. 'fp8', 'torch.bfloat16') in ``shape``: ``<family>-<version>.rows``, where
    the family is the file, tensor and row layout, and the version the file's size and mtime."""
    p = Path(path).resolve()
    st = p.stat()
    where = hashlib.sha256(f"{p}|{key}|{stored}|{list(shape)}".encode()).hexdigest()[:8]
    version = hashlib.sha256(f"{where}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return f"{p.parent.name}-{key.replace('/', '_')}-{where}-{version}{SUFFIX}"


def family(name: str) -> str:
    """A table name less its version: every version of one tensor of one checkpoint file."""
    return name.removesuffix(SUFFIX).rsplit("-", 1)[0]


def stale_versions(root: Path, name: str) -> list[Path]:
    """Other versions of ``name``'s table (the checkpoint changed since they were loaded).
    Unlinking them is safe: an engine that still maps one keeps its pages until it exits."""
    return [p for p in root.glob(family(name) + "-*" + SUFFIX) if p.name != name]


def _round_up(n: int, to: int) -> int:
    return -(-max(n, 1) // to) * to


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

    def describe(self) -> dict:
        return {**super().describe(), "path": str(self.path)}


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

    def check_space(self, specs: list[TableSpec]) -> Path:
        """The directory, after refusing (SharedSpaceError) tables that will not fit."""
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
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                try:  # reserve the pages now: a full tmpfs fails here, not as SIGBUS later
                    os.posix_fallocate(fd, 0, size)
                except OSError as e:
                    raise SharedSpaceError(
                        f"cannot reserve {size} bytes for {final} ({e.strerror}); give the "
                        "shared directory room (Docker shm_size, a Kubernetes memory-medium "
                        "emptyDir) or pass --shared-tables-dir DIR"
                    ) from None
            finally:
                os.close(fd)
            try:
                buf = SharedBuffer(tmp, spec.nbytes, self.huge_pages)
                fill(buf)
                buf.path = final
                os.rename(tmp, final)  # READY: complete, under its final name
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
        self.loaded.append(spec.name)
        log.info("shared table %s: loaded into %s", spec.name, root)
        return buf

    def _attach(self, final: Path, spec: TableSpec) -> SharedBuffer | None:
        if not final.exists():
            return None
        buf = SharedBuffer(final, spec.nbytes, self.huge_pages)
        self.attached.append(spec.name)
        log.info("shared table %s: attached (no load) from %s", spec.name, final.parent)
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


def load_shared(
    shared: SharedTables,
    path: str | Path,
    plans: dict,
    placement,
    device: torch.device,
    chunk_rows: int,
    progress: bool,
):
    """``plans``: {layer: (TableSource, row dtype, fp8)} -> ({layer: Table}, LoadStats): each
    table attached from the shared directory or loaded into it (see ``SharedTables.open``)."""
    import time

    from .rowformat import RowFormat
    from .store import Placement, Table
    from .table_load import LoadStats, load_tables

    start = time.perf_counter()
    layouts, specs = {}, []
    for lid, (src, out, fp8) in plans.items():
        fmt = RowFormat("fp8", src.fmt.values) if fp8 else None
        shape = (src.rows, fmt.row_bytes) if fp8 else (src.rows, src.fmt.values)
        dtype = torch.uint8 if fp8 else out
        spec = TableSpec(
            table_name(path, src.key, "fp8" if fp8 else str(dtype), shape), dtype, shape
        )
        layouts[lid] = (fmt, out if fp8 else None, spec)
        specs.append(spec)
    root = shared.check_space(specs)
    tables, moved = {}, 0
    for lid, (fmt, row_dtype, spec) in layouts.items():
        src = plans[lid][0]

        def fill(buf: SharedBuffer, lid=lid, fmt=fmt, row_dtype=row_dtype, spec=spec, src=src):
            t = Table(lid, buf.view(spec.dtype, spec.shape), placement, buf, fmt, row_dtype)
            load_tables(str(path), {lid: src}, {lid: t}, chunk_rows, progress=progress)

        before = len(shared.loaded)
        buf = shared.open(root, spec, fill)
        moved += spec.nbytes if len(shared.loaded) > before else 0
        if placement is Placement.HOST:
            buf.register(device)
        tables[lid] = Table(lid, buf.view(spec.dtype, spec.shape), placement, buf, fmt, row_dtype)
    return tables, LoadStats(moved, time.perf_counter() - start)
