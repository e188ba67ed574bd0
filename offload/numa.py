"""NUMA placement of shared tables: the node of the GPU that reads them, and binding pages there.

A GPU's node is its PCI device's ``numa_node`` in sysfs (-1: the platform does not say). Pages
are placed before any is allocated: ``mbind(MPOL_BIND)`` on the table's fresh mapping (for a
tmpfs file that is the file's own policy, which every process mapping it shares), and this
thread's policy bound to the node while the pages are reserved (``bound``), which covers the
posix_fallocate fallback too. No libnuma: only the raw syscalls. Every function takes the sysfs
root, so tests describe multi-node machines with a fake tree.

Where the engines of one machine sit on several nodes, each node gets its own copy of a table
(its name carries the node, as SGLang keeps one copy per NUMA node): an engine reads only local
memory, and engines of one node share one copy. A node without room for its copies is refused
in one line before anything loads.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

SYS = Path("/sys")
MPOL_DEFAULT, MPOL_BIND = 0, 2
MPOL_F_NODE, MPOL_F_ADDR = 1, 2
# (mbind, set_mempolicy, get_mempolicy) syscall numbers
SYSCALLS = {"x86_64": (237, 238, 239), "aarch64": (235, 237, 236)}
POLICIES = "auto, off or a node number"


class NumaRoomError(ValueError):
    """A NUMA node cannot hold the tables placed on it (one line: bytes needed and the fix)."""


@dataclass
class NumaChoice:
    """Where one engine's shared tables go: ``node`` None means no binding (first touch)."""

    node: int | None
    why: str

    def describe(self) -> dict:
        return {"node": self.node, "why": self.why}


def parse_policy(policy: str) -> str:
    """'auto', 'off' or a node number; ValueError naming the flag otherwise."""
    if policy in ("auto", "off") or policy.isdigit():
        return policy
    raise ValueError(f"--shared-tables-numa {policy!r}: use {POLICIES}")


def online_nodes(sys_root: Path = SYS) -> list[int]:
    """The online NUMA nodes ('0-1,3' in sysfs), [0] where sysfs does not say."""
    try:
        text = (sys_root / "devices/system/node/online").read_text().strip()
    except OSError:
        return [0]
    nodes: list[int] = []
    for part in filter(None, text.split(",")):
        lo, _, hi = part.partition("-")
        nodes.extend(range(int(lo), int(hi or lo) + 1))
    return nodes or [0]


def node_free(node: int, sys_root: Path = SYS) -> int | None:
    """MemFree of ``node`` in bytes (its sysfs meminfo), None where unreadable."""
    try:
        text = (sys_root / f"devices/system/node/node{node}/meminfo").read_text()
    except OSError:
        return None
    m = re.search(rf"^Node {node} MemFree:\s+(\d+) kB", text, re.M)
    return int(m.group(1)) * 1024 if m else None


def pci_bus_id(index: int) -> str | None:
    """The PCI address ('0000:3b:00.0') of CUDA device ``index``, None when unknown."""
    try:
        p = torch.cuda.get_device_properties(index)
        bus = getattr(p, "pci_bus_id", None)
        if bus is not None:
            dom, dev = getattr(p, "pci_domain_id", 0), getattr(p, "pci_device_id", 0)
            return f"{dom:04x}:{bus:02x}:{dev:02x}.0"
        import cupy

        return cupy.cuda.runtime.deviceGetPCIBusId(index).lower()
    except Exception:  # no CUDA, no CuPy, an old torch: the node stays unknown
        return None


def sysfs_bus_id(bus_id: str) -> str:
    """``bus_id`` as sysfs names it: '0000:3b:00.0' (CUDA may write '3B:00.0' or an 8-digit
    domain, '00000000:3B:00.0')."""
    parts = bus_id.lower().split(":")
    if len(parts) == 2:
        parts = ["0000", *parts]
    return ":".join([parts[0][-4:].rjust(4, "0"), *parts[1:]])


def gpu_node(bus_id: str, sys_root: Path = SYS) -> int | None:
    """The NUMA node of the PCI device ``bus_id``; None where it reports -1 or nothing."""
    bus_id = sysfs_bus_id(bus_id)
    try:
        node = int((sys_root / "bus/pci/devices" / bus_id / "numa_node").read_text())
    except (OSError, ValueError):
        return None
    return node if node >= 0 else None


def choose(
    policy: str,
    device: torch.device,
    sys_root: Path = SYS,
    bus_id: Callable[[int], str | None] = pci_bus_id,
) -> NumaChoice:
    """The node for ``device``'s shared tables under ``policy`` (see :func:`parse_policy`)."""
    policy = parse_policy(policy)
    nodes = online_nodes(sys_root)
    if policy == "off":
        return NumaChoice(None, "--shared-tables-numa off")
    if policy.isdigit():
        node = int(policy)
        if node not in nodes:
            raise ValueError(
                f"--shared-tables-numa {node}: no such NUMA node (online: "
                f"{','.join(map(str, nodes))}); use {POLICIES}"
            )
        return NumaChoice(node, f"--shared-tables-numa {node}")
    if device.type != "cuda":
        return NumaChoice(None, f"a {device.type} engine: pages where they are first touched")
    index = device.index if device.index is not None else 0
    bus = bus_id(index)
    bus = sysfs_bus_id(bus) if bus else None
    node = gpu_node(bus, sys_root) if bus else None
    if node is None:
        return NumaChoice(None, f"cuda:{index} reports no NUMA node")
    return NumaChoice(node, f"the node of cuda:{index} ({bus})")


def check_room(node: int, need: int, sys_root: Path = SYS) -> None:
    """NumaRoomError when ``node`` has less than ``need`` bytes free (unknown: no check)."""
    free = node_free(node, sys_root)
    if need and free is not None and need > free:
        gib = -(-need // (1 << 30))
        raise NumaRoomError(
            f"shared tables need {need} bytes ({gib} GiB) on NUMA node {node}, which has {free} "
            f"free; free memory on that node, pass --shared-tables-numa N for a node with room, "
            "or --shared-tables-numa off (one copy, pages wherever they land)"
        )


def _syscalls() -> tuple[int, int, int] | None:
    return SYSCALLS.get(platform.machine())


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _mask(node: int) -> tuple[ctypes.Array, int]:
    words = node // 64 + 1
    mask = (ctypes.c_ulong * words)()
    mask[node // 64] = 1 << (node % 64)
    return mask, words * 64 + 1  # maxnode counts one past the last bit, as libnuma passes


MASK_WORDS = 16  # room for 1024 nodes when reading a policy back


def thread_policy() -> tuple[int, ctypes.Array]:
    """This thread's memory policy (mode with its flags, node mask), to put back later."""
    nums = _syscalls()
    mode, mask = ctypes.c_int(MPOL_DEFAULT), (ctypes.c_ulong * MASK_WORDS)()
    if nums is not None:
        maxnode = ctypes.c_ulong(MASK_WORDS * 64 + 1)
        where = (ctypes.c_ulong(0), ctypes.c_ulong(0))
        rc = _libc().syscall(ctypes.c_long(nums[2]), ctypes.byref(mode), mask, maxnode, *where)
        if rc != 0:
            return MPOL_DEFAULT, mask
    return mode.value, mask


def set_thread_policy(mode: int, mask: ctypes.Array | None = None) -> None:
    """This thread's memory policy: ``mode`` (with its flags) over the nodes in ``mask``.
    OSError when the kernel refuses (some container seccomp profiles allow memory policies
    only with CAP_SYS_NICE)."""
    nums = _syscalls()
    if nums is None:
        raise OSError(f"NUMA binding is not wired for {platform.machine()}")
    maxnode = ctypes.c_ulong(len(mask) * 64 + 1 if mask is not None else 0)
    rc = _libc().syscall(ctypes.c_long(nums[1]), ctypes.c_int(mode), mask, maxnode)
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"set_mempolicy: {os.strerror(err)}")


def bind_range(ptr: int, nbytes: int, node: int) -> None:
    """mbind(MPOL_BIND) the mapping [ptr, ptr + nbytes) to ``node``. On a tmpfs file this is
    the file's own policy (every process mapping it sees it, /proc/PID/numa_maps says
    'bind:N'), so a page that is swapped out and in again comes back to the node."""
    nums = _syscalls()
    if nums is None:
        raise OSError(f"NUMA binding is not wired for {platform.machine()}")
    mask, maxnode = _mask(node)
    args = (ctypes.c_ulong(ptr), ctypes.c_ulong(nbytes), ctypes.c_int(MPOL_BIND), mask)
    rc = _libc().syscall(ctypes.c_long(nums[0]), *args, ctypes.c_ulong(maxnode), ctypes.c_uint(0))
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mbind: {os.strerror(err)}")


@contextlib.contextmanager
def bound(node: int | None) -> Iterator[None]:
    """Pages this thread allocates inside land on ``node``; the thread's own policy (say, from
    numactl) comes back after. Nothing changes for None."""
    if node is None:
        yield
        return
    mode, mask = thread_policy()
    set_thread_policy(MPOL_BIND, _mask(node)[0])
    try:
        yield
    finally:
        set_thread_policy(mode, None if mode == MPOL_DEFAULT else mask)


def page_node(addr: int) -> int | None:
    """The node of the page at ``addr`` (faulted in if it is not mapped yet), None on error."""
    nums = _syscalls()
    if nums is None:
        return None
    node = ctypes.c_int(-1)
    flags = MPOL_F_NODE | MPOL_F_ADDR
    where = (ctypes.c_ulong(addr), ctypes.c_ulong(flags))
    args = (ctypes.byref(node), None, ctypes.c_ulong(0), *where)
    rc = _libc().syscall(ctypes.c_long(nums[2]), *args)
    return node.value if rc == 0 else None


def pages_by_node(ptr: int, nbytes: int, samples: int = 64) -> dict[str, int]:
    """How many of ``samples`` pages spread over [ptr, ptr + nbytes) sit on each node."""
    step = max(nbytes // samples, 4096)
    counts: dict[str, int] = {}
    for addr in range(ptr, ptr + max(nbytes, 1), step):
        node = page_node(addr)
        key = "unknown" if node is None else str(node)
        counts[key] = counts.get(key, 0) + 1
    return counts
