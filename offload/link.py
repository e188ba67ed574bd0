"""The link ceiling: how fast one large copy moves from host memory to where compute runs."""

from __future__ import annotations

import time

import torch


def measure_copy_bandwidth(
    device: torch.device | str, nbytes: int = 256 << 20, repeats: int = 3
) -> float:
    """Bytes/s of a large pinned host-to-device copy (CUDA) or host memcpy (CPU); best of N."""
    device = torch.device(device)
    n = max(1, nbytes // 4)
    if device.type == "cuda":
        src = torch.empty(n, dtype=torch.float32).pin_memory()
        dst = torch.empty(n, dtype=torch.float32, device=device)
        dst.copy_(src, non_blocking=True)  # warm-up
        torch.cuda.synchronize(device)
        best = float("inf")
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src, non_blocking=True)
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) / 1e3)
        return n * 4 / best
    src, dst = torch.ones(n), torch.empty(n)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return n * 4 / best
