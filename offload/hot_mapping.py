"""Which global rows a hot-row cache holds, and in which slot: one immutable version per refresh.

A version is a sorted ``base`` (ids and their slots, built rarely) and a small sorted ``delta``
of rows added since, so a refresh costs the rows it changes, not the rows held:

- adding rows builds a new delta (O(delta));
- removing a base row writes -1 into its base slot *in place* (the base arrays are shared by
  every version since they were built). A split against an older version, reading that entry
  before or after the write, sees the old slot (kept unreused while that version has open
  steps: the cache retires it with the version) or a miss (the row comes from the next tier):
  both give the right row. Writes happen before the new version is published.
- once the delta outgrows ``compact_at`` rows, the live rows are merged into a new base: one
  O(held) step every ``compact_at / replaced-per-refresh`` refreshes (amortized).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def _find(ids: np.ndarray, slots: np.ndarray, flat: np.ndarray) -> np.ndarray:
    """Slot of each of ``flat`` in sorted ``ids`` (-1 where absent or removed)."""
    if ids.size == 0:
        return np.full(flat.size, -1, np.int64)
    at = np.minimum(np.searchsorted(ids, flat), ids.size - 1)
    return np.where(ids[at] == flat, slots[at], -1)


def _merge(ids: np.ndarray, slots: np.ndarray, more: np.ndarray, more_slots: np.ndarray):
    """Sorted ``ids`` (no repeats) with rows ``more`` (none of them in ``ids``) merged in."""
    order = np.argsort(more, kind="stable")
    more, more_slots = more[order], more_slots[order]
    at = np.searchsorted(ids, more) + np.arange(more.size)  # where each lands in the result
    old = np.ones(ids.size + more.size, bool)
    old[at] = False
    out_ids, out_slots = np.empty(old.size, np.int64), np.empty(old.size, np.int64)
    out_ids[at], out_slots[at] = more, more_slots
    out_ids[old], out_slots[old] = ids, slots
    return out_ids, out_slots


@dataclass(frozen=True)
class HotMapping:
    base_ids: np.ndarray  # [B] sorted, int64
    base_slots: np.ndarray  # [B] slot of each, -1 once removed (written in place)
    add_ids: np.ndarray  # [D] sorted rows added since the base was built
    add_slots: np.ndarray  # [D]
    version: int = 0

    @classmethod
    def of(cls, ids: np.ndarray, slots: np.ndarray, version: int = 0) -> HotMapping:
        """All in the base (``ids`` need not be sorted; sorted ones cost no sort)."""
        ids, slots = np.asarray(ids, np.int64), np.asarray(slots, np.int64)
        if ids.size > 1 and not (ids[1:] > ids[:-1]).all():
            order = np.argsort(ids, kind="stable")
            ids, slots = ids[order], slots[order]
        none = np.empty(0, np.int64)
        return cls(ids, slots.copy(), none, none, version)

    def lookup(self, flat: np.ndarray) -> np.ndarray:
        """The slot holding each of ``flat``'s rows, -1 where the cache does not hold it."""
        out = _find(self.base_ids, self.base_slots, flat)
        if self.add_ids.size:
            rest = np.flatnonzero(out < 0)  # a removed base row may be back in the delta
            out[rest] = _find(self.add_ids, self.add_slots, flat[rest])
        return out

    def changed(
        self,
        add_ids: np.ndarray,
        add_slots: np.ndarray,
        gone_ids: np.ndarray,
        gone_slots: np.ndarray,
        compact_at: int,
    ) -> HotMapping:
        """The next version: ``gone`` rows out (base entries cleared in place, now), ``add``
        rows in. Call with the cache's lock held, publish the result after the rows' copy."""
        if gone_ids.size and self.base_ids.size:
            at = np.minimum(np.searchsorted(self.base_ids, gone_ids), self.base_ids.size - 1)
            inb = (self.base_ids[at] == gone_ids) & (self.base_slots[at] == gone_slots)
            self.base_slots[at[inb]] = -1
        ids, slots = self.add_ids, self.add_slots
        if gone_ids.size and ids.size:  # out of the delta: O(delta) copies, no sort
            at = np.minimum(np.searchsorted(ids, gone_ids), ids.size - 1)
            at = at[(ids[at] == gone_ids) & (slots[at] == gone_slots)]
            ids, slots = np.delete(ids, at), np.delete(slots, at)
        ids, slots = _merge(ids, slots, add_ids.astype(np.int64), add_slots.astype(np.int64))
        nxt = HotMapping(self.base_ids, self.base_slots, ids, slots, self.version + 1)
        if ids.size > compact_at:
            return HotMapping.of(*nxt.items(), nxt.version)
        return nxt

    def items(self) -> tuple[np.ndarray, np.ndarray]:
        """Every live (id, slot), ids ascending: O(held) copies, for compaction and
        inspection."""
        live = self.base_slots >= 0
        return _merge(self.base_ids[live], self.base_slots[live], self.add_ids, self.add_slots)

    @property
    def ids(self) -> np.ndarray:
        return self.items()[0]

    @property
    def slots(self) -> np.ndarray:
        return self.items()[1]
