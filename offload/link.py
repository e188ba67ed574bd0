"""The link ceiling: how fast one large copy moves from host memory to where compute runs.

The server measures it at start-up (a Prometheus gauge); ``engram-bench`` measures it in the
same run as its gathers and reports every row's GB/s against it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LinkCeiling:
    label: str  # what was copied, for the report: the CPU figure is not a PCIe link
    bytes: int
    seconds: float  # best of the repeats

    @property
    def bytes_per_s(self) -> float:
        return self.bytes / self.seconds

    @property
    def gbps(self) -> float:
        return self.bytes_per_s / 1e9


def best_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Fastest of ``repeats`` host-clocked calls of ``fn``, after one untimed warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def measure_link(device: torch.device | str, nbytes: int, repeats: int = 5) -> LinkCeiling:
    """A large pinned host-to-device copy on CUDA (timed with CUDA events), a large host memcpy
    on CPU (there is no link there; memory bandwidth stands in)."""
    device = torch.device(device)
    nbytes = max(1, nbytes)
    if device.type != "cuda":
        src = torch.ones(nbytes, dtype=torch.uint8)  # touched pages, not the shared zero page
        dst = torch.empty_like(src)
        seconds = best_seconds(lambda: dst.copy_(src), repeats)
        return LinkCeiling("host memcpy (CPU, no PCIe link)", nbytes, seconds)
    src = torch.ones(nbytes, dtype=torch.uint8).pin_memory()
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst.copy_(src, non_blocking=True)  # warm-up
    torch.cuda.synchronize(device)
    best = float("inf")
    stream = torch.cuda.current_stream(device)  # events on the copy's own device's stream
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        dst.copy_(src, non_blocking=True)
        end.record(stream)
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return LinkCeiling("pinned host-to-device copy (CUDA events)", nbytes, best)


def measure_copy_bandwidth(
    device: torch.device | str, nbytes: int = 256 << 20, repeats: int = 3
) -> float:
    """Bytes/s of the link ceiling (the server's start-up figure)."""
    return measure_link(device, nbytes, repeats).bytes_per_s
