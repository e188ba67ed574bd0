"""Choosing between the staged and UVA gather paths by measurement, not by guess.

``measure_gathers`` times both CUDA paths as the engine runs them (staged: threaded host gather,
one copy, decode; UVA: the Triton kernel on host-sorted rows, at a few persistent-grid sizes)
on the real tables for a range of rows per step, and optionally a device-resident gather and
torch's index_select on the mapped table for reference. ``AutoGather`` keeps both prefetchers
and, per step, takes the one that was faster at that many rows (the crossover measured at
start-up), with the UVA grid its UVA prefetcher chose beside compute (:mod:`offload.grid`).
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch

from .cuda_gather import StagedGather, UvaGather
from .grid import candidates, sm_count
from .plan import LayerPlan, LookupPlan
from .prefetch import Prefetcher
from .store import TableStore

DEFAULT_ROWS = (1 << 10, 1 << 12, 1 << 14, 1 << 16, 1 << 18, 1 << 20)
LARGE_ROWS = 1 << 16  # gathers this large pick the grid size (best_programs)


def _time_cuda(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up (allocations, pinned staging growth)
    torch.cuda.synchronize(device)
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize(device)
    return (time.perf_counter() - t) / repeats


def grid_sizes(device: torch.device) -> tuple[int, ...]:
    """The grids the UVA gather may use (within its bound on SMs), for measurements alone."""
    return candidates(sm_count(device))


def measure_gathers(
    store: TableStore,
    device: torch.device,
    rows_list=DEFAULT_ROWS,
    repeats: int = 5,
    seed: int = 0,
    resident: bool = False,
    index_select: bool = False,
    programs: tuple[int, ...] | None = None,
    staged: StagedGather | None = None,
    uva: UvaGather | None = None,
) -> list[dict]:
    """Seconds per gather of n random rows of the first table, per path (``staged_s``,
    ``uva_s`` at the fastest of ``programs`` grid sizes, named in ``uva_programs``; with
    ``resident`` a device copy of the table, with ``index_select`` torch's gather on the mapped
    table). Rows are decoded as the engine decodes them. Pass the prefetchers to measure
    their own settings (their buffers grow; ``reset_buffers()`` after)."""
    device = torch.device(device)
    table = next(iter(store.tables.values()))
    rng = np.random.default_rng(seed)
    own = staged is None, uva is None
    staged = staged or StagedGather(store, device)
    uva = uva or UvaGather(store, device)
    grid = programs or (uva.max_programs,)
    keep = uva.max_programs
    dev_table = table.tensor[: min(table.rows, 1 << 20)].to(device) if resident else None
    view = uva.views[table.layer_id]
    out = []
    try:
        for n in rows_list:
            lp = LayerPlan(table.layer_id, rng.integers(0, table.rows, n), None, n, 1)
            slp = lp.sorted()  # as UvaGather.plan sends it
            idx = torch.from_numpy(slp.fetch).to(device)
            pos = torch.from_numpy(slp.positions).to(device)
            row = {
                "rows": int(n),
                "row_bytes": table.row_bytes,
                "format": table.fmt.name if table.fmt is not None else str(table.tensor.dtype),
                "bytes": int(n * table.row_bytes),
            }
            row["staged_s"] = _time_cuda(lambda lp=lp: staged.gather_once(lp), device, repeats)
            by_grid = {}
            for p in grid:
                uva.max_programs = p
                by_grid[p] = _time_cuda(
                    lambda s=slp, i=idx, q=pos: uva.gather_layer(s, i, q), device, repeats
                )
            best = min(by_grid, key=by_grid.get)
            row.update(uva_s=by_grid[best], uva_programs=best)
            row["uva_grid_s"] = {str(p): s for p, s in by_grid.items()}
            if index_select:
                raw = torch.from_numpy(lp.fetch).to(device)
                row["index_select_s"] = _time_cuda(
                    lambda r=raw: table.decode(torch.index_select(view, 0, r)), device, repeats
                )
            if dev_table is not None:
                i = torch.from_numpy(lp.fetch % dev_table.shape[0]).to(device)
                row["resident_s"] = _time_cuda(
                    lambda i=i: table.decode(torch.index_select(dev_table, 0, i)), device, repeats
                )
            out.append(row)
    finally:
        uva.max_programs = keep
        if own[0]:
            staged.close()
    return out


def crossover_rows(measured: list[dict]) -> int | None:
    """Smallest row count from which staged beats UVA (None: UVA always wins)."""
    for row in measured:
        if row["staged_s"] < row["uva_s"]:
            return row["rows"]
    return None


def best_programs(measured: list[dict]) -> int | None:
    """The UVA grid size with the least total time over the large gathers (all when none
    is large); None when only one size was measured."""
    rows = [r for r in measured if r["rows"] >= LARGE_ROWS] or measured
    sizes = {p for r in rows for p in r.get("uva_grid_s", {})}
    if len(sizes) < 2:
        return None
    total = {p: statistics.fsum(r["uva_grid_s"][p] for r in rows) for p in sizes}
    return int(min(total, key=total.get))


class AutoGather(Prefetcher):
    """UVA below the measured crossover, staged above it, decided per step."""

    name = "auto"

    def __init__(self, *args, crossover: int | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        kw = dict(
            dedup=self.dedup,
            accountant=self.accountant,
            timeout_s=self.timeout_s,
            host_threads=self.host_threads,
            uva_programs=self.uva_programs,
        )
        self.staged = StagedGather(self.store, self.device, **kw)
        self.uva = UvaGather(self.store, self.device, **kw)
        self.measured: list[dict] | None = None
        if crossover is None:  # at the grid the UVA path chose beside compute
            self.measured = measure_gathers(
                self.store, self.device, repeats=3, staged=self.staged, uva=self.uva
            )
            crossover = crossover_rows(self.measured)
            self.staged.reset_buffers()
            self.uva.reset_buffers()
        self.crossover = crossover

    @property
    def grid(self):
        return self.uva.grid

    def pick(self, rows: int) -> Prefetcher:
        return self.staged if self.crossover is not None and rows >= self.crossover else self.uva

    def _pick_plan(self, plan: LookupPlan) -> Prefetcher:
        return self.pick(max((lp.fetch.size for lp in plan.layers.values()), default=0))

    def plan(self, row_ids) -> LookupPlan:
        plan = super().plan(row_ids)
        return plan.sorted() if self._pick_plan(plan) is self.uva else plan

    def start(self, plan, index=None, uploaded=None):
        return self._pick_plan(plan).start(plan, index, uploaded)

    def flush(self) -> None:
        self.staged.flush()
        self.uva.flush()

    def close(self) -> None:
        self.staged.close()
        self.uva.close()
