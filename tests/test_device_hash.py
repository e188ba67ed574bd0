"""The torch finish of a step's rows (engine/device_hash.py) equals the numpy hasher, bit for
bit: every order/head layout, compression lookups, random and edge ids."""

import numpy as np
import pytest
import torch

from engine.device_hash import DeviceRows
from engine.step_rows import NgramState
from models.checkpoint import load_checkpoint
from tests.conftest import tiny_model

I64 = np.iinfo(np.int64)

# (max_ngram_size, heads per order): the built-in model's and synthetic models' layouts
LAYOUTS = [(2, 1), (3, 2), (3, 8), (4, 4), (5, 3)]


def _tiny(n: int, heads: int, compressed: bool):
    vocab = [101, 211, 307, 401][: n - 1]
    kw = dict(engram_max_ngram_size=n, engram_n_heads=heads, engram_vocab_size=vocab)
    if not compressed:
        return tiny_model(**kw)
    m = tiny_model(engram_compressed_vocab_size=120, **kw)
    rng = np.random.default_rng(n * 10 + heads)
    m.compression = rng.integers(0, 120, m.config.vocab_size).astype(np.int64)
    return m


@pytest.fixture(scope="module")
def builtin():
    return load_checkpoint(load_tables=False)[0]


def _models(builtin):
    yield "builtin", builtin
    for n, heads in LAYOUTS:
        for comp in (False, True):
            yield f"n{n}h{heads}{'c' if comp else ''}", _tiny(n, heads, comp)


def _ids(rng, hi: int, size: int) -> np.ndarray:
    ids = rng.integers(0, hi, size)
    ids[:3] = [0, hi - 1, hi // 2]  # the ends of the range
    return ids.astype(np.int64)


def test_no_product_wraps_for_ids_in_the_compressed_vocab(builtin):
    """Why int64 torch equals numpy: c * m < 2**63 for every id c < V and multiplier m."""
    for name, model in _models(builtin):
        h = model.hasher
        top = max(int(m.max()) for m in h.multipliers.values()) if h.layer_ids else 0
        assert top * (h.compressed_vocab_size - 1) <= int(I64.max), name


@pytest.mark.parametrize("seed", range(3))
def test_rows_equal_numpy(builtin, seed):
    for name, model in _models(builtin):
        state = NgramState(model, 4)
        dev = DeviceRows(state, "cpu")
        rng = np.random.default_rng(seed)
        D = 64
        hist = _ids(rng, model.hasher.compressed_vocab_size, D * state.n1).reshape(D, state.n1)
        hist[-1] = model.hasher.pad_id  # a fresh slot
        toks = _ids(rng, model.config.vocab_size, D)
        part = state.partial(hist)
        want = state.finish(model.compress(toks), part)
        got = dev.rows(torch.from_numpy(toks), torch.from_numpy(part))
        assert got.dtype == torch.int64
        assert np.array_equal(got.numpy(), want), name
        assert np.array_equal(dev.partial(torch.from_numpy(hist)).numpy(), part), name
        assert np.array_equal(dev.compress(torch.from_numpy(toks)).numpy(), model.compress(toks)), (
            name
        )


def test_wraps_like_numpy_at_the_int64_edges(builtin):
    """Ids outside the vocabulary (negative ones pass the lookup): products wrap the same."""
    edges = np.array([I64.max, I64.min, -1, I64.max - 1, I64.min + 1, 1 << 62, -(1 << 62)])
    rng = np.random.default_rng(7)
    vals = np.concatenate([edges, rng.integers(I64.min, I64.max, 57, dtype=np.int64)])
    for name, model in _models(builtin):
        model = _tiny(3, 2, False) if model.compression is not None else model
        state = NgramState(model, 2)
        dev = DeviceRows(state, "cpu")
        if not state.layers:
            continue
        hist = rng.permutation(np.resize(vals, vals.size * state.n1)).reshape(-1, state.n1)
        own = vals.copy()
        with np.errstate(over="ignore"):
            part = state.partial(hist)
            want = state.finish(own, part)
        assert np.array_equal(dev.partial(torch.from_numpy(hist)).numpy(), part), name
        got = dev.finish(torch.from_numpy(own), torch.from_numpy(part))
        assert np.array_equal(got.numpy(), want), name


def test_placeholder_rows_filled_on_the_device_side_equal_rows_finish(builtin):
    """A step with tokens still "on the device": Rows.finish (host) vs DeviceRows.fill."""
    for name, model in _models(builtin):
        S = 6
        a, b = NgramState(model, S + 1), NgramState(model, S + 1)
        dev = DeviceRows(b, "cpu")
        rng = np.random.default_rng(3)
        slots = np.arange(S)
        prompt = [[int(t) for t in _ids(rng, model.config.vocab_size, 5)] for _ in range(S)]
        a.step(slots, prompt, [True] * S)
        b.step(slots, prompt, [True] * S)
        known = [True, False, False, True, False, False]
        new = [[int(rng.integers(0, model.config.vocab_size))] for _ in range(S)]
        ids = [x if k else [-1] for x, k in zip(new, known)]
        ra, rb = a.step(slots, ids, known), b.step(slots, ids, known)
        toks = np.array([x[0] for x, k in zip(new, known) if not k], np.int64)
        want = ra.finish(toks)
        rows = {lid: torch.from_numpy(r.copy()) for lid, r in rb.rows.items()}
        t = torch.from_numpy
        got = dev.fill(rows, t(rb.wait), t(toks), t(rb.partial))
        for lid in a.layers:
            assert np.array_equal(got[lid].numpy(), want[lid]), (name, lid)
