"""Hit rates of row caches over a stream of Engram row reads, for many cache sizes at once.

Three policies, each asked the same question (what share of the reads finds its row cached):

- ``static_hits``: a fixed hot set, the ``k`` rows a profile ranked first (``engram-profile``).
- ``lru_hits``: least-recently-used over the stream, starting empty.
- ``refreshed_lfu_hits``: the serving design of a count-driven cache: counts of the reads kept
  as the stream runs, decayed by ``decay`` at every refresh; every ``refresh`` reads the cache
  becomes the ``k`` rows of highest count (ties: lower row id), starting empty or from a
  profile's counts. A read hits when its row is in the set chosen at the last refresh.

``seen_before_hits``: the share of reads whose row the stream read before (what an unbounded
cache that starts empty can reach at most).
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

ABSENT = np.iinfo(np.int64).max  # the rank of a row outside the ranking


def ranks_of(reads: np.ndarray, ranked: np.ndarray) -> np.ndarray:
    """Each read's position in ``ranked`` (distinct row ids), or ABSENT (never cached)."""
    if not len(ranked):
        return np.full(len(reads), ABSENT, np.int64)
    order = np.argsort(ranked, kind="stable")
    by_id = ranked[order]
    pos = np.searchsorted(by_id, reads).clip(0, len(by_id) - 1)
    return np.where(by_id[pos] == reads, order[pos], ABSENT)


def hits_by_size(ranks: np.ndarray, sizes: list[int]) -> list[int]:
    """Reads of rank < k, for each k of ``sizes``."""
    srt = np.sort(ranks)
    return [int(np.searchsorted(srt, k, side="left")) for k in sizes]


def static_hits(reads: np.ndarray, ranked: np.ndarray, sizes: list[int]) -> list[int]:
    return hits_by_size(ranks_of(reads, ranked), sizes)


def seen_before_hits(reads: np.ndarray) -> int:
    return int(len(reads) - len(np.unique(reads)))


def lru_hits(reads: np.ndarray, size: int) -> int:
    cache: OrderedDict[int, None] = OrderedDict()
    hits = 0
    for r in reads.tolist():
        if r in cache:
            cache.move_to_end(r)
            hits += 1
        elif size:
            cache[r] = None
            if len(cache) > size:
                cache.popitem(last=False)
    return hits


def refreshed_lfu_hits(
    reads: np.ndarray,
    sizes: list[int],
    refresh: int,
    decay: float,
    seed: tuple[np.ndarray, np.ndarray] | None = None,
) -> list[int]:
    """Hits of the count-driven cache for every size of ``sizes`` (one pass). ``seed``: (row
    ids ascending, counts) to start from (a profile), else the cache starts empty.

    Decay is kept as growth: a read in window t adds decay**-t, which orders rows exactly as
    the decayed counts do, so only the rows a window read change. The cache of size k is every
    row above the k-th largest count, then the lowest ids among rows equal to it."""
    universe = np.unique(reads) if seed is None else np.union1d(reads, seed[0])
    idx = np.searchsorted(universe, reads)
    w = np.zeros(len(universe))
    if seed is not None:
        w[np.searchsorted(universe, seed[0])] = seed[1]
    hits = np.zeros(len(sizes), np.int64)
    grow = 1.0
    cuts = _cuts(w, sizes)
    for a in range(0, len(reads), refresh):
        window = idx[a : a + refresh]
        cw = w[window]
        for j, (t, last) in enumerate(cuts):
            hits[j] += int(np.count_nonzero((cw > t) | ((cw == t) & (window <= last))))
        grow /= decay
        np.add.at(w, window, grow)
        if grow > 1e200:  # rescale before float64 runs out: the order stays
            w /= grow
            grow = 1.0
        cuts = _cuts(w, sizes)
    return [int(h) for h in hits]


def _cuts(w: np.ndarray, sizes: list[int]) -> list[tuple[float, int]]:
    """Per size k: (the k-th largest count t, the last universe index admitted at t); rows with
    no count are never cached."""
    positive = int(np.count_nonzero(w))
    small = sorted({k for k in sizes if 0 < k < positive})
    part = np.partition(w, [len(w) - k for k in small]) if small else w
    out = []
    for k in sizes:
        if k <= 0:
            out.append((np.inf, -1))
        elif k >= positive:
            out.append((0.0, -1))  # every counted row fits: count > 0
        else:
            t = part[len(w) - k]
            above = int(np.count_nonzero(w > t))
            ties = np.flatnonzero(w == t)
            out.append((t, int(ties[k - above - 1])))
    return out
