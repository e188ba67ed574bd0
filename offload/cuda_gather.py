"""The two CUDA prefetch paths: staged (threaded host gather + one H2D copy) and UVA (zero-copy).

Both issue work on one side stream per prefetcher and hand each layer a CUDA event; the
compute stream waits on that event right before the Engram layer, the step's only sync point.
Timing uses CUDA events, read once the device has run them (``book``/``flush``): closing a
step never waits for the device.

Rows land in per-layer device buffers that grow to the largest step seen and are then reused
(no allocator traffic on the side stream). Before a step writes them again the side stream
waits for the event the previous step recorded on the compute stream when it closed, so a
buffer is never overwritten while a layer may still read it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from .grid import ROWS as GRID_ROWS
from .grid import GridChoice, choose_grid, max_programs, sm_count
from .host_gather import ThreadedGather
from .plan import GatherError, LayerPlan, LookupPlan
from .prefetch import PendingRows, Prefetcher
from .store import Table
from .thread_names import name_os_thread
from .uva_kernel import gather_rows, gather_rows_fp8, triton_available

log = logging.getLogger(__name__)


def _event() -> torch.cuda.Event:
    return torch.cuda.Event(enable_timing=True)


def default_host_threads() -> int:
    """Host gather threads for the staged path: half the cores (the rest run the engine and
    torch), between 1 and 8."""
    return max(1, min(8, (os.cpu_count() or 2) // 2))


class GrownBuffers:
    """Grow-only buffers by key, ``[>= rows, *row_shape]`` of one dtype, pinned host memory or
    on ``device``. ``get`` returns the first ``rows`` rows."""

    def __init__(self, device: torch.device | None = None, pin: bool = False) -> None:
        self.device, self.pin = device, pin
        self._bufs: dict = {}

    def get(self, key, rows: int, row_shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        buf = self._bufs.get(key)
        if buf is None or buf.shape[1:] != row_shape or buf.dtype != dtype:
            buf = None
        if buf is None or buf.shape[0] < rows:  # grow geometrically: pinned allocations are slow
            size = max(rows, 2 * (0 if buf is None else buf.shape[0]), 1024)
            if self.pin:
                buf = torch.empty((size, *row_shape), dtype=dtype).pin_memory()
            else:
                buf = torch.empty((size, *row_shape), dtype=dtype, device=self.device)
            self._bufs[key] = buf
        return buf[:rows]

    def clear(self) -> None:
        self._bufs.clear()


def uva_gather(
    view: torch.Tensor,
    table: Table,
    idx: torch.Tensor,
    positions: torch.Tensor | None,
    out: torch.Tensor,
    max_programs: int | None,
    kernel: bool = True,
) -> torch.Tensor:
    """Rows ``idx`` of ``table`` read through ``view`` (its device-visible tensor) into ``out``
    (``[len(idx), width]`` of the table's row dtype), decoded, at ``positions`` when given (a
    sorted plan) else in order. ``kernel``: the Triton gather (fp8 dequantised in the kernel);
    else torch's index_select and dequantisation (the fallback without Triton)."""
    if kernel:
        gather = gather_rows_fp8 if table.fp8 else gather_rows
        return gather(view, idx, out, sort=False, positions=positions, max_programs=max_programs)
    rows = table.decode(torch.index_select(view, 0, idx))
    if positions is None:
        return out.copy_(rows)
    return out.index_copy_(0, positions, rows)


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
        self.end = _event()
        self.end.record(self.compute)
        self.pf.released = self.end  # the next step's gathers may reuse the row buffers after

    def read_timings(self) -> None:
        """Step, stall, slack and prefetch times from the events (all have completed)."""
        self.stats.step_s = self.step_start.elapsed_time(self.end) / 1e3
        for lid, st in self.stats.layers.items():
            if lid not in self.ready or lid not in self.need:
                continue
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
        self.released: torch.cuda.Event | None = None
        self._unbooked: deque[_CudaPending] = deque()

    def book(self, pending: _CudaPending) -> None:
        """Queue the step; book every queued step the device has finished (no host wait: a
        step's figures usually land one step later, after its tokens came back)."""
        self._unbooked.append(pending)
        self._book_done(wait=False)

    def flush(self) -> None:
        self._book_done(wait=True)

    def close(self) -> None:
        self.flush()

    def _book_done(self, wait: bool) -> None:
        while self._unbooked:
            pending = self._unbooked[0]
            if wait:
                pending.end.synchronize()
            elif not pending.end.query():
                return
            self._unbooked.popleft()
            pending.read_timings()
            self.accountant.record(pending.stats)

    def _order_side_stream(self, uploaded: torch.cuda.Event | None) -> None:
        """The side stream waits for the step's indices and for the last step's readers."""
        if uploaded is not None:
            self.side.wait_event(uploaded)
        else:  # indices copied without an event (e.g. by plan_index) on the compute stream
            self.side.wait_stream(torch.cuda.current_stream(self.device))
        if self.released is not None:
            self.side.wait_event(self.released)

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
    """Device gather reading the mapped pinned table directly over PCIe: the Triton kernel
    (:mod:`offload.uva_kernel`) on host-sorted rows, writing each row at its request position,
    fp8 rows dequantised as they are read; a persistent grid of ``max_programs`` programs,
    at most half the SMs, chosen by measuring it beside compute (:mod:`offload.grid`; ``grid``
    says what was measured) unless ``uva_programs`` fixes it."""

    name = "uva"
    places_rows = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.views = {lid: t.device_view(self.device) for lid, t in self.store.tables.items()}
        self.kernel = triton_available()
        if not self.kernel:
            log.warning(
                "triton is not importable: the UVA gather falls back to torch.index_select on "
                "the mapped table (several times slower on large gathers); install triton"
            )
        self.max_programs = self.uva_programs or max_programs(sm_count(self.device))
        self._out = GrownBuffers(self.device)
        self.grid: GridChoice | None = None
        if self.kernel:
            self._compile()
            if not self.uva_programs:
                self.grid = self._choose_grid()
                self.max_programs = self.grid.programs
                log.info("UVA gather grid: %d programs, %s", self.max_programs, self.grid.why)

    def _choose_grid(self) -> GridChoice:
        """The grid measured beside compute on the first table (random rows, sorted as a
        plan sends them)."""
        lid, t = next(iter(self.store.tables.items()))
        n = min(GRID_ROWS, max(1, t.rows))
        rows = np.random.default_rng(0).integers(0, t.rows, n)
        lp = LayerPlan(lid, rows, None, n, 1).sorted()
        idx = torch.from_numpy(lp.fetch).to(self.device)
        pos = torch.from_numpy(lp.positions).to(self.device)
        out = torch.empty((n, t.width), dtype=t.row_dtype, device=self.device)
        view = self.views[lid]

        def gather(programs: int) -> None:
            uva_gather(view, t, idx, pos, out, programs)

        with torch.cuda.device(self.device):
            return choose_grid(gather, self.device, rows=n)

    def _compile(self) -> None:
        """Compile the kernels for every table now (with and without positions), not in the
        first step that needs them."""
        with torch.cuda.device(self.device):
            for lid, t in self.store.tables.items():
                idx = torch.zeros(16, dtype=torch.int64, device=self.device)
                out = torch.empty((16, t.width), dtype=t.row_dtype, device=self.device)
                for pos in (None, torch.arange(16, device=self.device)):
                    uva_gather(self.views[lid], t, idx, pos, out, 1)
            torch.cuda.synchronize(self.device)

    def plan(self, row_ids) -> LookupPlan:
        return super().plan(row_ids).sorted()

    def gather_layer(
        self, lp: LayerPlan, idx: torch.Tensor, positions: torch.Tensor | None = None
    ) -> torch.Tensor:
        """One layer's rows on the current stream, into the layer's reused buffer (the host
        first waits for the layer's source rows: the file tier's reads)."""
        lp.wait_source()
        t = self.store[lp.layer_id]
        out = self._out.get(lp.layer_id, lp.fetch.size, (t.width,), t.row_dtype)
        view = self.views[lp.layer_id]
        return uva_gather(view, t, idx, positions, out, self.max_programs, self.kernel)

    def reset_buffers(self) -> None:
        self._out.clear()

    def start(self, plan, index=None, uploaded=None):
        pending = _CudaPending(self, plan, index if index is not None else self.plan_index(plan))
        self._order_side_stream(uploaded)
        for lid, lp in plan.layers.items():
            idx = pending.index[f"fetch{lid}"]
            pos = pending.index.get(f"positions{lid}")
            for t in (idx, pos):  # read here; allocated on the compute stream
                if t is not None:
                    t.record_stream(self.side)
            self._issue_copy(pending, lp, lambda lp=lp, i=idx, p=pos: self.gather_layer(lp, i, p))
        return pending


class StagedGather(_CudaPrefetcher):
    """Threaded host gather into pinned staging (double-buffered per layer), then one H2D copy
    per layer on the side stream; fp8 rows are dequantised there, after the copy."""

    name = "staged"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.threaded = ThreadedGather(self.host_threads or default_host_threads())
        self._pool = ThreadPoolExecutor(1, "engram-staging", name_os_thread)
        self._staging = GrownBuffers(pin=True)
        self._dev = GrownBuffers(self.device)
        self._staging_free: dict[int, list[torch.cuda.Event | None]] = {
            lid: [None, None] for lid in self.store.tables
        }
        self._turn = 0

    def gather_layer(self, lp: LayerPlan, slot: int) -> torch.Tensor:
        """Host side: wait until the slot's last copy finished, gather stored rows into it."""
        lid = lp.layer_id
        lp.wait_source()  # the file tier's reads of this layer's rows into the DRAM cache
        guard = self._staging_free[lid][slot]
        if guard is not None:
            guard.synchronize()  # the previous H2D copy from this slot has completed
        table = self.store[lid].tensor
        buf = self._staging.get((lid, slot), lp.fetch.size, tuple(table.shape[1:]), table.dtype)
        return self.threaded.gather(table, lp.fetch, buf)

    def copy_layer(self, lp: LayerPlan, staged: torch.Tensor) -> torch.Tensor:
        """Current stream: one copy into the layer's device buffer, then decode."""
        dev = self._dev.get(lp.layer_id, staged.shape[0], tuple(staged.shape[1:]), staged.dtype)
        dev.copy_(staged, non_blocking=True)
        return self.store[lp.layer_id].decode(dev)

    def gather_once(self, lp: LayerPlan) -> torch.Tensor:
        """One layer end to end on the current stream, waiting for the copy (measurements)."""
        rows = self.copy_layer(lp, self.gather_layer(lp, 0))
        torch.cuda.current_stream(self.device).synchronize()  # staging slot 0 is free again
        return rows

    def reset_buffers(self) -> None:
        self._staging.clear()
        self._dev.clear()

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
            self._issue_copy(pending, lp, lambda lp=lp, s=staged: self.copy_layer(lp, s))
            if lid in pending.ready:
                self._staging_free[lid][slot] = pending.ready[lid]

    def start(self, plan, index=None, uploaded=None):
        pending = _CudaPending(self, plan, index if index is not None else self.plan_index(plan))
        if self.released is not None:  # the host gather needs no device indices: no upload wait
            self.side.wait_event(self.released)
        slot, self._turn = self._turn, self._turn ^ 1
        self._pool.submit(self._work, pending, slot)
        return pending

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.threaded.close()
        super().close()
