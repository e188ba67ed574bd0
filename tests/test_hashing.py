import json

import numpy as np
import pytest

from models.hashing import NgramHasher, is_prime


def _cases(golden):
    return json.loads((golden / "ngram_hash_cases.json").read_text())


def _hasher(case) -> NgramHasher:
    c = case["config"]
    return NgramHasher(
        c["engram_vocab_size"],
        c["max_ngram_size"],
        c["n_head_per_ngram"],
        c["layer_ids"],
        case["compressed_vocab_size"],
        case["compressed_pad_id"],
        c["seed"],
    )


def _compress(case) -> np.ndarray:
    ids = np.array(case["input_ids"], dtype=np.int64)
    if case["compression_lookup"] == "identity":
        return ids
    lookup = np.array(case["compression_lookup"], dtype=np.int64)
    out = ids.copy()
    out[ids >= 0] = lookup[ids[ids >= 0]]
    return out


def test_golden_hash_cases(golden):
    cases = _cases(golden)
    assert cases, "no golden hash cases"
    for case in cases:
        h = _hasher(case)
        got = h.hash(_compress(case))
        for lid in case["config"]["layer_ids"]:
            key = str(lid)
            assert h.multipliers[lid].tolist() == case["multipliers"][key], case["name"]
            assert h.head_sizes(lid) == case["head_table_sizes"][key], case["name"]
            np.testing.assert_array_equal(got[lid], np.array(case["hashes"][key]), case["name"])


@pytest.mark.parametrize("trial", range(5))
def test_incremental_equals_full_at_random_splits(golden, trial):
    rng = np.random.default_rng(trial)
    case = _cases(golden)[trial % 3]
    h = _hasher(case)
    B, T = 3, 40
    ids = rng.integers(-1, case["compressed_vocab_size"], size=(B, T))
    full = h.hash(ids)
    cuts = sorted(rng.choice(np.arange(1, T), size=4, replace=False).tolist())
    hist = h.initial_history(B)
    parts = {lid: [] for lid in h.layer_ids}
    for a, b in zip([0] + cuts, cuts + [T]):
        out, hist = h.hash_incremental(hist, ids[:, a:b])
        for lid in h.layer_ids:
            parts[lid].append(out[lid])
    for lid in h.layer_ids:
        np.testing.assert_array_equal(np.concatenate(parts[lid], axis=1), full[lid])


def test_packed_ragged_equals_full(golden):
    """Sequences of different lengths advancing by different amounts in one packed call."""
    rng = np.random.default_rng(7)
    case = _cases(golden)[1]
    h = _hasher(case)
    lens = [1, 9, 4, 17]
    seqs = [rng.integers(0, case["compressed_vocab_size"], size=n * 3) for n in lens]
    hist = h.initial_history(len(lens))
    got = {lid: [[] for _ in lens] for lid in h.layer_ids}
    for step in range(3):
        new = [s[step * n : (step + 1) * n] for s, n in zip(seqs, lens)]
        out, hist = h.hash_packed(hist, np.concatenate(new), np.array(lens))
        off = 0
        for i, n in enumerate(lens):
            for lid in h.layer_ids:
                got[lid][i].append(out[lid][off : off + n])
            off += n
    for i, s in enumerate(seqs):
        full = h.hash(s[None, :])
        for lid in h.layer_ids:
            np.testing.assert_array_equal(np.concatenate(got[lid][i]), full[lid][0])


def test_packed_rejects_bad_shapes(golden):
    h = _hasher(_cases(golden)[2])
    with pytest.raises(ValueError, match="history must be"):
        h.hash_packed(np.zeros((2, 5)), np.zeros(3), np.array([1, 2]))
    with pytest.raises(ValueError, match="lengths sum"):
        h.hash_packed(h.initial_history(2), np.zeros(4), np.array([1, 2]))


def test_is_prime_matches_trial_division():
    def slow(n):
        return n >= 2 and all(n % d for d in range(2, int(n**0.5) + 1))

    assert [n for n in range(2000) if is_prime(n)] == [n for n in range(2000) if slow(n)]
    assert is_prime(2**61 - 1) and not is_prime(2**61 + 1)
