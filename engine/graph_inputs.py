"""A CUDA-graph decode step whose placeholders' tokens are still on the device (overlap).

The host packs what it knows into the bucket's one upload, as for any graph step: positions,
KV slots, block tables, context lengths, the ids of the sequences whose last token it has
(after a prefill, say), and the rows hashed so far (:func:`engine.device_hash.device_arrays`).
Then, on the compute stream and outside any graph, a fix-up writes step N's sampled tokens into
the bucket's ``input_ids`` at the placeholders' positions (piece 0's embedding reads it there)
and finishes their Engram rows with :class:`engine.device_hash.DeviceRows`; the gathers are
issued on those rows, and the pieces replay as on the host-planned path. So step N+1 is on
the device before the host has read step N's tokens.

The gathers run outside the graphs and copy each layer's rows into its fixed buffer before the
piece that reads them (:meth:`engine.cuda_graph.DecodeGraphs.replay`), so their index tensors
need no fixed address. Padding rows are untouched: the placeholders' positions are real rows,
and padding keeps the inert inputs the host packed (token 0, slot -1, context 0).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from offload.prefetch import Prefetcher

from .cuda_graph import DecodeGraphs
from .device_hash import DeviceRows, device_arrays, fill_in
from .host_time import NO_TIMER

if TYPE_CHECKING:
    from .model_runner import Prepared


def graph_step(
    graphs: DecodeGraphs,
    prep: Prepared,
    tokens: torch.Tensor,
    dev: DeviceRows,
    prefetcher: Prefetcher,
    timer=NO_TIMER,
) -> torch.Tensor:
    """Logits ``[S, V]`` of decode step ``prep`` (a graph step) given its placeholders' raw
    ids ``tokens`` on the device (a view of the bucket's static logits, as
    :meth:`DecodeGraphs.run` returns)."""
    with timer("upload"):
        rows = {f"row_{k}": v for k, v in device_arrays(prep.rows).items()}
        bucket, views = graphs.upload(prep.n, {**prep.parts, **rows})
    with timer("plan"):
        uploaded = {k[4:]: views[k] for k in rows}
        sort = prefetcher.name == "uva"
        plan, index, ready = fill_in(dev, uploaded, views["input_ids"], tokens, sort)
    with timer("prefetch"):
        pending = prefetcher.start(plan, index, ready)
    return graphs.replay(bucket, prep.n, pending)
