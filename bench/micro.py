"""The gather microbenchmark: time to gather n random rows of the first Engram table, per path.

On CUDA it is :func:`offload.autoselect.measure_gathers` (staged vs UVA vs device-resident),
with the staged/UVA crossover the 'auto' gather uses. On CPU it is the prefetchers' own host
gather, run in place (resident) or handed to a worker thread (the worker path's hop).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from offload.link import best_seconds
from offload.plan import LayerPlan
from offload.prefetch import Prefetcher
from offload.store import Placement, TableStore

from .run import Workload
from .source import ModelSource


def micro_cpu(store: TableStore, rows_list: list[int], repeats: int, seed: int = 0) -> list[dict]:
    """Fastest CPU gather of n rows of the first table: in place vs on a worker thread."""
    table = next(iter(store.tables.values()))
    rng = np.random.default_rng(seed)
    gatherer = Prefetcher(store)
    pool = ThreadPoolExecutor(1, thread_name_prefix="engram-bench")
    out = []
    try:
        for n in rows_list:
            lp = LayerPlan(table.layer_id, rng.integers(0, table.rows, n), None, n, 1)
            gather = lambda lp=lp: gatherer.gather_host(lp)
            out.append(
                {
                    "rows": int(n),
                    "bytes": int(n * table.row_bytes),
                    "resident_s": best_seconds(gather, repeats),
                    "worker_s": best_seconds(lambda g=gather: pool.submit(g).result(), repeats),
                }
            )
    finally:
        pool.shutdown()
    return out


def run_micro(
    src: ModelSource, device: torch.device, wl: Workload, ceiling_gbps: float, placement: str
) -> dict:
    if device.type == "cuda":
        if placement != Placement.HOST.value:
            return {"skipped": "the CUDA gather microbenchmark needs --placement host"}
        from offload.autoselect import crossover_rows, measure_gathers

        store = src.store(placement)
        measured = measure_gathers(store, device, wl.micro_rows, wl.micro_repeats, resident=True)
        paths, crossover = ("staged", "uva", "resident"), crossover_rows(measured)
    else:
        measured = micro_cpu(
            src.store(Placement.CPU.value), wl.micro_rows, wl.micro_repeats, wl.seed
        )
        paths, crossover = ("resident", "worker"), None
    for row in measured:
        for p in paths:
            gbps = row["bytes"] / row[f"{p}_s"] / 1e9
            row[f"{p}_gbps"] = gbps
            row[f"{p}_fraction_of_ceiling"] = gbps / ceiling_gbps
    return {"paths": list(paths), "rows": measured, "crossover_rows": crossover}
