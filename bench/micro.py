"""The gather microbenchmark: GB/s per path against the link ceiling, for synthetic tables of
128, 256 and 512-byte rows (64, 128, 256 bf16 values; ``--micro-values``) and the same rows in
FP8 (66, 132, 264 bytes: about half the bytes moved per row), at each ``--micro-rows`` size.

CUDA (tables in pinned host memory): the engine's own gathers through
:func:`offload.autoselect.measure_gathers`: staged (threaded host gather into pinned staging,
one copy, dequantised after), uva (the Triton kernel on host-sorted rows, dequantised while
gathering, at the best of a few persistent-grid sizes), index_select (torch on the mapped table,
the kernel's baseline) and resident (the table in device memory); the staged/UVA crossover per
table. CPU: the host gather in place (resident) and on a worker thread (the worker path's hop),
dequantisation included.

Also: the staged path's threaded host gather against a single-thread memcpy of the same bytes,
and, for the smallest rows, the same gathers from a table without huge pages.
"""

from __future__ import annotations

import gc
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from offload.host_gather import measure_host_gather
from offload.link import best_seconds
from offload.plan import LayerPlan
from offload.prefetch import Prefetcher
from offload.rowformat import quantize_fp8
from offload.store import Placement, TableStore, cupy_ok

from .run import Workload
from .source import ModelSource

ROW_VALUES = (64, 128, 256)  # bf16 rows of 128, 256 and 512 bytes
FORMATS = ("bf16", "fp8")
TABLE_BYTES = {"cpu": (8 << 20, 32 << 20), "cuda": (256 << 20, 4 << 30)}  # min, max
FILL_ROWS = 1 << 14


def table_rows(max_rows: int, row_bytes: int, device: torch.device) -> int:
    """Rows of a table 4x the largest gather (within bounds), so gathers miss the caches."""
    lo, hi = TABLE_BYTES["cuda" if device.type == "cuda" else "cpu"]
    return max(lo, min(hi, 4 * max_rows * row_bytes)) // row_bytes


def synthetic_table(
    rows: int, values: int, fmt: str, placement: str, device, huge_pages: bool, seed: int = 0
) -> TableStore:
    """One table of random rows (a random block repeated: the bytes, not the values, matter)."""
    store = TableStore.allocate(
        {0: (rows, values)}, torch.bfloat16, placement, device, fp8=fmt == "fp8",
        huge_pages=huge_pages,
    )  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    block = torch.randn(min(rows, FILL_ROWS), values, generator=g)
    block = quantize_fp8(block) if fmt == "fp8" else block.to(torch.bfloat16)
    dst = store[0].tensor
    for a in range(0, rows, block.shape[0]):
        n = min(block.shape[0], rows - a)
        dst[a : a + n].copy_(block[:n])
    return store


def micro_cpu(store: TableStore, rows_list: list[int], repeats: int, seed: int = 0) -> list[dict]:
    """Fastest CPU gather (decoded) of n rows of the first table: in place vs on a worker."""
    table = next(iter(store.tables.values()))
    rng = np.random.default_rng(seed)
    gatherer = Prefetcher(store)
    pool = ThreadPoolExecutor(1, thread_name_prefix="engram-bench")
    out = []
    try:
        for n in rows_list:
            lp = LayerPlan(table.layer_id, rng.integers(0, table.rows, n), None, n, 1)
            gather = lambda lp=lp: table.decode(gatherer.gather_host(lp))
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


def thread_counts() -> tuple[int, ...]:
    from offload.cuda_gather import default_host_threads

    cores = os.cpu_count() or 1
    return tuple(sorted({n for n in (1, 2, 4, 8) if n <= cores} | {default_host_threads()}))


def _measure(store: TableStore, device: torch.device, wl: Workload) -> list[dict]:
    if device.type == "cuda":
        from offload.autoselect import grid_sizes, measure_gathers

        rows = measure_gathers(
            store,
            device,
            wl.micro_rows,
            wl.micro_repeats,
            wl.seed,
            resident=True,
            index_select=True,
            programs=grid_sizes(device),
        )
        return rows
    return micro_cpu(store, wl.micro_rows, wl.micro_repeats, wl.seed)


def run_micro(
    src: ModelSource,
    device: torch.device,
    wl: Workload,
    ceiling_gbps: float | None,
    placement: str,
) -> dict:
    """The micro table (see the module docstring); ``src`` and ``placement`` are unused: the
    tables are synthetic, in pinned host memory on CUDA and plain host memory on CPU."""
    cuda = device.type == "cuda"
    if cuda and not cupy_ok():
        return {"skipped": "the CUDA gather microbenchmark needs CuPy for pinned host tables"}
    tier = Placement.HOST.value if cuda else Placement.CPU.value
    paths = ("staged", "uva", "index_select", "resident") if cuda else ("resident", "worker")

    def measure(values: int, fmt: str, huge_pages: bool) -> tuple[list[dict], dict, dict]:
        n_rows = table_rows(max(wl.micro_rows), 2 * values, device)
        store = synthetic_table(n_rows, values, fmt, tier, device, huge_pages, wl.seed)
        measured = _measure(store, device, wl)
        for m in measured:
            m.update(values=values, format=fmt, row_bytes=store[0].row_bytes)
            for p in paths:
                m[f"{p}_gbps"] = m["bytes"] / m[f"{p}_s"] / 1e9
                link = m[f"{p}_gbps"] / ceiling_gbps if ceiling_gbps else None  # None: CPU
                m[f"{p}_fraction_of_ceiling"] = link
        host = _host_gather(store, wl, cuda) if fmt == "bf16" and huge_pages else None
        memory = store.describe()
        del store
        if cuda:
            gc.collect()  # the table's pinned memory (and its CUDA registration) goes now
        return measured, host, memory

    rows, crossover, host, memory, huge = [], {}, [], None, {}
    for values in wl.micro_values:
        for fmt in FORMATS:
            measured, h, mem = measure(values, fmt, True)
            rows += measured
            memory = memory or mem
            if h is not None:
                host.append(h)
            if cuda:
                from offload.autoselect import crossover_rows

                crossover[f"{fmt} {measured[0]['row_bytes']} B"] = crossover_rows(measured)
            if values == wl.micro_values[0] and fmt == "bf16":  # small rows: where pages mattered
                plain, _, plain_mem = measure(values, fmt, False)
                huge = _huge_page_effect(measured, mem, plain, plain_mem, paths)
    return {
        "paths": list(paths),
        "rows": rows,
        "crossover_rows": crossover if cuda else None,
        "host_gather": host,
        "huge_pages": huge,
        "table_memory": memory,
    }


def _host_gather(store: TableStore, wl: Workload, cuda: bool) -> dict:
    """The staged path's host half at every row count: threads vs one memcpy."""
    table = store[0].tensor
    results = []
    for n in wl.micro_rows:
        r = measure_host_gather(table, n, thread_counts(), wl.micro_repeats, wl.seed, pin=cuda)
        best = max(r["gather"], key=lambda e: e["gbps"])
        results.append(
            {
                "rows": r["rows"],
                "bytes": r["bytes"],
                "memcpy_gbps": r["memcpy"]["gbps"],
                "gather_gbps": {str(e["threads"]): e["gbps"] for e in r["gather"]},
                "best_threads": best["threads"],
                "best_fraction_of_memcpy": best["gbps"] / r["memcpy"]["gbps"],
            }
        )
    return {"row_bytes": store[0].row_bytes, "pinned": cuda, "rows": results}


def _huge_page_effect(on: list[dict], on_mem: dict, off: list[dict], off_mem: dict, paths):
    """GB/s of the same gathers from a huge-page table and from a plain one."""
    return {
        "row_bytes": on[0]["row_bytes"],
        "memory": {"huge": on_mem["memory"], "plain": off_mem["memory"]},
        "huge_bytes": on_mem["huge_bytes"],
        "rows": [
            {"rows": a["rows"], **{f"{p}_gbps": [a[f"{p}_gbps"], b[f"{p}_gbps"]] for p in paths}}
            for a, b in zip(on, off)
        ],
    }
