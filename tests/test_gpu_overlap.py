"""Overlap on CUDA: the host prepares step N+1 while the device still runs step N (CUDA
events recorded after each step's device work is issued). Skipped without CUDA; run on a GPU
machine with ``pytest -m gpu``."""

import numpy as np
import pytest
import torch

from engine.config import EngineConfig
from engine.engine import Engine
from engine.host_time import NO_TIMER
from engine.sampling import SamplingParams
from models.checkpoint import load_checkpoint

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def _engine(overlap: bool):
    model, tok = load_checkpoint(dtype="float32", device="cuda")
    cfg = EngineConfig(device="cuda", max_num_seqs=64, enforce_eager=True, no_overlap=not overlap)
    return Engine(model, cfg, tokenizer=tok)


def _requests(e: Engine, n: int = 64, steps: int = 48):
    rng = np.random.default_rng(0)
    params = SamplingParams(max_tokens=steps, temperature=0.0, ignore_eos=True)
    return [e.add(f"r{i}", rng.integers(1, 8000, 200).tolist(), params)[0] for i in range(n)]


def test_host_submits_step_n_plus_1_while_the_device_runs_step_n():
    e = _engine(True)
    done: list[torch.cuda.Event] = []  # one per step, recorded after its device work
    real_execute = e.runner.execute

    def execute(prep, tokens, timer=NO_TIMER):
        logits = real_execute(prep, tokens, timer)
        # a device step as long as a large model's (the built-in one's takes microseconds):
        # a kernel that spins on the device for some ms after the step's own
        torch.cuda._sleep(10_000_000)
        ev = torch.cuda.Event()
        ev.record()
        done.append(ev)
        return logits

    e.runner.execute = execute
    busy = []  # at each submit: whether the device was still running the latest step issued
    real_submit = e.overlap.queue.submit

    def submit(fn, *args):
        if done:
            busy.append(not done[-1].query())
        return real_submit(fn, *args)

    e.overlap.queue.submit = submit
    seqs = _requests(e)
    e.run_until_done()
    e.close()
    assert all(s.finish_reason == "length" for s in seqs)
    steady = busy[4:-4]
    # the host's work for step N+1 is done before the device has finished step N
    assert sum(steady) >= 0.8 * len(steady), busy


def test_overlap_tokens_equal_no_overlap_on_cuda():
    outs = []
    for overlap in (False, True):
        e = _engine(overlap)
        seqs = _requests(e, 16, 24)
        e.run_until_done()
        e.close()
        outs.append([s.output_ids for s in seqs])
    assert outs[0] == outs[1]
