"""Step N+1 on the device before the host reads step N's tokens (``device_rows``, on by
default on CUDA): CUDA events around each step's first kernel against an event the host
enqueues once its read of the step before returned; and the rows hashed on the device equal
the host's, bit for bit, on the resident and UVA paths. Skipped without CUDA (``pytest -m
gpu`` on a GPU machine)."""

import numpy as np
import pytest
import torch

from engine import overlap as overlap_mod
from engine.config import EngineConfig
from engine.engine import Engine
from engine.host_time import NO_TIMER
from engine.sampling import SamplingParams
from models.checkpoint import load_checkpoint
from tests.test_overlap_device_rows import rows_with_and_without

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def _timed() -> torch.cuda.Event:
    return torch.cuda.Event(enable_timing=True)


def test_device_starts_step_n_plus_1_before_the_host_reads_step_n(monkeypatch):
    model, tok = load_checkpoint(dtype="float32", device="cuda")
    cfg = EngineConfig(device="cuda", max_num_seqs=32, enforce_eager=True)
    e = Engine(model, cfg, tokenizer=tok)
    assert e.runner.device_rows is not None  # on by default on CUDA with resident tables
    starts: list[torch.cuda.Event] = []  # per step: recorded before its first kernel
    real_execute = e.runner.execute

    def execute(prep, tokens, timer=NO_TIMER):
        ev = _timed()
        ev.record()
        starts.append(ev)
        logits = real_execute(prep, tokens, timer)
        torch.cuda._sleep(10_000_000)  # a large model's step length (the built-in one's: µs)
        return logits

    e.runner.execute = execute
    real_sample = e.overlap._sample_on_device

    def sample(logits, rows):
        got = real_sample(logits, rows)
        if isinstance(got, overlap_mod.StepTokens):
            got.step = len(starts) - 1  # the step that just ran on the worker
        return got

    e.overlap._sample_on_device = sample
    side = torch.cuda.Stream()
    reads = []  # (step, event enqueued once the host's first read returned, steps issued)
    real_read = overlap_mod.StepTokens.read

    def read(self):
        first = self._got is None
        got = real_read(self)
        if first:
            ev = _timed()
            ev.record(side)  # an idle stream: it runs as soon as the host enqueues it
            reads.append((self.step, ev, len(starts)))
        return got

    monkeypatch.setattr(overlap_mod.StepTokens, "read", read)
    rng = np.random.default_rng(0)
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    for i in range(32):
        e.add(f"r{i}", rng.integers(1, 8000, 64).tolist(), params)
    e.run_until_done()
    e.close()
    torch.cuda.synchronize()
    followed = [(k, ev, issued) for k, ev, issued in reads if k + 1 < len(starts)]
    assert len(followed) >= 20
    # the host issued step N+1 before its read of step N's tokens returned ...
    assert all(issued > k + 1 for k, _, issued in followed)
    # ... and the device began step N+1 before that read had returned
    before = [starts[k + 1].elapsed_time(ev) > 0 for k, ev, _ in followed]
    assert sum(before) >= 0.9 * len(before), f"{sum(before)} of {len(before)}"


@pytest.mark.parametrize("gather", ["resident", "uva"])
def test_rows_bit_identical_to_the_host_hashed_path_on_cuda(gather):
    model, tok = load_checkpoint(dtype="float32", device="cuda")
    made = []

    def rows():
        if gather == "resident":
            return None  # the engine's default: the model's tables on the device
        from offload.offloaded_model import OffloadedModel
        from offload.store import cupy_ok

        if not cupy_ok():
            pytest.skip("needs CuPy for the pinned host tier")

        om = OffloadedModel.from_model(model, "host", "uva", device="cuda")
        made.append(om)
        return om.prefetcher

    (ta, ra, on), (tb, rb, off) = rows_with_and_without(model, tok, "cuda", rows, None)
    for om in made:
        om.close()
    assert on and not off and ta == tb and len(ra) == len(rb) > 10
    for a, b in zip(ra, rb):
        assert a.keys() == b.keys()
        for lid in a:
            assert torch.equal(a[lid], b[lid])
