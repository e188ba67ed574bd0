"""The DRAM cache's bookkeeping, vectorised: CLOCK's chunked scan against a hand moved one slot
at a time, the warm start's rank order, and the reader's runs and thread groups."""

import numpy as np
import pytest

from offload import row_reader
from offload.file_cache import CapacityError, SlotCache
from offload.file_tier import sorted_unique
from offload.row_reader import (
    IOV_MAX,
    PAGE,
    RUNS_PER_THREAD,
    _balance,
    page_spans,
    run_bounds,
    runs_of,
)


class OneSlotClock:
    """CLOCK with counts as the textbook moves its hand: one slot at a time."""

    def __init__(self, slots: int, max_ref: int) -> None:
        self.ref = np.zeros(slots, dtype=np.uint8)
        self.pins = np.zeros(slots, dtype=np.int32)
        self.hand, self.max_ref, self.slots = 0, max_ref, slots

    def victims(self, k: int) -> list[int]:
        out: list[int] = []
        for _ in range((self.max_ref + 2) * self.slots):
            if len(out) == k:
                break
            s = self.hand
            self.hand = (s + 1) % self.slots
            if self.pins[s] or s in out:
                continue
            if self.ref[s] == 0:
                out.append(s)
            else:
                self.ref[s] -= 1
        if len(out) < k:
            raise CapacityError("full")
        return out


@pytest.mark.parametrize("max_ref", [1, 3])
@pytest.mark.parametrize("slots", [7, 300, 5000])
def test_chunked_clock_takes_the_slots_a_one_slot_hand_takes(max_ref, slots):
    rng = np.random.default_rng(slots + max_ref)
    cache, ref = SlotCache(rows=10**6, slots=slots, max_ref=max_ref), OneSlotClock(slots, max_ref)
    for _ in range(300):
        # the same state in both: random counts and pins, as steps in flight leave them
        if rng.random() < 0.3:
            cache.ref[:] = ref.ref[:] = rng.integers(0, max_ref + 1, slots)
        cache.pins[:] = ref.pins[:] = rng.random(slots) < rng.choice([0.0, 0.2, 0.9])
        k = int(rng.integers(0, slots + 1)) if rng.random() < 0.2 else int(rng.integers(0, 40))
        try:
            want = ref.victims(k)
        except CapacityError:
            with pytest.raises(CapacityError):
                cache._victims(k)
            cache.hand = ref.hand
            cache.ref[:] = ref.ref
            continue
        got = cache._victims(k)
        assert got.tolist() == want
        assert cache.hand == ref.hand
        assert np.array_equal(cache.ref, ref.ref)
        assert np.array_equal(cache.pins, ref.pins)  # the scan's own holds are gone


def test_warm_start_evicts_the_profile_coldest_rows_first():
    c = SlotCache(rows=1000, slots=10)
    ranked = np.array([500, 20, 910, 3, 640, 77, 12, 801, 45, 300])  # most wanted first
    rows, slots = c.preload(ranked)
    assert rows.tolist() == sorted(ranked.tolist())  # read ascending: adjacent rows coalesce
    c.release(slots)
    by_rank = c.ref[c.directory.lookup(ranked)].astype(int)
    assert by_rank[0] == c.max_ref and by_rank[-1] == 1 and (np.diff(by_rank) <= 0).all()
    for r in range(5):  # five steps of one new row each
        s, _, _ = c.admit(np.array([r + 1000 - 10]))
        c.release(s)
    kept = ranked[c.directory.lookup(ranked) >= 0]
    assert kept.tolist() == ranked[:5].tolist()


def test_runs_split_at_gaps_and_at_iov_max():
    rows = np.concatenate(([1, 2, 3, 7, 9, 10], np.arange(20, 20 + 2 * IOV_MAX + 5)))
    starts, ends = run_bounds(rows)
    assert runs_of(rows)[:3] == [(0, 3), (3, 4), (4, 6)]
    assert (ends - starts).max() == IOV_MAX and ends[-1] == rows.size
    assert np.array_equal(starts[1:], ends[:-1])  # the runs partition the rows
    for a, b in zip(starts, ends):
        assert np.all(np.diff(rows[a:b]) == 1)
    assert run_bounds(np.array([5]))[0].tolist() == [0]


@pytest.mark.parametrize(
    "runs,threads", [(5, 8), (RUNS_PER_THREAD * 3 + 1, 8), (RUNS_PER_THREAD * 16, 3)]
)
def test_thread_groups_cover_every_run_in_order(runs, threads):
    rows = np.sort(np.random.default_rng(runs).choice(10**6, runs * 2, replace=False))
    rows = np.unique(np.concatenate((rows[::2], rows[::2] + 1)))
    starts, ends = run_bounds(rows)
    groups = _balance(starts, ends, threads)
    assert len(groups) == max(1, min(threads, -(-starts.size // RUNS_PER_THREAD)))
    assert np.array_equal(np.concatenate([g[0] for g in groups]), np.arange(starts.size))
    assert np.array_equal(np.concatenate([g[1] for g in groups]), starts)
    sizes = [int((g[2] - g[1]).sum()) for g in groups]
    assert max(sizes) - min(sizes) <= 2 * int((ends - starts).max()) + rows.size // len(groups)


def test_sorted_unique_is_numpys_unique_with_inverse():
    rng = np.random.default_rng(5)
    for n in (0, 1, 2, 64, 500, 513, 3000):  # both ways to the inverse (SEARCH_INVERSE)
        # repeats, negatives (refused after, by the range check)
        flat = rng.integers(-3, 40 if n < 1000 else 5000, n)
        uniq, inverse = sorted_unique(flat)
        want_u, want_i = np.unique(flat, return_inverse=True)
        assert np.array_equal(uniq, want_u) and np.array_equal(inverse, want_i)


@pytest.mark.parametrize("row_bytes", [32, 264, 4096, 5000])
def test_page_spans_loop_and_numpy_paths_agree(row_bytes, monkeypatch):
    rng = np.random.default_rng(row_bytes)
    for _ in range(200):
        n = int(rng.integers(1, 60))
        rows = np.sort(rng.choice(20000, n, replace=False)).astype(np.int64)
        offsets = 1000 + rows * row_bytes
        small = page_spans(offsets, row_bytes)
        monkeypatch.setattr(row_reader, "SMALL", 0)
        assert page_spans(offsets, row_bytes) == small
        monkeypatch.setattr(row_reader, "SMALL", 64)
        covered = {p for lo, hi in small for p in range(lo // PAGE, hi // PAGE)}
        want = {
            p for o in offsets.tolist() for p in range(o // PAGE, (o + row_bytes - 1) // PAGE + 1)
        }
        assert covered == want  # every page of every row, and no other
        assert all(b[0] > a[1] for a, b in zip(small, small[1:]))  # gaps between spans


def test_admit_counts_saturate_at_a_max_ref_set_after_construction():
    cache = SlotCache(rows=100, slots=10)
    cache.max_ref = 1
    rows = np.arange(5)
    for _ in range(4):
        slots, _, _ = cache.admit(rows)
        cache.release(slots)
    assert cache.ref[slots].tolist() == [1] * 5
    cache.max_ref = 3
    for _ in range(4):
        cache.release(cache.admit(rows)[0])
    assert cache.ref[slots].tolist() == [3] * 5
