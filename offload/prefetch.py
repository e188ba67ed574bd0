"""Prefetch paths: move a step's Engram rows to the compute side while earlier layers run.

One interface: ``plan(row_ids)`` builds the step's lookup plan on the host; the engine sends
its index arrays to the device with the rest of the step's inputs (one copy), then
``start(plan, index, uploaded)`` issues every layer's gather at once, before the forward pass.
The returned :class:`PendingRows` hands a layer its rows in ``rows(layer_id)``, waiting for that
layer only, and ``close()`` books the step. ``index`` maps ``fetch{layer}`` / ``inverse{layer}``
to device tensors; ``uploaded`` is the CUDA event of the copy that filled them (None when the
copy was synchronous, e.g. on the CPU, or when ``index`` is omitted and built here).

- ``resident``: table on the compute device; gathered in place when needed (the baseline).
- ``worker`` (no CUDA): a worker thread gathers layer after layer while the main thread runs
  the layers before; a layer waits on its own event.
- ``staged`` (CUDA): the worker gathers into pinned staging buffers (two per layer, reuse
  guarded by the CUDA event of the copy that last read them), then one host-to-device copy
  per layer on a side stream.
- ``uva`` (CUDA): the table is mapped pinned memory; a device gather on the side stream reads
  rows straight over PCIe. No host work, no host sync.

Rows come back as the model reads them: plain tables bit for bit, FP8 tables dequantised to
the table's ``row_dtype`` (in the UVA kernel while gathering; in torch after the gather on the
other paths). Bytes booked per step are the stored bytes moved (an fp8 row is about half a
bf16 row).

Device buffers made on the side stream and consumed on the compute stream are kept alive with
``record_stream(compute)``: when the compute side drops them, the caching allocator waits for
the compute stream's queued work before reusing the memory. (Events alone would order the
streams but not stop the allocator recycling a block the compute stream still reads.)
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from .accounting import Accountant, LayerStats, StepStats
from .plan import GatherError, LayerPlan, LookupPlan
from .store import TableStore
from .thread_names import name_os_thread


class PendingRows:
    """The rows of one step, per layer; also its accounting."""

    def __init__(self, pf: Prefetcher, plan: LookupPlan, index: dict[str, torch.Tensor]) -> None:
        self.pf, self.plan, self.index = pf, plan, index
        self.t0 = time.perf_counter()
        # a backbone without Engram layers has an empty plan (and no rows to book)
        num_tokens = next((lp.num_tokens for lp in plan.layers.values()), 0)
        self.stats = StepStats(num_tokens=num_tokens)
        for lid, lp in plan.layers.items():
            self.stats.layers[lid] = LayerStats(
                lid,
                pf.store[lid].placement.value,
                rows=lp.rows,
                fetched=lp.fetch.size,
                bytes=lp.fetch.size * pf.store[lid].row_bytes,
            )
        self.closed = False

    def rows(self, layer_id: int) -> torch.Tensor:
        lp = self.plan.layers[layer_id]
        out = self._wait(layer_id)
        if lp.positions is not None and not self.pf.places_rows:  # a sorted plan: unsort
            placed = torch.empty_like(out)
            placed[self.index[f"positions{layer_id}"].to(out.device)] = out
            out = placed
        if lp.inverse is not None:
            out = out[self.index[f"inverse{layer_id}"].to(out.device)]
        return out.view(lp.num_tokens, lp.heads, -1)

    def _wait(self, layer_id: int) -> torch.Tensor:
        raise NotImplementedError

    def close(self) -> StepStats:
        """The step's forward is issued: hand its figures to the accountant (idempotent). On
        CUDA they are read from events once the device has run them, without waiting here."""
        if not self.closed:
            self.closed = True
            for lid, lp in self.plan.layers.items():  # counted once the gathers are issued
                self.stats.layers[lid].unique_rows = lp.unique_rows
            self._finish()
            self.pf.book(self)
        return self.stats

    def _finish(self) -> None:
        self.stats.step_s = time.perf_counter() - self.t0


class Prefetcher:
    name = "base"
    places_rows = False  # True: the gather itself writes a sorted plan's rows in request order

    def __init__(
        self,
        store: TableStore,
        device: torch.device | str = "cpu",
        dedup: bool = False,
        accountant: Accountant | None = None,
        timeout_s: float = 60.0,
        host_threads: int | None = None,
        uva_programs: int | None = None,
    ) -> None:
        """``host_threads``: threads of the staged path's host gather (None: a default from the
        core count); ``uva_programs``: the UVA kernel's persistent grid (None: measured by
        'auto', else a multiple of the SM count). Paths that do not use them ignore them."""
        self.store, self.device, self.dedup = store, torch.device(device), dedup
        self.accountant = accountant or Accountant()
        self.timeout_s = timeout_s
        self.host_threads, self.uva_programs = host_threads, uva_programs
        self.table_rows = {lid: t.rows for lid, t in store.tables.items()}

    def plan(self, row_ids: dict[int, np.ndarray]) -> LookupPlan:
        return LookupPlan.build(row_ids, self.table_rows, self.dedup)

    def start(
        self,
        plan: LookupPlan,
        index: dict[str, torch.Tensor] | None = None,
        uploaded: torch.cuda.Event | None = None,
    ) -> PendingRows:
        raise NotImplementedError

    def plan_index(self, plan: LookupPlan) -> dict[str, torch.Tensor]:
        """The plan's index arrays on this device, copied here (tools and tests; the engine
        sends them with the step's single upload instead)."""
        return {k: torch.from_numpy(v).to(self.device) for k, v in plan.host_arrays().items()}

    def gather_host(self, lp: LayerPlan, out: torch.Tensor | None = None) -> torch.Tensor:
        """CPU gather of one layer's stored rows, not decoded (the worker path)."""
        table = self.store[lp.layer_id].tensor
        idx = torch.from_numpy(lp.fetch)
        if out is None:
            return torch.index_select(table, 0, idx)
        return torch.index_select(table, 0, idx, out=out[: idx.numel()])

    def book(self, pending: PendingRows) -> None:
        self.accountant.record(pending.stats)

    def flush(self) -> None:
        """Book every step whose figures are still pending (waits for the device)."""

    def close(self) -> None:
        pass


# --- resident -----------------------------------------------------------------------------
class _ResidentPending(PendingRows):
    def _wait(self, layer_id: int) -> torch.Tensor:
        table = self.pf.store[layer_id]
        t = time.perf_counter()
        try:
            self.plan.layers[layer_id].wait_source()
        except BaseException as e:
            raise GatherError(layer_id, f"gather failed: {type(e).__name__}: {e}") from e
        idx = self.index[f"fetch{layer_id}"].to(table.tensor.device)
        out = table.decode(torch.index_select(table.tensor, 0, idx))
        self.stats.layers[layer_id].prefetch_s = time.perf_counter() - t
        return out


class ResidentGather(Prefetcher):
    name = "resident"

    def start(self, plan, index=None, uploaded=None):
        return _ResidentPending(self, plan, index if index is not None else self.plan_index(plan))


# --- CPU worker ---------------------------------------------------------------------------
class _WorkerPending(PendingRows):
    def __init__(self, pf: WorkerGather, plan: LookupPlan, index: dict) -> None:
        super().__init__(pf, plan, index)
        self.ready = {lid: threading.Event() for lid in plan.layers}
        self.out: dict[int, torch.Tensor] = {}
        self.errors: dict[int, BaseException] = {}
        self.done_at: dict[int, float] = {}

    def work(self) -> None:
        for lid, lp in self.plan.layers.items():
            t = time.perf_counter()
            try:
                self.out[lid] = self.pf.gather_layer(lp)
            except BaseException as e:  # surfaced in the step, in rows(lid)
                self.errors[lid] = e
            self.done_at[lid] = time.perf_counter()
            self.stats.layers[lid].prefetch_s = self.done_at[lid] - t
            self.ready[lid].set()

    def _wait(self, layer_id: int) -> torch.Tensor:
        need = time.perf_counter()
        if not self.ready[layer_id].wait(self.pf.timeout_s):
            raise GatherError(layer_id, f"rows not ready after {self.pf.timeout_s:.0f}s")
        got = time.perf_counter()
        st = self.stats.layers[layer_id]
        st.stall_s = got - need if self.done_at[layer_id] > need else 0.0
        st.slack_s = max(0.0, need - self.done_at[layer_id])
        if layer_id in self.errors:
            e = self.errors[layer_id]
            raise GatherError(layer_id, f"gather failed: {type(e).__name__}: {e}") from e
        return self.out.pop(layer_id)


class WorkerGather(Prefetcher):
    """CPU-only prefetch: a worker thread stands in for the side stream."""

    name = "worker"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._pool = ThreadPoolExecutor(1, "engram-prefetch", name_os_thread)

    def gather_layer(self, lp: LayerPlan) -> torch.Tensor:
        lp.wait_source()
        return self.store[lp.layer_id].decode(self.gather_host(lp))

    def start(self, plan, index=None, uploaded=None):
        pending = _WorkerPending(self, plan, index if index is not None else self.plan_index(plan))
        self._pool.submit(pending.work)
        return pending

    def close(self) -> None:
        self._pool.shutdown(wait=True)
