"""Which device, tier and gather path a run uses, and the prefetcher that implements it.

One resolver for every entry point (server flags, the benchmark, tests): ``resolve`` turns
what the user asked for (each may be None for "the default") into a working combination, or
raises ValueError with a one-line reason and the fix, before anything is loaded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .accounting import Accountant
from .autoselect import AutoGather
from .cuda_gather import StagedGather, UvaGather
from .prefetch import Prefetcher, ResidentGather, WorkerGather
from .store import Placement, TableStore, check_placement, cupy_ok

GATHERS = ("auto", "resident", "worker", "staged", "uva")


def cores() -> int:
    """CPU cores this process may run on (its affinity: a container's cpuset, taskset)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


PREFETCHERS: dict[str, type[Prefetcher]] = {
    "resident": ResidentGather,
    "worker": WorkerGather,
    "staged": StagedGather,
    "uva": UvaGather,
    "auto": AutoGather,
}

__all__ = [
    "GATHERS",
    "OffloadPath",
    "Placement",
    "SettingError",
    "make_prefetcher",
    "resolve",
    "valid_gathers",
]


FILE_PLACEMENT = "file"  # rows stay in the checkpoint's file, a DRAM cache in the host tier


class SettingError(ValueError):
    """A setting that cannot work here; the message starts with the flag that set it."""

    def __init__(self, flag: str, message: str) -> None:
        super().__init__(f"--{flag}: {message}")
        self.flag = flag


def valid_gathers(placement: Placement) -> tuple[str, ...]:
    return {
        Placement.GPU: ("resident",),
        Placement.CPU: ("worker", "resident"),
        Placement.HOST: ("auto", "staged", "uva"),
    }[placement]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The compute device: CUDA when available unless told otherwise."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise SettingError("device", f"{device} is not a device; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SettingError("device", f"{device} needs CUDA, which this machine or torch lacks")
    if dev.type not in ("cpu", "cuda"):
        raise SettingError("device", f"{device}: only cpu and cuda devices are supported")
    return dev


def default_placement(device: torch.device) -> Placement:
    """Offloaded wherever CUDA is present (the product's point); plain host memory otherwise."""
    if device.type == "cuda":
        return Placement.HOST if cupy_ok() else Placement.GPU
    return Placement.CPU


def resolve_gather(placement: Placement, gather: str) -> str:
    """The path ``gather`` stands for on ``placement``. 'auto' on the host tier is the measured
    staged/UVA switch. On plain host memory the worker thread only pays off with a core to
    itself: when torch's threads already take every core, its rows are never late (no stall)
    but the hand-off costs a few percent of a small-batch decode step (engram-bench, committed
    CPU results), so 'auto' gathers inline there."""
    if gather not in GATHERS:
        raise ValueError(f"unknown gather path {gather!r}; use one of {', '.join(GATHERS)}")
    allowed = valid_gathers(placement)
    if gather == "auto" and placement is Placement.CPU:
        spare_core = torch.get_num_threads() < cores()
        return "worker" if spare_core else "resident"
    if gather == "auto":
        return allowed[0]
    if gather not in allowed:
        raise ValueError(
            f"gather {gather!r} does not work with placement {placement.value!r}; "
            f"use one of {', '.join(dict.fromkeys(('auto', *allowed)))}"
        )
    return gather


@dataclass(frozen=True)
class OffloadPath:
    device: torch.device
    placement: Placement
    gather: str  # resolved: never 'auto' except the host tier's measured switch


def resolve(
    device: str | torch.device | None = None,
    placement: str | Placement | None = None,
    gather: str = "auto",
) -> OffloadPath:
    """The combination to run, or :class:`SettingError` naming the flag to change."""
    dev = resolve_device(device)
    if placement == FILE_PLACEMENT:  # the file tier's DRAM cache is this device's host tier
        placement = Placement.HOST if dev.type == "cuda" else Placement.CPU
    try:
        tier = Placement.parse(placement) if placement else default_placement(dev)
        check_placement(tier, dev)
    except ValueError as e:
        raise SettingError("placement", str(e)) from None
    try:
        return OffloadPath(dev, tier, resolve_gather(tier, gather))
    except ValueError as e:
        raise SettingError("gather", str(e)) from None


def make_prefetcher(
    store: TableStore,
    gather: str,
    device: torch.device | str,
    dedup: bool = False,
    accountant: Accountant | None = None,
    timeout_s: float = 60.0,
    host_threads: int | None = None,
    uva_programs: int | None = None,
) -> Prefetcher:
    device = torch.device(device)
    path = resolve(device, store.placement, gather)
    cls = PREFETCHERS[path.gather]
    return cls(
        store,
        device,
        dedup=dedup,
        accountant=accountant,
        timeout_s=timeout_s,
        host_threads=host_threads,
        uva_programs=uva_programs,
    )
