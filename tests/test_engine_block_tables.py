"""Through a whole overlapped engine run (admissions while others decode, aborts, preemption
in a small KV pool; on CUDA, CUDA-graph decode steps mixed with eager steps), every eager
step attends over device-side block tables equal to the host's tables as the step was
prepared (engine/block_tables.py). The CPU run has no graph steps; the CUDA one is
``gpu``-marked (``pytest -m gpu`` on a GPU machine)."""

import numpy as np
import pytest
import torch

from engine.config import EngineConfig
from engine.engine import Engine
from engine.sampling import SamplingParams
from models.checkpoint import load_checkpoint


def _run_checked(device: str, **config) -> dict:
    """Run a mixed workload; returns what it saw (steps by kind, preemptions, mismatches)."""
    model, tok = load_checkpoint(dtype="float32", device=device)
    cfg = EngineConfig(device=device, max_num_seqs=8, kv_blocks=24, **config)
    e = Engine(model, cfg, tokenizer=tok)
    runner, cache, bs = e.runner, e.cache, e.cache.block_size
    expected: dict[int, tuple] = {}
    current = [0]
    seen = {"eager": 0, "graph": 0, "bad": []}
    prepare, execute, forward = runner.prepare, runner.execute, model.forward_step

    def recording_prepare(seqs, *args, **kwargs):
        prep = prepare(seqs, *args, **kwargs)
        slots = np.array([s.slot for s in seqs], np.int64)
        lens = np.array([s.num_computed for s in seqs], np.int64)  # advanced: after the step
        expected[id(prep)] = (cache.tables[slots].copy(), lens)
        return prep

    def recording_execute(prep, tokens, timer=None):
        seen["graph" if prep.graph else "eager"] += 1
        current[0] = id(prep)
        return execute(prep, tokens)

    def checking_forward(input_ids, step, logits_index):  # eager steps only (graphs replay)
        tables, lens = expected[current[0]]
        got = step.inp.block_tables.cpu()
        for i, n in enumerate(-(-lens // bs)):
            if got[i, :n].tolist() != tables[i, :n].tolist():
                seen["bad"].append((seen["eager"], i))
        return forward(input_ids, step, logits_index)

    runner.prepare, runner.execute = recording_prepare, recording_execute
    model.forward_step = checking_forward
    rng = np.random.default_rng(0)
    try:
        added, aborted, k = [], 0, 0
        while k < 14 or e.has_work:
            if k < 14 and k % 2 == 0:  # admissions while the others decode
                for _ in range(2):
                    params = SamplingParams(
                        max_tokens=int(rng.integers(20, 60)), temperature=0.0, ignore_eos=True
                    )
                    prompt = rng.integers(1, 8000, int(rng.integers(3, 40))).tolist()
                    added += e.add(f"r{len(added)}", prompt, params)
            if k % 9 == 5:  # an abort: its slot and blocks go to the next admitted
                live = [s for s in added if not s.finished and s.num_computed]
                if live:
                    e.abort([live[int(rng.integers(len(live)))]])
                    aborted += 1
            e.step()
            k += 1
    finally:
        del model.forward_step
        e.close()
    seen["preempted"], seen["aborted"] = e.scheduler.num_preempted, aborted
    return seen


def test_device_tables_follow_the_host_through_an_engine_run():
    torch.set_num_threads(1)
    seen = _run_checked("cpu")
    assert seen["eager"] > 30 and seen["preempted"] > 0 and seen["aborted"] > 0
    assert not seen["bad"], f"stale block-table entries at (step, row) {seen['bad'][:10]}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_tables_follow_the_host_through_graph_and_eager_steps():
    seen = _run_checked("cuda")  # graphs captured: the default on CUDA
    assert seen["graph"] > 20 and seen["eager"] > 10, seen
    assert seen["preempted"] > 0 and seen["aborted"] > 0
    assert not seen["bad"], f"stale block-table entries at (step, row) {seen['bad'][:10]}"
