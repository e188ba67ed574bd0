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


def test_the_step_after_a_failed_one_reads_its_table_writes():
    """An overlapped step that fails on the device's side after it took the table writes
    (``KVCache.take_written``): the step submitted after it, prepared before the host knew,
    still attends over block tables equal to the host's (the failed step's writes are applied
    before it runs)."""
    from engine.config import EngineConfig
    from engine.engine import Engine

    torch.set_num_threads(1)
    model, tok = load_checkpoint()
    cfg = EngineConfig(device="cpu", max_num_seqs=4, max_num_batched_tokens=64, block_size=BS)
    e = Engine(model, cfg, tokenizer=tok)
    runner, cache = e.runner, e.cache
    expected, failing, seen, bad = {}, [], [], []
    prepare, execute = runner.prepare, runner.execute

    def recording_prepare(seqs, *args, **kwargs):
        prep = prepare(seqs, *args, **kwargs)
        slots = prep.parts["conv_slots"]
        expected[id(prep)] = (cache.tables[slots].copy(), prep.parts["context_lens"].copy())
        written = prep.parts.get("table_slots")
        # the first decode step that carries a new block: it will fail on the device's side
        if not failing and written is not None and written.size and len(seqs) == 3 and seen:
            failing.append(id(prep))
        return prep

    def failing_execute(prep, tokens, timer=None):
        if id(prep) in failing:
            raise RuntimeError("injected: the step fails after it took the table writes")
        current[0] = id(prep)
        return execute(prep, tokens)

    current = [None]
    forward = model.forward_step

    def checking_forward(input_ids, step, logits_index):
        tables, lens = expected[current[0]]
        got = step.inp.block_tables
        for i, n in enumerate(-(-lens // BS)):
            if got[i, :n].tolist() != tables[i, :n].tolist():
                bad.append((len(seen), i))
        seen.append(current[0])
        return forward(input_ids, step, logits_index)

    runner.prepare, runner.execute = recording_prepare, failing_execute
    model.forward_step = checking_forward
    try:
        params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
        seqs = [e.add(f"r{i}", list(range(1, 6 + 4 * i)), params)[0] for i in range(3)]
        finished = {}
        while e.has_work:
            for out in e.step():
                if out.finish_reason:
                    finished[out.seq.request_id] = out.finish_reason
    finally:
        del model.forward_step
        e.close()
    assert failing and finished == {s.request_id: "error" for s in seqs}
    # the step submitted after the failed one ran (its tokens dropped) and was checked
    assert seen[-1] != failing[0] and len(seen) >= 2
    assert not bad, f"stale block-table entries at (step, row) {bad}"
