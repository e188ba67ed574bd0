"""The hot-row cache of one Engram layer: its most read rows held on the compute device.

A cache is an index translation: ``slots`` rows on the compute device in the table's stored
row format, and a :class:`HotMapping` (``ids``: the sorted global rows it holds, ``slots``:
where each one sits). A step's plan splits the layer's lookups with ``np.searchsorted`` into
hits (slot, request position) and misses (global rows for the next tier); the step keeps the
mapping it was split against.

Static sets come from a profile (``engram-profile``); an adaptive cache counts the step's hits
and misses and, every ``refresh_every`` steps, replaces at most ``max_replace`` rows: the
window's most missed rows in, the weakest of a sample of the held slots out (decayed hit
counts, decayed lazily), the mapping changed by its delta (:mod:`offload.hot_mapping`), so a
refresh costs the window and the replacements, not the rows held. A refresh
never changes a row a step may still read: new rows are copied into free slots (spare slots,
or slots retired by an earlier mapping once every step split against that mapping is closed),
and the new mapping is published only after the copy. On CUDA the copy is issued on the
current stream, behind every read already issued on it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from .hot_mapping import HotMapping
from .store import Table


class HotCacheError(ValueError):
    """A hot-row setting or file that cannot be used."""


@dataclass
class Split:
    """One layer's lookups split against a mapping (positions index the flat request)."""

    hit_pos: np.ndarray
    hit_slots: np.ndarray
    miss_pos: np.ndarray
    miss_ids: np.ndarray
    version: int


@dataclass
class RefreshStats:
    refreshes: int = 0
    replaced: int = 0
    seconds: list[float] = field(default_factory=list)  # wall time of each refresh


@dataclass(frozen=True)
class RowSource:
    """Stored rows of one table by global id: ``read(ids)`` -> ``[n, W]`` in the table's
    stored dtype (any device); ``rows``: the table's row count."""

    rows: int
    read: Callable[[np.ndarray], torch.Tensor]


def store_rows(table: Table) -> RowSource:
    """Rows straight out of a table that holds the whole table (resident, host, cpu)."""
    t = table.tensor
    return RowSource(
        table.rows, lambda ids: torch.index_select(t, 0, torch.from_numpy(ids).to(t.device))
    )


def parse_hot_rows(value: str | int | float, table_rows: int) -> int:
    """``--hot-rows``: a count (``4096``) or a fraction of the table's rows (``0.01``)."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise HotCacheError(
            f"--hot-rows: {value!r} is neither a row count nor a fraction"
        ) from None
    if x < 0 or (x != int(x) and x >= 1):
        raise HotCacheError(f"--hot-rows: {value!r}: use a count >= 0 or a fraction below 1")
    n = int(x) if x >= 1 or x == 0 else max(1, int(round(x * table_rows)))
    return min(n, table_rows)


def weakest(score: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` lowest scores, lowest first. The rows never read since (score 0,
    usually most of them) are taken first: a partition over many equal keys is slow."""
    if k >= score.size:
        return np.argsort(score, kind="stable")
    low = np.flatnonzero(score == score.min())
    if low.size >= k:
        return low[:k]
    rest = np.flatnonzero(score != score[low[0]])
    part = rest[np.argpartition(score[rest], k - low.size - 1)[: k - low.size]]
    return np.concatenate([low, part[np.argsort(score[part], kind="stable")]])


class HotCache:
    def __init__(
        self,
        table: Table,
        capacity: int,
        device: torch.device | str,
        initial: np.ndarray | None = None,
        adaptive: bool = False,
        refresh_every: int = 64,
        max_replace: int = 256,
        decay: float = 0.5,
        source: RowSource | None = None,
        sample: int = 4096,
    ) -> None:
        """``capacity``: rows the cache serves; an adaptive cache keeps ``max_replace`` spare
        slots on top so a refresh never writes a slot the published mapping names.
        ``initial``: global rows to start from, most wanted first (a profile's order).
        ``source``: where fills and refreshes read stored rows (default: ``table`` itself; the
        file tier's reader when ``table`` is a DRAM cache of slots, see :func:`store_rows`).
        ``sample``: held slots a refresh samples for the weakest (at least 8 per replacement)."""
        self.table, self.layer_id = table, table.layer_id
        self.source = source or store_rows(table)
        self.table_rows = self.source.rows
        self.capacity, self.adaptive = int(capacity), adaptive
        self.refresh_every, self.max_replace, self.decay = refresh_every, max_replace, decay
        spare = max_replace if adaptive else 0
        self.device = torch.device(device)
        width = int(table.tensor.shape[1])
        self.rows = torch.empty(
            (self.capacity + spare, width), dtype=table.tensor.dtype, device=self.device
        )
        first = np.empty(0, np.int64) if initial is None else np.asarray(initial, np.int64)
        first = np.unique(first[: self.capacity])  # sorted, no repeats
        self._write(np.arange(first.size, dtype=np.int64), first)
        self.mapping = HotMapping.of(first, np.arange(first.size, dtype=np.int64))
        self.free = list(range(first.size, self.capacity + spare))
        self.retired: list[tuple[int, list[int]]] = []  # (last version naming them, slots)
        self.open: dict[int, int] = {}  # mapping version -> steps split against it, not closed
        # decayed hits per slot, lazily: the score at refresh e is score * decay^(e - stamp)
        # (np.full touches the pages now: the first refresh pays no page faults)
        self.score = np.full(self.capacity + spare, 0.0, np.float64)
        self.stamp = np.full(self.capacity + spare, 0, np.int64)
        self.row_of = np.full(self.capacity + spare, -1, np.int64)  # -1: free or retired
        self.row_of[: first.size] = first
        self.live = int(first.size)
        self.sample = max(int(sample), 8 * max_replace)
        self.compact_at = max(64 * max_replace, self.capacity // 16)
        self.epoch = 0
        self._rng = np.random.default_rng(0)
        self._hits: list[np.ndarray] = []  # since the last refresh
        self._misses: list[np.ndarray] = []
        self.steps = 0
        self.stats = RefreshStats()
        self._lock = threading.Lock()

    @property
    def held(self) -> int:
        return self.live

    @property
    def nbytes(self) -> int:
        return self.rows.numel() * self.rows.element_size()

    def _write(self, slots: np.ndarray, ids: np.ndarray) -> None:
        if ids.size:
            src = self.source.read(ids)
            self.rows[torch.from_numpy(slots).to(self.device)] = src.to(self.device)

    def split(self, flat: np.ndarray) -> Split:
        """Hits and misses of one layer's flat lookups; the step holds the mapping until
        :meth:`release`."""
        with self._lock:
            m = self.mapping
            self.open[m.version] = self.open.get(m.version, 0) + 1
        slot = m.lookup(flat)
        hit = slot >= 0
        hit_pos, miss_pos = np.flatnonzero(hit), np.flatnonzero(~hit)
        s = Split(hit_pos, slot[hit_pos], miss_pos, flat[miss_pos], m.version)
        if self.adaptive:  # counted now, summed at the next refresh
            self._hits.append(s.hit_slots)
            self._misses.append(s.miss_ids)
        return s

    def release(self, version: int) -> None:
        """A step split against ``version`` has issued every read of its hit rows."""
        with self._lock:
            left = self.open.get(version, 0) - 1
            if left > 0:
                self.open[version] = left
            else:
                self.open.pop(version, None)

    def step_done(self) -> bool:
        """Count a step; refresh when one is due (adaptive). True when a refresh ran."""
        self.steps += 1
        if self.adaptive and self.steps % self.refresh_every == 0:
            self.refresh()
            return True
        return False

    def _reclaim(self) -> None:
        oldest_open = min(self.open) if self.open else None
        keep = []
        for version, slots in self.retired:
            if oldest_open is None or version < oldest_open:
                self.free.extend(slots)
            else:
                keep.append((version, slots))
        self.retired = keep

    def scores(self, slots: np.ndarray) -> np.ndarray:
        """The decayed hit counts of ``slots`` as of this refresh."""
        return self.score[slots] * self.decay ** (self.epoch - self.stamp[slots])

    def _weakest_held(self, k: int) -> np.ndarray:
        """``k`` (or fewer) held slots with the lowest scores among a sample of the slots (all
        of them when few): sampled LFU, so a refresh never scans every row held."""
        n = self.score.size
        pool = (
            np.arange(n) if n <= self.sample else np.unique(self._rng.integers(0, n, self.sample))
        )
        pool = pool[self.row_of[pool] >= 0]
        return pool[weakest(self.scores(pool), min(k, pool.size))]

    def refresh(self) -> int:
        """Replace at most ``max_replace`` rows: the window's most missed rows in, the lowest
        scored rows of a sample out (only when the newcomer was read more). Its cost follows
        the window and the replacements, not the rows held (hot_mapping.py). Returns rows
        replaced."""
        t0 = time.perf_counter()
        hits = np.concatenate(self._hits) if self._hits else np.empty(0, np.int64)
        misses = np.concatenate(self._misses) if self._misses else np.empty(0, np.int64)
        self._hits, self._misses = [], []
        self.epoch += 1
        if hits.size:
            u, c = np.unique(hits, return_counts=True)
            self.score[u] = self.scores(u) + c
            self.stamp[u] = self.epoch
        with self._lock:
            self._reclaim()
            m = self.mapping
        n_new = 0
        if misses.size:
            cand, counts = np.unique(misses, return_counts=True)
            new = m.lookup(cand) < 0  # missed against an older mapping, held by now
            cand, counts = cand[new], counts[new]
            take = min(self.max_replace, cand.size, len(self.free))
            top = np.argsort(-counts, kind="stable")[:take]
            cand, counts = cand[top], counts[top].astype(np.float64)
            room = min(self.capacity - self.live, take)  # empty places: no eviction
            rest_c, rest_n = cand[room:], counts[room:]
            out = np.empty(0, np.int64)
            if rest_c.size and self.live:
                out = self._weakest_held(rest_c.size)
                rest_c, rest_n = rest_c[: out.size], rest_n[: out.size]
                # the k-th most missed row displaces the k-th weakest only if read more
                ok = rest_n > self.scores(out)
                out, rest_c, rest_n = out[ok], rest_c[ok], rest_n[ok]
            else:
                rest_c, rest_n = rest_c[:0], rest_n[:0]
            cand = np.concatenate([cand[:room], rest_c])
            counts = np.concatenate([counts[:room], rest_n])
            n_new = int(cand.size)
            if n_new:
                new_slots = np.array([self.free.pop() for _ in range(n_new)], np.int64)
                self._write(new_slots, cand)
                self.score[new_slots], self.stamp[new_slots] = counts, self.epoch
                with self._lock:  # published after the copy
                    self.mapping = m.changed(
                        cand, new_slots, self.row_of[out], out, self.compact_at
                    )
                    if out.size:
                        self.retired.append((m.version, out.tolist()))
                self.row_of[out] = -1
                self.row_of[new_slots] = cand
                self.live += n_new - int(out.size)
        self.stats.refreshes += 1
        self.stats.replaced += n_new
        self.stats.seconds.append(time.perf_counter() - t0)
        return n_new

    def describe(self) -> dict:
        return {
            "capacity_rows": self.capacity,
            "held_rows": self.held,
            "bytes": self.nbytes,
            "policy": "adaptive" if self.adaptive else "static",
            "refreshes": self.stats.refreshes,
            "replaced": self.stats.replaced,
        }
