"""Rows through a hot-row cache: hits read from the compute device, misses from the next tier.

:class:`HotRows` wraps any prefetcher (resident, worker, staged, UVA, auto). Its plan splits
each layer's lookups against the layer's :class:`~offload.hot_cache.HotCache`; the misses form
an ordinary lookup plan for the wrapped path (sorted or de-duplicated as it would be), and the
plan's index arrays gain ``hot_slots{layer}`` (the slot of each hit) and ``hot_order{layer}``
(the request positions of the hits, then of the misses; absent when a layer is all hits or all
misses). A layer's rows are assembled on the compute device: hit rows gathered from the hot
table (and decoded like any row), the misses' rows beside them, one scatter into request order.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from .accounting import LayerStats, StepStats
from .hot_cache import HotCache, HotCacheError, RowSource, Split, parse_hot_rows, store_rows
from .plan import LookupPlan
from .prefetch import PendingRows, Prefetcher
from .store import TableStore


@dataclass
class HotPlan(LookupPlan):
    """The misses' plan (``layers``, for the wrapped path) and every layer's split."""

    splits: dict[int, Split] = field(default_factory=dict)
    shapes: dict[int, tuple[int, int]] = field(default_factory=dict)  # (tokens, heads)
    inner: LookupPlan | None = None  # the wrapped path's own plan (the file tier knows it by id)

    def host_arrays(self) -> dict[str, np.ndarray]:
        out = super().host_arrays()
        for lid, sp in self.splits.items():
            if sp.hit_pos.size:
                out[f"hot_slots{lid}"] = sp.hit_slots
                if sp.miss_pos.size:
                    out[f"hot_order{lid}"] = np.concatenate([sp.hit_pos, sp.miss_pos])
        return out

    def sorted(self) -> HotPlan:
        return self


class HotPending:
    def __init__(self, pf: HotRows, plan: HotPlan, index: dict, inner: PendingRows | None):
        self.pf, self.plan, self.index, self.inner = pf, plan, index, inner
        self.closed = False

    def rows(self, layer_id: int) -> torch.Tensor:
        n, heads = self.plan.shapes[layer_id]
        sp = self.plan.splits[layer_id]
        parts = []
        if sp.hit_pos.size:
            cache = self.pf.caches[layer_id]
            slots = self.index[f"hot_slots{layer_id}"].to(cache.rows.device)
            parts.append(cache.table.decode(torch.index_select(cache.rows, 0, slots)))
        if sp.miss_pos.size:
            miss = self.inner.rows(layer_id)
            parts.append(miss.reshape(sp.miss_pos.size, -1))
        if len(parts) == 1:
            return parts[0].view(n, heads, -1)
        both = torch.cat(parts)
        out = torch.empty_like(both)
        out.index_copy_(0, self.index[f"hot_order{layer_id}"].to(both.device), both)
        return out.view(n, heads, -1)

    def close(self) -> StepStats:
        if self.closed:
            return self.stats
        self.closed = True
        stats = self.inner.stats if self.inner is not None else StepStats(num_tokens=0)
        for lid, sp in self.plan.splits.items():
            n, heads = self.plan.shapes[lid]
            stats.num_tokens = n
            table = self.pf.store[lid]
            st = stats.layers.setdefault(lid, LayerStats(lid, self.pf.tiers[lid]))
            st.rows = n * heads
            st.hits = int(sp.hit_pos.size)
            st.hit_bytes = st.hits * table.row_bytes
        if self.inner is not None:
            self.inner.close()  # books the step, hits included
        else:
            self.pf.book_alone(stats)
        for lid, sp in self.plan.splits.items():
            cache = self.pf.caches.get(lid)
            if cache is not None:
                cache.release(sp.version)
                cache.step_done()
        self.stats = stats
        return stats


class HotRows(Prefetcher):
    """A prefetcher behind per-layer hot caches (layers without one: every lookup misses)."""

    def __init__(self, inner: Prefetcher, caches: dict[int, HotCache]) -> None:
        self.inner, self.caches = inner, caches
        self.name, self.places_rows = inner.name, inner.places_rows
        self.store, self.device, self.dedup = inner.store, inner.device, inner.dedup
        self.accountant, self.timeout_s = inner.accountant, inner.timeout_s
        self.host_threads, self.uva_programs = inner.host_threads, inner.uva_programs
        self.table_rows = inner.table_rows
        tier = file_tier_of(inner)
        self.tiers = {  # a step served wholly by the hot cache still books the layer's tier
            lid: "file" if tier is not None and lid in tier.layers else t.placement.value
            for lid, t in inner.store.tables.items()
        }

    def plan(self, row_ids: dict[int, np.ndarray]) -> HotPlan:
        splits, shapes, misses = {}, {}, {}
        for lid in sorted(row_ids):
            ids = np.ascontiguousarray(row_ids[lid], dtype=np.int64)
            shapes[lid] = ids.shape
            flat = ids.reshape(-1)
            cache = self.caches.get(lid)
            if cache is None:
                none = np.empty(0, np.int64)
                sp = Split(none, none, np.arange(flat.size, dtype=np.int64), flat, -1)
            else:
                sp = cache.split(flat)
            splits[lid] = sp
            if sp.miss_pos.size:
                misses[lid] = sp.miss_ids[:, None]
        inner = self.inner.plan(misses) if misses else None
        return HotPlan(inner.layers if inner else {}, splits, shapes, inner)

    def start(self, plan, index=None, uploaded=None):
        if index is None:
            index = self.plan_index(plan)
        inner = None
        if plan.layers:
            inner = self.inner.start(plan.inner or plan, index, uploaded)
        return HotPending(self, plan, index, inner)

    def book_alone(self, stats: StepStats) -> None:
        self.accountant.record(stats)

    def flush(self) -> None:
        self.inner.flush()

    def close(self) -> None:
        self.inner.close()

    def describe(self) -> dict[int, dict]:
        """Per layer: the cache's rows and bytes, refreshes, and its hit rate so far."""
        totals = self.accountant.totals.layers
        out = {}
        for lid, c in sorted(self.caches.items()):
            t = totals.get(lid)
            rate = t.hits / t.rows if t is not None and t.rows else 0.0
            out[lid] = {**c.describe(), "hit_rate": rate}
        return out


def file_tier_of(prefetcher: Prefetcher):
    """The :class:`~offload.file_tier.FileTier` behind a chain of wrapped paths, or None."""
    from .file_gather import FileTierGather

    pf = prefetcher
    while not isinstance(pf, FileTierGather) and isinstance(getattr(pf, "inner", None), Prefetcher):
        pf = pf.inner
    return pf.tier if isinstance(pf, FileTierGather) else None


def row_sources(prefetcher: Prefetcher) -> dict[int, RowSource]:
    """Where each layer's stored rows are read by table id: the store's tables, or, behind the
    file tier (whose store holds DRAM cache slots), the file through the tier's reader."""
    tier = file_tier_of(prefetcher)
    return {
        lid: tier.row_source(lid) if tier is not None and lid in tier.layers else store_rows(t)
        for lid, t in prefetcher.store.tables.items()
    }


def hot_sets(path: str | Path, layers: list[int]) -> dict[int, np.ndarray]:
    """Each layer's profiled rows, most read first (``engram-profile``'s file)."""
    from .profile import read_hot_rows

    prof = read_hot_rows(path)
    missing = [lid for lid in layers if lid not in prof]
    if missing:
        raise HotCacheError(f"--hot-rows-file {path}: no rows for Engram layer(s) {missing}")
    return {lid: prof[lid].rows for lid in layers}


@dataclass(frozen=True)
class HotSettings:
    """``--hot-rows`` and friends (see engine/config.py)."""

    rows: str | int | float = 0
    file: str | Path | None = None
    policy: str = "static"
    refresh_every: int = 64
    max_replace: int = 256

    def with_default_file(self, model_dir: str | Path) -> HotSettings:
        """The profile beside the checkpoint when no file was named and one is there."""
        from .profile import HOT_ROWS_FILE

        beside = Path(model_dir) / HOT_ROWS_FILE
        if self.file is None and beside.is_file():
            return replace(self, file=beside)
        return self


def with_hot_cache(prefetcher: Prefetcher, hot: HotSettings) -> Prefetcher:
    """``prefetcher`` behind hot caches of ``hot.rows`` rows per layer (0: unchanged). A static
    cache needs a profile; an adaptive one starts from it when given, else empty."""
    if hot.policy not in ("static", "adaptive"):
        raise HotCacheError(f"--hot-rows-policy: {hot.policy!r}: use static or adaptive")
    store: TableStore = prefetcher.store
    sources = row_sources(prefetcher)
    sizes = {lid: parse_hot_rows(hot.rows, src.rows) for lid, src in sources.items()}
    if not any(sizes.values()):
        return prefetcher
    if hot.policy == "static" and hot.file is None:
        raise HotCacheError(
            "--hot-rows with the static policy needs a profile: --hot-rows-file "
            "(written by engram-profile), or --hot-rows-policy adaptive"
        )
    sets = hot_sets(hot.file, sorted(sizes)) if hot.file is not None else {}
    caches = {
        lid: HotCache(
            store[lid],
            n,
            prefetcher.device,
            sets.get(lid),
            adaptive=hot.policy == "adaptive",
            refresh_every=hot.refresh_every,
            max_replace=hot.max_replace,
            source=sources[lid],
        )
        for lid, n in sizes.items()
        if n
    }
    return HotRows(prefetcher, caches)


def warm_file_tier(tier, hot: HotSettings) -> dict[int, int]:
    """Fill the file tier's DRAM caches from ``hot.file`` (``engram-profile``'s ranking)
    before serving; nothing without a profile. A static hot cache holds the top
    ``hot.rows`` of each layer, so the DRAM cache takes the rows ranked after them (a hot
    row's reads never reach it). Returns the rows placed per layer."""
    if hot.file is None or not tier.layers:
        return {}
    ranked = hot_sets(hot.file, sorted(tier.layers))
    if hot.policy == "static":
        ranked = {
            lid: rows[parse_hot_rows(hot.rows, tier.layers[lid].rows) :]
            for lid, rows in ranked.items()
        }
    return tier.warm(ranked)
