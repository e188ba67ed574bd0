"""The cache simulations behind bench.hitrate, against plain reference implementations."""

import numpy as np
import pytest

from bench.cache_sim import (
    lru_hits,
    ranks_of,
    refreshed_lfu_hits,
    seen_before_hits,
    static_hits,
)


def zipf_reads(n=3000, rows=400, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.zipf(1.3, n) % rows).astype(np.int64)


def reference_lfu(reads, k, refresh, decay, seed=None):
    counts = {} if seed is None else dict(zip(seed[0].tolist(), seed[1].tolist()))

    def top():
        return set(sorted(counts, key=lambda r: (-counts[r], r))[:k])

    cache, hits = top(), 0
    for a in range(0, len(reads), refresh):
        window = reads[a : a + refresh].tolist()
        hits += sum(r in cache for r in window)
        counts = {r: c * decay for r, c in counts.items()}
        for r in window:
            counts[r] = counts.get(r, 0.0) + 1.0
        cache = top()
    return hits


def reference_lru(reads, k):
    cache, hits = [], 0
    for r in reads.tolist():
        if r in cache:
            cache.remove(r)
            hits += 1
        cache.append(r)
        del cache[: max(0, len(cache) - k)]
    return hits


def test_static_hits_are_reads_of_the_first_k_ranked_rows():
    reads = zipf_reads()
    ranked = np.array([5, 1, 77, 3, 2, 500], dtype=np.int64)
    sizes = [0, 1, 3, 6, 100]
    want = [int(np.isin(reads, ranked[:k]).sum()) for k in sizes]
    assert static_hits(reads, ranked, sizes) == want
    assert ranks_of(np.array([77, 4]), ranked).tolist()[0] == 2
    assert static_hits(reads, ranked[:0], [5]) == [0]


@pytest.mark.parametrize("k", [1, 7, 50, 1000])
def test_lru_matches_the_reference(k):
    reads = zipf_reads(1500)
    assert lru_hits(reads, k) == reference_lru(reads, k)
    assert lru_hits(reads, 10**6) == seen_before_hits(reads)


@pytest.mark.parametrize("decay", [0.5, 0.9, 1.0])
def test_refreshed_counts_match_the_reference(decay):
    reads = zipf_reads(2000, rows=300, seed=1)
    sizes = [0, 1, 5, 40, 299, 5000]
    got = refreshed_lfu_hits(reads, sizes, 97, decay)
    assert got == [reference_lfu(reads, k, 97, decay) for k in sizes]
    seed = (np.array([2, 8, 250, 999], np.int64), np.array([50.0, 3.0, 3.0, 9.0]))
    got = refreshed_lfu_hits(reads, sizes, 64, decay, seed)
    assert got == [reference_lfu(reads, k, 64, decay, seed) for k in sizes]


def test_hitrate_writes_its_table_and_plot(tmp_path):
    import json

    from bench.hitrate import POLICIES, main

    out = tmp_path / "hr"
    args = ["--max-train-files", "3", "--max-val-files", "1", "--no-v41", "--out", str(out)]
    assert main(args) == 0
    res = json.loads((out / "hit_rate.json").read_text())
    assert (out / "hit_rate.png").stat().st_size > 0
    assert res["read_tokens"] > 0 and res["profile_tokens"] > res["read_tokens"]
    for layer in res["layers"]:
        for key in ("static_profile", "static_oracle", "lru", "refreshed_lfu"):
            hits = layer[key]
            assert len(hits) == len(layer["fractions"]) and all(0 <= h <= 1 for h in hits)
            assert hits == sorted(hits)  # a bigger cache never hits less
            assert hits[-1] <= layer["seen_before"] or key.startswith(("static", "profile"))
        assert layer["static_oracle"][-1] >= layer["static_profile"][-1]
    assert set(res["target_met"]) == {layer["layer"] for layer in res["layers"]}
    assert all(set(m) == set(POLICIES) for m in res["target_met"].values())
