"""The device-side block tables, kept from the host's writes, equal each sequence's own
block table wherever attention reads it, through admissions, frees, reuse and resyncs."""

import numpy as np
import pytest
import torch

from engine.block_tables import DeviceTables
from engine.kv_cache import KVCache
from engine.sampling import SamplingParams
from engine.sequence import Sequence
from models.checkpoint import load_checkpoint

BS = 4


@pytest.fixture(scope="module")
def config():
    return load_checkpoint(load_tables=False)[0].config


def _apply(tables: DeviceTables, written, live: list[Sequence]) -> torch.Tensor:
    """One step's device side over ``live``: the writes, then their rows."""
    slots = torch.tensor([s.slot for s in live], dtype=torch.int64)
    lens = np.array([s.num_computed for s in live], np.int32)
    width, need = tables.widths(lens, written[1])
    got = tables.step_tables(*(torch.from_numpy(a) for a in written), slots, width, need)
    assert got.dtype == torch.int32 and got.shape == (len(live), width)
    return got


@pytest.mark.parametrize("seed", range(4))
def test_device_tables_equal_the_sequences_tables(config, seed):
    rng = np.random.default_rng(seed)
    cache = KVCache(config, num_blocks=400, block_size=BS, max_seqs=8)
    tables = DeviceTables(cache.max_seqs + 1, BS, torch.device("cpu"))
    live: list[Sequence] = []
    checked = 0
    for step in range(300):
        op = rng.random()
        if op < 0.15 and cache.free_slots:  # admit, with a prompt of some blocks
            seq = Sequence(f"s{step}", 0, [1], SamplingParams(), None)
            cache.admit(seq)
            n = int(rng.integers(1, 90))
            cache.reserve(seq, n)
            seq.num_computed = n
            live.append(seq)
        elif op < 0.25 and live:  # one finishes: its slot and blocks go to the next
            cache.free(live.pop(int(rng.integers(len(live)))))
        for seq in live:  # each decodes a few tokens
            k = int(rng.integers(1, 4))
            if seq.num_computed + k <= 64 * BS * 3:
                cache.reserve(seq, k)
                seq.num_computed += k
        if live and rng.random() < 0.5:  # an eager step: takes what was written since
            got = _apply(tables, cache.take_written(), live)
            for row, seq in zip(got, live):
                n = cache.blocks_for(seq.num_computed)
                assert row[:n].tolist() == seq.block_table[:n]
                assert int(row.max()) < cache.num_blocks  # past a context: still a block
            checked += 1
    assert checked > 50 and tables.tables.shape[1] > 64  # the tables grew on the device


def test_a_resync_sends_every_table(config):
    cache = KVCache(config, num_blocks=64, block_size=BS, max_seqs=4)
    tables = DeviceTables(cache.max_seqs + 1, BS, torch.device("cpu"))
    seqs = []
    for i in range(3):
        seq = Sequence(f"s{i}", 0, [1], SamplingParams(), None)
        cache.admit(seq)
        cache.reserve(seq, 10 + 7 * i)
        seq.num_computed = 10 + 7 * i
        seqs.append(seq)
    cache.take_written()  # these writes never reach the device side (a failed step)
    got = _apply(tables, cache.take_written(everything=True), seqs)
    for row, seq in zip(got, seqs):
        assert row[: len(seq.block_table)].tolist() == seq.block_table
    assert not cache.written
