"""A step's lookup plan: every Engram row the step will read, known before the forward pass.

Engram addresses depend only on token ids, so the plan is built from the step's new ids and
each sequence's n-gram history (hashing is incremental: O(1) per new token) for all Engram
layers at once. With de-duplication each layer fetches its unique rows once and the inverse
index re-expands them on the device. A sorted plan (``LookupPlan.sorted``, for the UVA kernel)
fetches rows in ascending order, so neighbouring rows share PCIe transactions, and carries
``positions``: fetched row k lands at request position ``positions[k]``. The sort runs here on
the host and its arrays travel in the step's single upload. A layer sends at most two index
arrays of at most tokens x heads int64 each (fetch + inverse, or fetch + positions); a hot-row
cache adds two more (offload/hot_rows.py): the CUDA graph runner sizes its fixed upload buffer
on four.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


class GatherError(RuntimeError):
    """A gather for one Engram layer failed; the step that needed it cannot run."""

    def __init__(self, layer_id: int, message: str) -> None:
        super().__init__(f"Engram layer {layer_id}: {message}")
        self.layer_id = layer_id


@dataclass
class LayerPlan:
    layer_id: int
    fetch: np.ndarray  # [M] global rows to move (unique rows when de-duplicated), int64
    inverse: np.ndarray | None  # [N * heads] index into fetch, None without de-duplication
    num_tokens: int
    heads: int
    positions: np.ndarray | None = None  # [M] request position of each fetched row (sorted)
    # blocks until the rows this plan reads are in its table (the file tier's reads into the
    # DRAM cache, issued when the plan was built); every path calls it before reading
    source_ready: Callable[[], None] | None = None

    def sorted(self) -> LayerPlan:
        """This layer fetching in ascending row order (de-duplicated plans already do)."""
        if self.inverse is not None or self.positions is not None:
            return self
        perm = np.argsort(self.fetch, kind="stable")
        return LayerPlan(
            self.layer_id, self.fetch[perm], None, self.num_tokens, self.heads, perm,
            self.source_ready,
        )  # fmt: skip

    def wait_source(self) -> None:
        """Wait (only) for this layer's rows to be in the table the gather reads."""
        if self.source_ready is not None:
            self.source_ready()

    @property
    def rows(self) -> int:
        return self.num_tokens * self.heads

    def requested(self) -> np.ndarray:
        """The global row of every (token, head) lookup, in the order the model reads them
        (what a sorted plan's positions and de-duplication's inverse put back)."""
        if self.inverse is not None:
            return self.fetch[self.inverse]
        if self.positions is not None:
            out = np.empty_like(self.fetch)
            out[self.positions] = self.fetch
            return out
        return self.fetch

    @property
    def unique_rows(self) -> int:
        """Distinct rows among the lookups (counted when a step's rows are closed, every
        step): a sort and a count of its steps, about a tenth of ``np.unique``'s time at a
        decode step's few thousand rows (numpy 2.4)."""
        if self.inverse is not None or self.fetch.size == 0:
            return int(self.fetch.size)
        ordered = np.sort(self.fetch)
        return int(np.count_nonzero(ordered[1:] != ordered[:-1])) + 1


@dataclass
class LookupPlan:
    layers: dict[int, LayerPlan]  # in layer order: the order prefetches are issued

    def host_arrays(self) -> dict[str, np.ndarray]:
        """The index arrays the device needs (``fetch{layer}``; ``inverse{layer}`` when
        de-duplicating; ``positions{layer}`` when sorted), for the engine to send with the rest
        of the step's inputs."""
        out = {}
        for lid, lp in self.layers.items():
            out[f"fetch{lid}"] = lp.fetch
            if lp.inverse is not None:
                out[f"inverse{lid}"] = lp.inverse
            if lp.positions is not None:
                out[f"positions{lid}"] = lp.positions
        return out

    def sorted(self) -> LookupPlan:
        return LookupPlan({lid: lp.sorted() for lid, lp in self.layers.items()})

    @classmethod
    def build(
        cls, row_ids: dict[int, np.ndarray], table_rows: dict[int, int], dedup: bool = False
    ) -> LookupPlan:
        """row_ids: ``{layer: [N, heads]}`` global rows (model.row_ids); bounds-checked here so a
        bad index fails on the host, naming the layer, instead of faulting a device gather."""
        layers = {}
        for lid in sorted(row_ids):
            ids = np.ascontiguousarray(row_ids[lid], dtype=np.int64)
            n, heads = ids.shape
            flat = ids.reshape(-1)
            if flat.size and (flat.min() < 0 or flat.max() >= table_rows[lid]):
                bad = int(flat.max() if flat.max() >= table_rows[lid] else flat.min())
                raise GatherError(lid, f"row {bad} is outside the table (0..{table_rows[lid] - 1})")
            if dedup:
                fetch, inverse = np.unique(flat, return_inverse=True)
                layers[lid] = LayerPlan(lid, fetch, inverse.reshape(-1), n, heads)
            else:
                layers[lid] = LayerPlan(lid, flat, None, n, heads)
        return cls(layers)
