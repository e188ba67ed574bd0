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

SEARCH_INVERSE = 512  # sorted_unique: up to this many ids, the inverse by a binary search


class GatherError(RuntimeError):
    """A gather for one Engram layer failed; the step that needed it cannot run."""

    def __init__(self, layer_id: int, message: str) -> None:
        super().__init__(f"Engram layer {layer_id}: {message}")
        self.layer_id = layer_id


def check_rows(layer_id: int, lo: int, hi: int, rows: int) -> None:
    """GatherError naming the layer when the smallest (``lo``) or largest (``hi``) row looked
    up is outside a table of ``rows`` rows."""
    if lo < 0 or hi >= rows:
        raise GatherError(layer_id, f"row {hi if hi >= rows else lo} is outside the table "
                                    f"(0..{rows - 1})")  # fmt: skip


def _firsts(s: np.ndarray) -> np.ndarray:
    """Where each run of equal values of ``s`` (sorted, not empty) starts."""
    keep = np.empty(s.size, dtype=bool)
    keep[0] = True
    np.not_equal(s[1:], s[:-1], out=keep[1:])
    return keep


def sorted_unique(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(flat, return_inverse=True)`` in a few numpy calls, cheaper than numpy's
    general version at a decode step's ~100 ids a layer (the inverse by a binary search into
    the unique ids); above SEARCH_INVERSE ids the search loses to scattering the sort's
    permutation, so a prefill's take that way."""
    if flat.size == 0:
        return flat, np.empty(0, dtype=np.intp)
    if flat.size <= SEARCH_INVERSE:
        s = np.sort(flat)
        uniq = s[_firsts(s)]
        return uniq, uniq.searchsorted(flat)
    perm = np.argsort(flat)
    s = flat[perm]
    keep = _firsts(s)
    inverse = np.empty(s.size, dtype=np.intp)
    inverse[perm] = np.cumsum(keep) - 1
    return s[keep], inverse


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
        step): a sort and a count of its runs, about a tenth of ``np.unique``'s time at a
        decode step's few thousand rows (numpy 2.4)."""
        if self.inverse is not None or self.fetch.size == 0:
            return int(self.fetch.size)
        return int(np.count_nonzero(_firsts(np.sort(self.fetch))))


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
            if flat.size:
                check_rows(lid, int(flat.min()), int(flat.max()), table_rows[lid])
            if dedup:
                fetch, inverse = sorted_unique(flat)
                layers[lid] = LayerPlan(lid, fetch, inverse.reshape(-1), n, heads)
            else:
                layers[lid] = LayerPlan(lid, flat, None, n, heads)
        return cls(layers)
