"""Tables of one checkpoint file attached from, or loaded into, the node's shared memory
(``offload.shared_tables``), on the NUMA node chosen for the engine's device."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .rowformat import RowFormat
from .shared_tables import SharedBuffer, SharedTables, TableSpec, table_name
from .table_load import LoadStats, load_tables


def load_shared(
    shared: SharedTables,
    path: str | Path,
    plans: dict,
    placement,
    device: torch.device,
    chunk_rows: int,
    progress: bool,
):
    """``plans``: {layer: (TableSource, row dtype, fp8)} -> ({layer: Table}, LoadStats): each
    table attached from the shared directory or loaded into it (see ``SharedTables.open``)."""
    from .store import Placement, Table  # store imports this module

    start = time.perf_counter()
    node = shared.place(device).node
    layouts, specs = {}, []
    for lid, (src, out, fp8) in plans.items():
        fmt = RowFormat("fp8", src.fmt.values) if fp8 else None
        shape = (src.rows, fmt.row_bytes) if fp8 else (src.rows, src.fmt.values)
        dtype = torch.uint8 if fp8 else out
        spec = TableSpec(
            table_name(path, src.key, "fp8" if fp8 else str(dtype), shape, node), dtype, shape
        )
        layouts[lid] = (fmt, out if fp8 else None, spec)
        specs.append(spec)
    root = shared.check_space(specs)
    tables, moved = {}, 0
    for lid, (fmt, row_dtype, spec) in layouts.items():
        src = plans[lid][0]

        def fill(buf: SharedBuffer, lid=lid, fmt=fmt, row_dtype=row_dtype, spec=spec, src=src):
            t = Table(lid, buf.view(spec.dtype, spec.shape), placement, buf, fmt, row_dtype)
            load_tables(str(path), {lid: src}, {lid: t}, chunk_rows, progress=progress)

        before = len(shared.loaded)
        buf = shared.open(root, spec, fill)
        moved += spec.nbytes if len(shared.loaded) > before else 0
        if placement is Placement.HOST:
            buf.register(device)
        tables[lid] = Table(lid, buf.view(spec.dtype, spec.shape), placement, buf, fmt, row_dtype)
    return tables, LoadStats(moved, time.perf_counter() - start)
