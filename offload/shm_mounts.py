"""The filesystems shared tables can live on: /dev/shm, hugetlbfs mounts, their free space and
whether their files may get huge pages."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from .hostmem import thp_mode

SHM = Path("/dev/shm")
MOUNTS = Path("/proc/mounts")
SHMEM_ENABLED = Path("/sys/kernel/mm/transparent_hugepage/shmem_enabled")


def statvfs_free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def hugetlbfs_mounts(mounts: Path = MOUNTS) -> list[Path]:
    try:
        lines = mounts.read_text().splitlines()
    except OSError:
        return []
    return [Path(p[1]) for p in (ln.split() for ln in lines) if len(p) > 2 and p[2] == "hugetlbfs"]


def shmem_huge(root: Path, mounts: Path = MOUNTS, enabled: Path = SHMEM_ENABLED) -> str:
    """Whether files under ``root`` may get huge pages: 'hugetlbfs', or the tmpfs mount's
    ``huge=`` option (never, always, within_size, advise: only a mapping that asks), which the
    system's shmem setting 'force' or 'deny' overrides; 'none' for other filesystems."""
    try:
        lines = [ln.split() for ln in mounts.read_text().splitlines()]
    except OSError:
        lines = []
    best: list[str] | None = None
    for p in lines:  # the longest mount point holding root
        if len(p) > 3 and (root == Path(p[1]) or Path(p[1]) in root.parents):
            if best is None or len(p[1]) >= len(best[1]):
                best = p
    if best is None or best[2] not in ("tmpfs", "hugetlbfs"):
        return "none"
    if best[2] == "hugetlbfs":
        return "hugetlbfs"
    system = thp_mode(enabled)
    if system in ("force", "deny"):
        return "always" if system == "force" else "never"
    opts = dict(o.partition("=")[::2] for o in best[3].split(","))
    return opts.get("huge", "never")


def default_dir(need: int, free: Callable[[Path], int] = statvfs_free) -> Path:
    """A writable hugetlbfs mount with room for ``need`` bytes, else /dev/shm."""
    for mount in hugetlbfs_mounts():
        try:
            if os.access(mount, os.W_OK) and free(mount) >= need:
                return mount
        except OSError:
            continue
    return SHM
