"""The DRAM cache of one file-tier table: which row is in which slot, and which slot to evict.

Directory: a table row -> slot lookup. A dense ``slot_of`` (int32 per table row) costs
``rows x 4`` bytes whatever the cache holds: 1.5 GB for one of DeepSeek-V4.1's 384M-row layers,
as much as a 6M-row cache of its 264-byte rows. An open-addressing hash of the cached rows
(``HashDirectory``: one int32 slot per bucket, at least twice the slots, linear probing; the key
of a bucket is read back from the cache's own ``row_of_slot``) costs about 8-16 bytes per slot,
i.e. 3-6% of a 264-byte row, but its probe loops cost a decode step ~4-5x the dense array's
time (admit + release of ~200 rows: ~230 us against ~50 us on the 2-core CI machine, per layer
and step). So the dense array is taken while it is at most twice the hash's bytes (a table up
to ~4-8x its cache), the hash beyond.

Eviction: CLOCK with counts over the slots; a row read by a step raises its count (saturating
at ``MAX_REF``), the hand takes a slot at count 0 and lowers the others it passes, a new row
starts at 0 (a row seen once goes first, a row read often survives several turns). Rows placed
by :meth:`SlotCache.preload` (a profile's most read rows, before serving) start at a count by
rank (``MAX_REF`` for the top, 1 at the bottom), the coldest where the hand comes first. Slots a
step still reads are pinned (a count per slot; several overlapped steps may pin the same slot)
and never chosen.
"""

from __future__ import annotations

import numpy as np

EMPTY, TOMB = -1, -2
MAX_REF = 3  # CLOCK counts saturate here: a row unread for MAX_REF + 1 turns of the hand goes
_MIX = np.uint64(0x9E3779B97F4A7C15)


class CapacityError(RuntimeError):
    """More distinct rows pinned at once than the DRAM cache has slots."""


class DenseDirectory:
    def __init__(self, rows: int, row_of_slot: np.ndarray) -> None:
        self.slot_of = np.full(rows, EMPTY, dtype=np.int32)

    @staticmethod
    def nbytes_for(rows: int, slots: int) -> int:
        return rows * 4

    def lookup(self, rows: np.ndarray) -> np.ndarray:
        return self.slot_of[rows]

    def insert(self, rows: np.ndarray, slots: np.ndarray) -> None:
        self.slot_of[rows] = slots

    def remove(self, rows: np.ndarray) -> None:
        self.slot_of[rows] = EMPTY


class HashDirectory:
    """Linear-probing hash of cached rows; buckets hold slots, ``row_of_slot`` holds keys."""

    def __init__(self, rows: int, row_of_slot: np.ndarray) -> None:
        self.row_of_slot = row_of_slot
        self.cap = self.capacity(row_of_slot.size)
        self.mask = self.cap - 1
        self.shift = np.uint64(64 - self.cap.bit_length() + 1)
        self.buckets = np.full(self.cap, EMPTY, dtype=np.int32)
        self.tombs = 0

    @staticmethod
    def capacity(slots: int) -> int:
        return 1 << max(2, int(2 * slots - 1).bit_length())

    @classmethod
    def nbytes_for(cls, rows: int, slots: int) -> int:
        return cls.capacity(slots) * 4

    def _home(self, rows: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):
            return ((rows.astype(np.uint64) * _MIX) >> self.shift).astype(np.int64) & self.mask

    def _find(self, rows: np.ndarray) -> np.ndarray:
        """The bucket of each row, -1 where absent."""
        out = np.full(rows.size, -1, dtype=np.int64)
        pos = self._home(rows)
        todo = np.arange(rows.size)
        while todo.size:
            b = self.buckets[pos]
            live = b >= 0
            hit = np.zeros(todo.size, dtype=bool)
            hit[live] = self.row_of_slot[b[live]] == rows[todo[live]]
            out[todo[hit]] = pos[hit]
            go = ~hit & (b != EMPTY)
            todo, pos = todo[go], (pos[go] + 1) & self.mask
        return out

    def lookup(self, rows: np.ndarray) -> np.ndarray:
        where = self._find(rows)
        out = np.full(rows.size, EMPTY, dtype=np.int32)
        found = where >= 0
        out[found] = self.buckets[where[found]]
        return out

    def insert(self, rows: np.ndarray, slots: np.ndarray) -> None:
        """Rows not present (unique) -> slots."""
        pos, todo = self._home(rows), np.arange(rows.size)
        while todo.size:
            free = self.buckets[pos] < 0
            cand = np.flatnonzero(free)
            _, first = np.unique(pos[cand], return_index=True)  # one winner per bucket
            win = cand[first]
            self.tombs -= int(np.count_nonzero(self.buckets[pos[win]] == TOMB))
            self.buckets[pos[win]] = slots[todo[win]]
            keep = np.ones(todo.size, dtype=bool)
            keep[win] = False
            todo, pos = todo[keep], (pos[keep] + 1) & self.mask

    def remove(self, rows: np.ndarray) -> None:
        where = self._find(rows)
        where = where[where >= 0]
        self.buckets[where] = TOMB
        self.tombs += where.size
        if self.tombs > self.cap // 4:  # probes stay short: rebuild from the live slots
            self.buckets[:] = EMPTY
            self.tombs = 0
            live = np.flatnonzero(self.row_of_slot >= 0)
            self.insert(self.row_of_slot[live].astype(np.int64), live.astype(np.int32))


class SlotCache:
    """Directory, CLOCK state and pins of ``slots`` cache slots over a table of ``rows`` rows."""

    def __init__(
        self, rows: int, slots: int, directory: str = "auto", max_ref: int = MAX_REF
    ) -> None:
        if slots < 1:
            raise ValueError(f"a DRAM cache needs at least one slot, got {slots}")
        self.rows, self.slots = rows, slots
        self.row_of_slot = np.full(slots, EMPTY, dtype=np.int64 if rows >= 2**31 else np.int32)
        self.ref = np.zeros(slots, dtype=np.uint8)  # CLOCK counts
        self.pins = np.zeros(slots, dtype=np.int32)
        self.hand = 0
        self.max_ref = max_ref  # 1: plain CLOCK (one reference bit)
        if directory == "auto":
            dense = DenseDirectory.nbytes_for(rows, slots)
            directory = "dense" if dense <= 2 * HashDirectory.nbytes_for(rows, slots) else "hash"
        kinds = {"dense": DenseDirectory, "hash": HashDirectory}
        if directory not in kinds:
            raise ValueError(f"unknown directory {directory!r}; use auto, dense or hash")
        self.directory_kind = directory
        self.directory = kinds[directory](rows, self.row_of_slot)

    @property
    def max_ref(self) -> int:
        return self._max_ref

    @max_ref.setter
    def max_ref(self, value: int) -> None:
        """Counts saturate at ``value``; a read's raise is one table lookup (``_bump``)."""
        self._max_ref = value
        self._bump = np.minimum(np.arange(256) + 1, value).astype(np.uint8)

    @property
    def directory_bytes(self) -> int:
        d = self.directory
        own = d.slot_of.nbytes if isinstance(d, DenseDirectory) else d.buckets.nbytes
        return own + self.row_of_slot.nbytes + self.ref.nbytes + self.pins.nbytes

    def admit(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Pin ``rows`` (unique) in the cache: returns (slot of each row, the rows missing, the
        slots they must be read into). The caller reads the misses, then nothing else may
        happen to those slots until :meth:`release`. (A decode step's ~100 rows cost as much
        in numpy calls as in work: each temporary here is made once.)"""
        slots = self.directory.lookup(rows)
        miss = slots < 0
        held = slots[~miss]
        self.pins[held] += 1
        self.ref[held] = self._bump[self.ref[held]]
        miss_rows = rows[miss]
        try:
            victims = self._victims(miss_rows.size)
        except CapacityError:
            self.pins[held] -= 1
            raise
        if victims.size:
            old = self.row_of_slot[victims]
            self.directory.remove(old[old >= 0])
            self.row_of_slot[victims] = miss_rows
            self.directory.insert(miss_rows, victims)
            self.pins[victims] += 1
            slots[miss] = victims
        return slots, miss_rows, victims

    def preload(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Place ``rows`` (distinct, most wanted first) in free or evictable slots before
        serving, as many as fit: returns (rows placed, their slots), ascending by row, pinned
        (the caller reads them, then releases the slots). Rows already held are skipped.
        The rank orders eviction: the least wanted rows take the slots the hand reaches first,
        and counts fall with the rank (``max_ref`` for the top, 1 at the bottom), so a miss
        evicts the profile's coldest rows before its hottest."""
        rows = np.asarray(rows, dtype=np.int64)
        rows = rows[self.directory.lookup(rows) < 0]
        free = int(np.count_nonzero(self.pins == 0))
        rows = rows[:free]
        n = rows.size
        victims = self._victims(n)[::-1]  # the hand's first slot holds the last ranked row
        old = self.row_of_slot[victims]
        self.directory.remove(old[old >= 0].astype(np.int64))
        self.row_of_slot[victims] = rows
        self.directory.insert(rows, victims)
        self.pins[victims] += 1
        self.ref[victims] = np.maximum(1, self.max_ref * (n - np.arange(n)) // max(n, 1))
        order = np.argsort(rows, kind="stable")  # ascending rows: adjacent ones coalesce
        return rows[order], victims[order]

    def release(self, slots: np.ndarray) -> None:
        self.pins[slots] -= 1

    def invalidate(self, slots: np.ndarray) -> None:
        """Slots whose read failed: empty again (their pins stay until released)."""
        rows = self.row_of_slot[slots]
        self.directory.remove(rows[rows >= 0].astype(np.int64))
        self.row_of_slot[slots] = EMPTY

    def forget(self, slots: np.ndarray) -> None:
        """Slots whose read failed: empty again, and unpinned."""
        self.invalidate(slots)
        self.release(slots)

    def _victims(self, k: int) -> np.ndarray:
        """``k`` unpinned slots at count 0 by CLOCK: lower the counts the hand passes. The hand
        scans contiguous windows (no wrap inside one; the first sized to the request, then
        doubling), each in a few numpy calls: the same slots and counts as moving it one slot
        at a time."""
        if k == 0:
            return np.empty(0, dtype=np.int32)
        a = self.hand  # a decode step's few dozen: found in the first window, as one
        b = min(self.slots, a + 2 * k + 64)
        ref = self.ref[a:b]
        free = self.pins[a:b] == 0
        take = np.flatnonzero(free & (ref == 0))
        if take.size >= k:
            end = int(take[k - 1]) + 1
            passed = free[:end] & (ref[:end] > 0)
            ref[:end][passed] -= 1
            self.hand = (a + end) % self.slots
            return (take[:k] + a).astype(np.int32)
        out: list[np.ndarray] = []
        need, scanned = k, 0
        chunk = min(self.slots, 2 * k + 64)
        turns = (self.max_ref + 2) * self.slots  # every count lowered to 0, then one more turn
        while need and scanned < turns:
            a = self.hand
            b = min(self.slots, a + chunk)
            ref = self.ref[a:b]  # views: updated in place
            free = self.pins[a:b] == 0
            take = np.flatnonzero(free & (ref == 0))[:need]
            end = int(take[-1]) + 1 if take.size == need else b - a
            passed = free[:end] & (ref[:end] > 0)
            ref[:end][passed] -= 1
            self.hand = (a + end) % self.slots
            take += a
            out.append(take)
            self.pins[take] += 1  # held while choosing: a second turn cannot take it again
            need -= take.size
            scanned += end
            chunk = min(self.slots, 2 * chunk)
        got = np.concatenate(out).astype(np.int32)
        self.pins[got] -= 1
        if need:
            pinned = int(np.count_nonzero(self.pins))
            raise CapacityError(
                f"{k} rows to read but only {k - need} of {self.slots} DRAM cache slots are "
                f"free of pins ({pinned} pinned by steps in flight)"
            )
        return got
