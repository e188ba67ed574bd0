"""How close a row's steps are to the hardware: bytes a step must read against peak memory
bandwidth, and (CUDA) the share of wall time the GPU is busy.

- peak bandwidth: a large device-to-device copy on CUDA (timed with CUDA events), a large
  memcpy on CPU; a copy reads and writes every byte, so it counts 2 x bytes per second;
- bytes a step must read: the backbone's weights (every parameter except an untied input
  embedding, of which a step reads only its tokens' rows), each sequence's KV context
  (``Job.kv_tokens_read``) and the Engram rows moved (the step log's bytes);
- GPU busy: the union of the device's kernel and copy intervals recorded by torch.profiler
  (CUPTI) over one extra untimed run, divided by the phase's median timed wall time. Close to
  1: the GPU is the bottleneck; far below: the host (Python, launches, syncs) is.
"""

from __future__ import annotations

import time

import torch

from models.llama import EngramForCausalLM


# --- peak memory bandwidth --------------------------------------------------------------------
def measure_memory_bandwidth(device: torch.device, nbytes: int, repeats: int = 5) -> dict:
    """Best of ``repeats`` copies of ``nbytes`` within the device's memory."""
    nbytes = max(1 << 20, nbytes)
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)  # touched, not the zero page
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up
    best = float("inf")
    if device.type == "cuda":
        stream = torch.cuda.current_stream(device)
        torch.cuda.synchronize(device)
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            dst.copy_(src)
            end.record(stream)
            end.synchronize()
            best = min(best, start.elapsed_time(end) / 1e3)
        label = "device-to-device copy (CUDA events), read + write"
    else:
        for _ in range(repeats):
            t = time.perf_counter()
            dst.copy_(src)
            best = min(best, time.perf_counter() - t)
        label = "host memcpy, read + write"
    del src, dst
    return {"label": label, "bytes": nbytes, "seconds": best, "gbps": 2 * nbytes / best / 1e9}


# --- bytes a step must read -------------------------------------------------------------------
def weight_bytes(model: EngramForCausalLM) -> int:
    """Parameters a step reads in full: all loaded ones (Engram tables are meta here: rows are
    counted as moved), less an untied input embedding."""
    total = sum(p.numel() * p.element_size() for p in model.parameters() if not p.is_meta)
    embed = model.model.embed_tokens.weight
    if embed is not model.lm_head.weight and not embed.is_meta:
        total -= embed.numel() * embed.element_size()
    return total


def kv_bytes_per_token(model: EngramForCausalLM) -> int:
    c = model.config
    itemsize = model.model.embed_tokens.weight.element_size()
    return c.num_hidden_layers * 2 * c.num_key_value_heads * c.head_dim * itemsize


def roofline(
    steps: int,
    seconds: float,
    weights: int,
    kv_bytes: int,
    engram_bytes: float,
    peak_gbps: float,
) -> dict:
    """One phase's bytes (per run) against its median wall time and the peak."""
    total = steps * weights + kv_bytes + engram_bytes
    gbps = total / seconds / 1e9 if seconds > 0 else None
    n = max(steps, 1)
    return {
        "bytes_per_step": total / n,
        "weight_bytes_per_step": float(weights),
        "kv_bytes_per_step": kv_bytes / n,
        "engram_bytes_per_step": engram_bytes / n,
        "gbps": gbps,
        "fraction_of_peak": gbps / peak_gbps if gbps is not None and peak_gbps > 0 else None,
    }


# --- GPU busy ---------------------------------------------------------------------------------
def union_seconds(intervals: list[tuple[float, float]]) -> float:
    """Total length covered by ``(start, end)`` intervals (overlaps counted once)."""
    total, cur_start, cur_end = 0.0, None, None
    for start, end in sorted(intervals):
        if cur_end is None or start > cur_end:
            if cur_end is not None:
                total += cur_end - cur_start
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    if cur_end is not None:
        total += cur_end - cur_start
    return total


def device_intervals(prof) -> list[tuple[float, float]]:
    """``(start, end)`` seconds of every device activity (kernels, copies, sets) a finished
    torch.profiler session recorded."""
    from torch.autograd import DeviceType

    results = getattr(prof.profiler, "kineto_results", None)
    if results is not None:  # the raw events: far faster than building FunctionEvents
        return [
            (e.start_ns() / 1e9, e.end_ns() / 1e9)
            for e in results.events()
            if e.device_type() == DeviceType.CUDA
        ]
    return [
        (e.time_range.start / 1e6, e.time_range.end / 1e6)
        for e in prof.events()
        if e.device_type == DeviceType.CUDA
    ]


class KernelTimer:
    """Device-busy seconds between ``start()`` and ``stop()`` (CUDA only; torch.profiler)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.prof = device, None

    def start(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        self.prof = profile(activities=[ProfilerActivity.CUDA])
        self.prof.start()

    def stop(self) -> float:
        torch.cuda.synchronize(self.device)
        self.prof.stop()
        busy = union_seconds(device_intervals(self.prof))
        self.prof = None
        return busy
