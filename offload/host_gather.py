"""Host gather for the staged path: several threads copy rows into (pinned) staging memory.

Each thread runs ``torch.index_select(..., out=)`` on its own slice of the request, which
releases the GIL. A call is cut into pieces below torch's intra-op grain, so every piece runs
serially on its thread: N gather threads use N cores instead of N times torch's thread pool.

``measure_host_gather`` reports the rate for each thread count beside a single-thread memcpy of
the same bytes (the host's copy speed, the staged path's ceiling before PCIe).
"""

from __future__ import annotations

import ctypes
import math
import statistics
import time
from concurrent.futures import ThreadPoolExecutor, wait

import numpy as np
import torch

from .thread_names import name_os_thread

TORCH_GRAIN = 32768  # at::internal::GRAIN_SIZE: index_select runs serially below this
MIN_BYTES_PER_THREAD = 1 << 18  # smaller requests are not worth a thread hand-off


class ThreadedGather:
    """``out[:M] = table[idx]`` on ``num_threads`` threads (the caller's thread is one of them).

    One gather at a time per instance: calls from several threads share the same workers.
    """

    def __init__(self, num_threads: int = 4) -> None:
        if num_threads < 1:
            raise ValueError(f"num_threads must be at least 1, got {num_threads}")
        self.num_threads = num_threads
        self._pool = (
            ThreadPoolExecutor(num_threads - 1, "engram-gather", initializer=name_os_thread)
            if num_threads > 1
            else None
        )

    def gather(self, table: torch.Tensor, idx, out: torch.Tensor) -> torch.Tensor:
        """Rows ``idx`` (CPU int64 tensor or numpy array) of a CPU ``table`` into the first
        ``len(idx)`` rows of ``out`` (same dtype and row shape); returns that slice. An index
        outside the table raises IndexError (torch's bounds check, from whichever thread)."""
        if isinstance(idx, np.ndarray):
            idx = torch.from_numpy(np.ascontiguousarray(idx, dtype=np.int64))
        m = idx.numel()
        if table.device.type != "cpu" or out.device.type != "cpu" or idx.device.type != "cpu":
            raise ValueError("ThreadedGather works on host tensors; use the UVA kernel on a GPU")
        if out.dtype != table.dtype or out.shape[1:] != table.shape[1:] or out.shape[0] < m:
            raise ValueError(
                f"out {tuple(out.shape)} {out.dtype} cannot hold {m} rows of {table.dtype} "
                f"{tuple(table.shape[1:])}; allocate [>= {m}, *table.shape[1:]] of table.dtype"
            )
        dst = out[:m]
        row_elems = max(1, math.prod(table.shape[1:]))
        piece = max(1, TORCH_GRAIN // row_elems)
        row_bytes = row_elems * table.element_size()
        threads = min(self.num_threads, max(1, m * row_bytes // MIN_BYTES_PER_THREAD))
        bounds = np.linspace(0, m, threads + 1).astype(np.int64)
        work = lambda a, b: _copy_rows(table, idx, dst, int(a), int(b), piece)
        futures = [self._pool.submit(work, a, b) for a, b in zip(bounds[1:-1], bounds[2:])]
        try:
            work(bounds[0], bounds[1])
        finally:
            wait(futures)  # every thread is done before we return or raise
        for f in futures:
            f.result()  # a worker's error (e.g. IndexError) surfaces here
        return dst

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def __enter__(self) -> ThreadedGather:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _copy_rows(table, idx, dst, a: int, b: int, piece: int) -> None:
    for s in range(a, b, piece):
        e = min(b, s + piece)
        torch.index_select(table, 0, idx[s:e], out=dst[s:e])


def memcpy_bytes(dst: torch.Tensor, src: torch.Tensor, nbytes: int) -> None:
    """One single-thread memcpy (libc, GIL released) of ``nbytes`` between host tensors."""
    ctypes.memmove(dst.data_ptr(), src.data_ptr(), nbytes)


def measure_host_gather(
    table: torch.Tensor,
    rows,
    threads_list: tuple[int, ...] = (1, 2, 4, 8),
    repeats: int = 5,
    seed: int = 0,
    pin: bool | None = None,
) -> dict:
    """GB/s of a ``rows``-row gather (a count of random rows, or the row ids) from a CPU table
    into staging memory, per thread count, and of a single-thread memcpy of the same bytes.

    Staging is pinned when CUDA is available (``pin``). One warm-up run of everything, then
    ``repeats`` interleaved rounds; each entry has the median and the min/max over rounds.
    """
    if repeats < 1 or not threads_list:
        raise ValueError("need repeats >= 1 and at least one thread count")
    if isinstance(rows, int):
        idx = torch.from_numpy(np.random.default_rng(seed).integers(0, table.shape[0], rows))
    else:
        idx = torch.as_tensor(np.asarray(rows, dtype=np.int64))
    m = idx.numel()
    pin = torch.cuda.is_available() if pin is None else pin
    staging = torch.empty((m, *table.shape[1:]), dtype=table.dtype, pin_memory=pin)
    nbytes = staging.numel() * staging.element_size()
    src = table[:m].contiguous() if m <= table.shape[0] else torch.ones_like(staging)
    gathers = {n: ThreadedGather(n) for n in threads_list}
    runs = {"memcpy": lambda: memcpy_bytes(staging, src, nbytes)}
    for n, g in gathers.items():
        runs[f"gather{n}"] = lambda g=g: g.gather(table, idx, staging)
    seconds: dict[str, list[float]] = {k: [] for k in runs}
    try:
        for fn in runs.values():
            fn()
        for _ in range(repeats):
            for k, fn in runs.items():
                t = time.perf_counter()
                fn()
                seconds[k].append(time.perf_counter() - t)
    finally:
        for g in gathers.values():
            g.close()

    def rate(k: str) -> dict:
        gbps = [nbytes / max(s, 1e-12) / 1e9 for s in seconds[k]]
        return {"gbps": statistics.median(gbps), "gbps_min": min(gbps), "gbps_max": max(gbps)}

    return {
        "rows": m,
        "row_bytes": nbytes // m if m else 0,
        "bytes": nbytes,
        "pinned": pin,
        "repeats": repeats,
        "memcpy": rate("memcpy"),
        "gather": [{"threads": n, **rate(f"gather{n}")} for n in threads_list],
    }


def main(argv: list[str] | None = None) -> int:
    """``python -m offload.host_gather``: the staged path's host gather rate as JSON, with the
    table in a HostBuffer (huge pages unless --no-huge-pages) and what the OS gave it."""
    import argparse
    import json

    from .hostmem import HostBuffer

    ap = argparse.ArgumentParser(prog="python -m offload.host_gather", description=main.__doc__)
    ap.add_argument("--table-mib", type=int, default=1024, help="table size (MiB)")
    ap.add_argument("--row-bytes", type=int, default=128)
    ap.add_argument("--rows", type=int, nargs="+", default=[4096, 65536, 1 << 20])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-huge-pages", action="store_true")
    args = ap.parse_args(argv)
    if args.row_bytes < 1 or args.table_mib < 1 or args.repeats < 1 or min(args.threads) < 1:
        ap.error("--table-mib, --row-bytes, --repeats and --threads must be at least 1")
    num_rows = (args.table_mib << 20) // args.row_bytes
    buf = HostBuffer(num_rows * args.row_bytes, huge_pages=not args.no_huge_pages)
    table = buf.view(torch.uint8, (num_rows, args.row_bytes))
    table.copy_(torch.randint(0, 256, (args.row_bytes,), dtype=torch.uint8))
    results = [measure_host_gather(table, n, tuple(args.threads), args.repeats) for n in args.rows]
    print(json.dumps({"table": buf.describe(), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
