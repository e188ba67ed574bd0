"""The engine's device paths, checked on the CPU: the Triton paged-attention backend (in
Triton's interpreter) against the SDPA reference, and the CUDA-graph decode path (its static
buffers, padding and pieces, run eagerly) against the plain step."""

import numpy as np
import pytest
import torch

from engine.config import EngineConfig
from engine.cuda_graph import bucket_sizes
from engine.engine import Engine
from engine.kv_cache import KVCache
from engine.model_runner import ModelRunner
from engine.paged_attention import triton_available
from engine.sampling import SamplingParams

from .conftest import DEV, new_seq, tiny_model

pytestmark = pytest.mark.skipif(not triton_available(), reason="needs triton")


def _logits(model, attention, schedule, seqs_ids):
    cache = KVCache(model.config, 64, 4, len(seqs_ids), device=DEV)
    runner = ModelRunner(model, cache, attention=attention)
    states = [new_seq(cache) for _ in seqs_ids]
    pos, got = [0] * len(seqs_ids), []
    for chunk in schedule:
        active = [i for i, n in enumerate(chunk) if n > 0]
        new = [seqs_ids[i][pos[i] : pos[i] + chunk[i]] for i in active]
        got.append(runner.step([states[i] for i in active], new, all_logits=True))
        for i, ids in zip(active, new):
            pos[i] += len(ids)
    return torch.cat(got)


def test_paged_kernels_match_the_reference_through_the_runner():
    model = tiny_model().to(DEV)
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, 300, size=40).tolist() for _ in range(3)]
    # prompt chunks spanning blocks, decodes, mixed steps, a chunk on a cached prefix
    schedule = [[5, 9, 1], [3, 1, 7], [1, 1, 1], [1, 6, 1], [1, 1, 1], [9, 1, 0]]
    ref = _logits(model, "reference", schedule, seqs)
    got = _logits(model, "triton", schedule, seqs)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_bucket_sizes_cover_every_batch():
    assert bucket_sizes(1) == [1]
    assert bucket_sizes(6) == [1, 2, 4, 6]
    assert bucket_sizes(8) == [1, 2, 4, 8]


def _run(model, static: bool, kv_blocks: int):
    cfg = EngineConfig(
        max_num_seqs=5,
        max_num_batched_tokens=24,
        kv_blocks=kv_blocks,
        block_size=4,
        attention="triton" if static else "reference",
        static_decode=static,
    )
    engine = Engine(model, cfg)
    rng = np.random.default_rng(3)
    outs, step = {}, 0
    lengths = [7, 3, 12, 5, 9, 4, 6]
    while len(outs) < len(lengths) or engine.has_work:
        if step < len(lengths):  # one request joins per step: buckets change as they come
            prompt = rng.integers(0, 300, size=lengths[step]).tolist()
            params = SamplingParams(max_tokens=6 + 3 * (step % 3), temperature=0.0)
            outs[step] = engine.add(f"r{step}", prompt, params)[0]
        engine.step()
        step += 1
    assert engine.fault is None
    return {k: s.output_ids for k, s in outs.items()}, engine


@pytest.mark.parametrize("kv_blocks", [64, 9])  # 9 blocks of 4 tokens: preemption
def test_static_decode_buffers_equal_the_plain_step(kv_blocks):
    model = tiny_model(5).to(DEV)
    ref, _ = _run(model, False, kv_blocks)
    got, engine = _run(model, True, kv_blocks)
    assert got == ref
    graphs = engine.runner.graphs
    assert graphs is not None and graphs.steps > 10  # decode steps took the static path
    if kv_blocks == 9:
        assert engine.scheduler.num_preempted > 0


def test_graph_steps_carry_their_table_writes_and_gather_the_buckets_tables():
    """A graph step sends no block tables: the writes since the step before (a decode token
    that starts a block) reach the device-side tables, and the bucket's fixed tables are
    gathered from them by slot. Checked after every step, in series, against the host's."""
    model = tiny_model(5).to(DEV)
    cfg = EngineConfig(
        max_num_seqs=4,
        max_num_batched_tokens=24,
        kv_blocks=64,
        block_size=4,
        attention="triton",
        static_decode=True,
        no_overlap=True,
    )
    engine = Engine(model, cfg)
    runner, graphs = engine.runner, engine.runner.graphs
    rng = np.random.default_rng(1)
    for i in range(3):
        prompt = rng.integers(0, 300, size=5 + 2 * i).tolist()
        engine.add(f"r{i}", prompt, SamplingParams(max_tokens=11, temperature=0.0))
    checked, before = 0, graphs.steps
    while engine.has_work:
        running = list(engine.scheduler.running)
        engine.step()
        if graphs.steps == before:  # a prefill (eager) step
            continue
        before = graphs.steps
        bucket = graphs.buckets[graphs.bucket_for(len(running))]
        for row, seq in enumerate(running):
            if seq.finished:
                continue
            want = torch.tensor(seq.block_table, dtype=torch.int32)
            assert torch.equal(runner.tables.tables[seq.slot, : len(want)].cpu(), want)
            assert torch.equal(bucket.views["block_tables"][row, : len(want)].cpu(), want)
            checked += 1
    # decode steps past blocks of 4 tokens: graph steps started blocks of their own
    assert graphs.steps >= 8 and checked >= 15


@pytest.mark.parametrize("batch", [1, 4])
def test_a_graph_steps_host_arrays_do_not_grow_with_the_models_context(batch):
    """What the host packs and uploads for a graph decode step is O(batch): the same bytes
    whether the model reads 64 or 8k positions (block tables are gathered on the device)."""
    sizes = []
    for limit in (64, 8192):
        model = tiny_model(2, max_position_embeddings=limit).to(DEV)
        cache = KVCache(model.config, 64, 4, batch, device=DEV)
        runner = ModelRunner(model, cache, attention="triton", decode_graphs=True)
        seqs = [new_seq(cache) for _ in range(batch)]
        runner.step(seqs, [[3, 4, 5, 6, 7]] * batch)  # a prefill (eager): blocks reserved
        prep = runner.prepare(seqs, [[8]] * batch)  # one token each, inside its block
        assert prep.graph
        sizes.append({k: a.nbytes for k, a in prep.parts.items()})
    assert sizes[0] == sizes[1] and "block_tables" not in sizes[0]
