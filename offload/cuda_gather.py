"""The two CUDA prefetch paths: staged (CPU gather + one H2D copy) and UVA (zero-copy).

Both issue work on one side stream per prefetcher and hand each layer a CUDA event; the
compute stream waits on that event right before the Engram layer, the step's only sync point.
Timing uses CUDA events and is read once, in ``close()``, after the step's logits are done.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from .plan import GatherError, LayerPlan, LookupPlan
from .prefetch import PendingRows, Prefetcher


def _event() -> torch.cuda.Event:
    return torch.cuda.Event(enable_timing=True)


class _CudaPending(PendingRows):
    def __init__(self, pf: _CudaPrefetcher, plan: LookupPlan, index: dict) -> None:
        super().__init__(pf, plan, index)
        self.compute = torch.cuda.current_stream(pf.device)
        self.step_start = _event()
        self.step_start.record(self.compute)
        self.issued = {lid: threading.Event() for lid in plan.layers}
        self.started: dict[int, torch.cuda.Event] = {}
        self.ready: dict[int, torch.cuda.Event] = {}
        self.need: dict[int, torch.cuda.Event] = {}
        self.out: dict[int, torch.Tensor] = {}
        self.errors: dict[int, BaseException] = {}
        self.host_s: dict[int, float] = {}

    def _wait(self, layer_id: int) -> torch.Tensor:
        # Mark the moment compute needs the rows before any host wait, so the gap between
        # "need" and "ready" on the device timeline is the stall, whoever caused it.
        need = _event()
        need.record(self.compute)
        self.need[layer_id] = need
        if not self.issued[layer_id].wait(self.pf.timeout_s):
            raise GatherError(layer_id, f"rows not issued after {self.pf.timeout_s:.0f}s")
        if layer_id in self.errors:
            e = self.errors[layer_id]
            raise GatherError(layer_id, f"gather failed: {type(e).__name__}: {e}") from e
        self.compute.wait_event(self.ready[layer_id])
        out = self.out.pop(layer_id)
        out.record_stream(self.compute)
        return out

    def _finish(self) -> None:
        end = _event()
        end.record(self.compute)
        end.synchronize()
        self.stats.step_s = self.step_start.elapsed_time(end) / 1e3
        for lid, st in self.stats.layers.items():
            if lid not in self.ready or lid not in self.need:
                continue
            self.ready[lid].synchronize()
            gap = self.need[lid].elapsed_time(self.ready[lid]) / 1e3  # > 0: compute waited
            st.stall_s, st.slack_s = max(0.0, gap), max(0.0, -gap)
            st.prefetch_s = self.host_s.get(lid, 0.0)
            st.prefetch_s += self.started[lid].elapsed_time(self.ready[lid]) / 1e3


class _CudaPrefetcher(Prefetcher):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.device.type != "cuda":
            raise ValueError(f"gather {self.name!r} needs a CUDA device, got {self.device}")
        self.side = torch.cuda.Stream(self.device)

    def _issue_copy(self, pending: _CudaPending, lp: LayerPlan, make) -> None:
        """Run make() on the side stream between timing events; errors go to the layer."""
        lid = lp.layer_id
        try:
            with torch.cuda.stream(self.side):
                pending.started[lid] = _event()
                pending.started[lid].record(self.side)
                pending.out[lid] = make()
                pending.ready[lid] = _event()
                pending.ready[lid].record(self.side)
        except BaseException as e:
            pending.errors[lid] = e
        pending.issued[lid].set()


class UvaGather(_CudaPrefetcher):
    """Device gather reading the mapped pinned table directly over PCIe."""

    name = "uva"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.views = {lid: t.device_view(self.device) for lid, t in self.store.tables.items()}

    def gather_layer(self, lp: LayerPlan, idx: torch.Tensor) -> torch.Tensor:
        return torch.index_select(self.views[lp.layer_id], 0, idx)

    def start(self, plan, index=None, uploaded=None):
        pending = _CudaPending(self, plan, index if index is not None else self.plan_index(plan))
        if uploaded is not None:  # the step's indices are still being copied on compute
            self.side.wait_event(uploaded)
        for lid, lp in plan.layers.items():
            idx = pending.index[f"fetch{lid}"]
            idx.record_stream(self.side)  # read here; allocated on the compute stream
            self._issue_copy(pending, lp, lambda lp=lp, idx=idx: self.gather_layer(lp, idx))
        return pending


class StagedGather(_CudaPrefetcher):
    """CPU gather into pinned staging (double-buffered per layer), then one H2D copy."""

    name = "staged"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="engram-staging")
        self._staging: dict[int, list[torch.Tensor | None]] = {lid: [] for lid in self.store.tables}
        self._staging_free: dict[int, list[torch.cuda.Event | None]] = {
            lid: [None, None] for lid in self.store.tables
        }
        self._turn = 0

    def _staging_buffer(self, lid: int, slot: int, rows: int) -> torch.Tensor:
        bufs = self._staging[lid]
        table = self.store[lid].tensor
        while len(bufs) <= slot:
            bufs.append(None)
        have = 0 if bufs[slot] is None else bufs[slot].shape[0]
        if have < rows:  # grow geometrically; pinned allocations are slow
            size = max(rows, 2 * have, 1024)
            bufs[slot] = torch.empty((size, table.shape[1]), dtype=table.dtype).pin_memory()
        return bufs[slot]

    def gather_layer(self, lp: LayerPlan, slot: int) -> torch.Tensor:
        """Host side: wait until the slot's last copy finished, gather into it."""
        lid = lp.layer_id
        guard = self._staging_free[lid][slot]
        if guard is not None:
            guard.synchronize()  # the previous H2D copy from this slot has completed
        buf = self._staging_buffer(lid, slot, lp.fetch.size)
        return self.gather_host(lp, out=buf)

    def _work(self, pending: _CudaPending, slot: int) -> None:
        for lp in pending.plan.layers.values():
            lid = lp.layer_id
            t = time.perf_counter()
            try:
                staged = self.gather_layer(lp, slot)
            except BaseException as e:
                pending.errors[lid] = e
                pending.issued[lid].set()
                continue
            pending.host_s[lid] = time.perf_counter() - t
            self._issue_copy(pending, lp, lambda s=staged: s.to(self.device, non_blocking=True))
            if lid in pending.ready:
                self._staging_free[lid][slot] = pending.ready[lid]

    def start(self, plan, index=None, uploaded=None):
        pending = _CudaPending(self, plan, index if index is not None else self.plan_index(plan))
        slot, self._turn = self._turn, self._turn ^ 1
        self._pool.submit(self._work, pending, slot)
        return pending

    def close(self) -> None:
        self._pool.shutdown(wait=True)
