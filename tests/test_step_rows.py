"""Two-part n-gram hashing from per-slot state equals full hashing, bit for bit."""

import numpy as np
import pytest

from engine.step_rows import NgramState
from models.checkpoint import load_checkpoint


@pytest.fixture(scope="module")
def model():
    return load_checkpoint(load_tables=False)[0]


@pytest.mark.parametrize("seed", range(6))
def test_steps_at_random_split_points_equal_full_hashing(model, seed):
    rng = np.random.default_rng(seed)
    S = 5
    tokens = [rng.integers(0, model.config.vocab_size, int(rng.integers(3, 40))) for _ in range(S)]
    state = NgramState(model, S + 1)
    slots = np.arange(S)
    fed = [0] * S
    got = [{lid: [] for lid in state.layers} for _ in range(S)]
    pending = None  # (slots, token ids) fed as placeholders in the last step
    while any(f < len(t) for f, t in zip(fed, tokens)):
        live = [i for i in range(S) if fed[i] < len(tokens[i])]
        new, known = [], []
        for i in live:  # a chunk of random length, or one token that may still be "on device"
            n = 1 if rng.random() < 0.5 else int(rng.integers(1, len(tokens[i]) - fed[i] + 1))
            new.append([int(t) for t in tokens[i][fed[i] : fed[i] + n]])
            known.append(not (n == 1 and rng.random() < 0.5))
        if pending is not None:  # the placeholders of the step before are resolved first
            state.resolved(*pending)
        ids = [x if k else [-1] for x, k in zip(new, known)]
        rows = state.step(slots[live], ids, known)
        waiting = [x[0] for x, k in zip(new, known) if not k]
        out = rows.finish(np.array(waiting, np.int64))
        wait_slots = [i for i, k in zip(live, known) if not k]
        pending = (np.array(wait_slots, np.int64), np.array(waiting, np.int64))
        at = 0
        for i, x in zip(live, new):
            for lid in state.layers:
                got[i][lid].append(out[lid][at : at + len(x)])
            at += len(x)
            fed[i] += len(x)
    for i in range(S):
        full = model.full_row_ids(tokens[i][None, :])
        for lid in state.layers:
            assert np.array_equal(np.concatenate(got[i][lid]), full[lid][0])


def test_fresh_slot_starts_from_pad(model):
    state = NgramState(model, 2)
    ids = [[5, 6, 7]]
    a = state.step(np.array([0]), ids, [True]).finish(np.empty(0))
    state.reset([0])
    b = state.step(np.array([0]), ids, [True]).finish(np.empty(0))
    for lid in state.layers:
        assert np.array_equal(a[lid], b[lid])


@pytest.mark.parametrize("rows", [1, 7, 256])
def test_partial_equals_the_accumulated_products(model, rows):
    """One XOR per order gives what XOR-accumulating the whole product gives, int64 wrap
    included (ids near the int64 bound overflow their products)."""
    state = NgramState(model, 2)
    rng = np.random.default_rng(rows)
    history = rng.integers(0, model.config.engram_compressed_vocab_size, (rows, state.n1))
    history[0] = np.iinfo(np.int64).max // 3  # products far past the int64 bound
    prod = history[:, None, ::-1] * state.mult[None, :, 1:]
    want = np.bitwise_xor.accumulate(prod, axis=2)
    got = state.partial(history)
    assert got.dtype == np.int64 and got.shape == want.shape
    assert np.array_equal(got, want)
    assert (prod[0] < 0).any()  # the test does reach the wrap
