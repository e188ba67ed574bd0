"""Choosing between the staged and UVA gather paths by measurement, not by guess.

``measure_gathers`` times both CUDA paths (and a device-resident gather for reference) on the
real tables for a range of rows per step; ``AutoGather`` keeps both prefetchers and, per step,
takes the one that was faster at that many rows (the crossover measured at start-up).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from .cuda_gather import StagedGather, UvaGather
from .plan import LayerPlan
from .prefetch import Prefetcher
from .store import TableStore

DEFAULT_ROWS = (1 << 10, 1 << 12, 1 << 14, 1 << 16, 1 << 18, 1 << 20)


def _time_cuda(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up (allocations, pinned staging growth)
    torch.cuda.synchronize(device)
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize(device)
    return (time.perf_counter() - t) / repeats


def measure_gathers(
    store: TableStore,
    device: torch.device,
    rows_list=DEFAULT_ROWS,
    repeats: int = 5,
    seed: int = 0,
    resident: bool = False,
) -> list[dict]:
    """Seconds per gather of n random rows of the first table, for each path."""
    table = next(iter(store.tables.values()))
    rng = np.random.default_rng(seed)
    staged = StagedGather(store, device)
    uva = UvaGather(store, device)
    dev_table = table.tensor[: min(table.rows, 1 << 20)].to(device) if resident else None
    out = []
    for n in rows_list:
        lp = LayerPlan(table.layer_id, rng.integers(0, table.rows, n), None, n, 1)
        idx_dev = torch.from_numpy(lp.fetch).to(device)
        row = {"rows": int(n), "bytes": int(n * table.row_bytes)}
        # Blocking copy: the next repeat refills the same staging slot, so overlapping it with
        # this copy would both race and time less than a real step pays.
        row["staged_s"] = _time_cuda(
            lambda lp=lp: staged.gather_layer(lp, 0).to(device, non_blocking=False),
            device,
            repeats,
        )
        row["uva_s"] = _time_cuda(lambda lp=lp, i=idx_dev: uva.gather_layer(lp, i), device, repeats)
        if dev_table is not None:
            i = idx_dev % dev_table.shape[0]
            row["resident_s"] = _time_cuda(
                lambda i=i: torch.index_select(dev_table, 0, i), device, repeats
            )
        out.append(row)
    staged.close()
    return out


def crossover_rows(measured: list[dict]) -> int | None:
    """Smallest row count from which staged beats UVA (None: UVA always wins)."""
    for row in measured:
        if row["staged_s"] < row["uva_s"]:
            return row["rows"]
    return None


class AutoGather(Prefetcher):
    """UVA below the measured crossover, staged above it, decided per step."""

    name = "auto"

    def __init__(self, *args, crossover: int | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        kw = dict(dedup=self.dedup, accountant=self.accountant, timeout_s=self.timeout_s)
        self.staged = StagedGather(self.store, self.device, **kw)
        self.uva = UvaGather(self.store, self.device, **kw)
        if crossover is None:
            crossover = crossover_rows(measure_gathers(self.store, self.device, repeats=3))
        self.crossover = crossover

    def pick(self, rows: int) -> Prefetcher:
        return self.staged if self.crossover is not None and rows >= self.crossover else self.uva

    def start(self, plan, index=None, uploaded=None):
        rows = max(lp.fetch.size for lp in plan.layers.values())
        return self.pick(rows).start(plan, index, uploaded)

    def close(self) -> None:
        self.staged.close()
        self.uva.close()
