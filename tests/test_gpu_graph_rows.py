"""CUDA-graph decode steps with step N's tokens on the device (overlap, ``device_rows``, on by
default on CUDA): with the graphs captured, tokens and each step's rows equal eager steps' and
the host-hashed graph path's, on the resident and UVA paths; CUDA events show the device
replaying step N+1 before the host's read of step N's tokens returned; and the device side of
such a step makes no host sync (and gives the tokens steps in series give). Skipped without
CUDA (``pytest -m gpu`` on a GPU machine)."""

import numpy as np
import pytest
import torch

from engine import model_runner
from engine import overlap as overlap_mod
from engine.config import EngineConfig
from engine.device_hash import DeviceRows
from engine.engine import Engine
from engine.host_time import NO_TIMER
from engine.sampling import SamplingParams
from engine.sequence import PLACEHOLDER
from models.checkpoint import load_checkpoint
from tests.test_overlap_device_rows import rows_with_and_without

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def _timed() -> torch.cuda.Event:
    return torch.cuda.Event(enable_timing=True)


@pytest.fixture
def graph_steps(monkeypatch):
    """How many graph steps took step N's tokens on the device."""
    count = [0]
    real = model_runner.graph_step

    def counted(*args, **kwargs):
        count[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(model_runner, "graph_step", counted)
    return count


def _rows_factory(model, gather: str, made: list):
    """The engines' row path: None (resident, the default) or a fresh UVA prefetcher each."""
    if gather == "resident":
        return None
    from offload.offloaded_model import OffloadedModel
    from offload.store import cupy_ok

    if not cupy_ok():
        pytest.skip("needs CuPy for the pinned host tier")

    def rows():
        om = OffloadedModel.from_model(model, "host", "uva", device="cuda")
        made.append(om)
        return om.prefetcher

    return rows


@pytest.mark.parametrize("gather", ["resident", "uva"])
def test_captured_replay_with_device_tokens_equals_eager(gather, graph_steps):
    model, tok = load_checkpoint(dtype="float32", device="cuda")
    made: list = []
    rows = _rows_factory(model, gather, made)
    try:
        # graphs captured: device tokens (the default), then host-hashed
        (tg, rg, on), (th, rh, off) = rows_with_and_without(
            model, tok, "cuda", rows, None, enforce_eager=False
        )
        on_graphs = graph_steps[0]
        (te, re_, _), _ = rows_with_and_without(model, tok, "cuda", rows, None)  # eager
    finally:
        for om in made:
            om.close()
    assert on and not off and on_graphs > 10 and graph_steps[0] == on_graphs
    assert tg == th == te and len(rg) == len(rh) == len(re_) > 10
    for g, h, e in zip(rg, rh, re_):
        assert g.keys() == h.keys() == e.keys()
        for lid in g:
            assert torch.equal(g[lid], h[lid]) and torch.equal(g[lid], e[lid])


def test_device_replays_step_n_plus_1_before_the_host_reads_step_n(monkeypatch, graph_steps):
    model, tok = load_checkpoint(dtype="float32", device="cuda")
    e = Engine(model, EngineConfig(device="cuda", max_num_seqs=32), tokenizer=tok)
    assert e.runner.device_rows is not None and e.runner.graphs.capture
    starts: list[torch.cuda.Event] = []  # per step: recorded before its first kernel
    replays: dict[int, torch.cuda.Event] = {}  # graph steps: recorded before the replay
    real_execute, real_replay = e.runner.execute, e.runner.graphs.replay

    def execute(prep, tokens, timer=NO_TIMER):
        ev = _timed()
        ev.record()
        starts.append(ev)
        logits = real_execute(prep, tokens, timer)
        torch.cuda._sleep(10_000_000)  # a large model's step length (the built-in one's: µs)
        return logits

    def replay(bucket, n, pending):
        ev = _timed()
        ev.record()
        replays[len(starts) - 1] = ev
        return real_replay(bucket, n, pending)

    e.runner.execute, e.runner.graphs.replay = execute, replay
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
    assert graph_steps[0] >= 20
    followed = [(k, ev, n) for k, ev, n in reads if k + 1 < len(starts) and k + 1 in replays]
    assert len(followed) >= 20
    # the host issued step N+1 before its read of step N's tokens returned ...
    assert all(issued > k + 1 for k, _, issued in followed)
    # ... and the device began replaying step N+1 before that read had returned
    before = [replays[k + 1].elapsed_time(ev) > 0 for k, ev, _ in followed]
    assert sum(before) >= 0.9 * len(before), f"{sum(before)} of {len(before)}"


@pytest.mark.parametrize("gather", ["resident", "uva"])
def test_no_host_sync_in_the_device_side_of_a_graph_step(gather):
    model, tok = load_checkpoint(dtype="float32", device="cuda")
    made: list = []
    rows = _rows_factory(model, gather, made)
    cfg = EngineConfig(device="cuda", max_num_seqs=8, no_overlap=True)
    e = Engine(model, cfg, rows() if rows else None, tokenizer=tok)
    runner = e.runner
    assert runner.graphs is not None and runner.graphs.capture
    runner.device_rows = DeviceRows(runner.ngram, e.device)
    params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
    seqs = [e.add(f"r{i}", [1 + i, 40 + 3 * i, 7], params)[0] for i in range(5)]
    while not all(s.output_ids for s in seqs):  # prefilled, each with its first token
        e.step()
    # from here the runner is driven directly: each step feeds the one before's argmax as
    # placeholders, on the device
    slots = np.array([s.slot for s in seqs], np.int64)
    tokens = torch.tensor([s.output_ids[-1] for s in seqs], device="cuda")
    steps = []
    try:
        for k in range(3):  # the first warms up (buffers, kernels)
            prep = runner.step(seqs, [[PLACEHOLDER]] * len(seqs), known=[False] * 5, later=True)
            assert prep.graph
            if k:
                torch.cuda.set_sync_debug_mode("error")
            try:
                logits = prep.run(tokens)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            fed, tokens = tokens, logits.argmax(-1)
            runner.ngram.resolved(slots, fed.cpu().numpy())
            steps.append(tokens.tolist())
        # the same greedy sequences stepped by the engine in series, tokens read on the host
        ref = Engine(model, cfg, rows() if rows else None, tokenizer=tok)
        short = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
        want = [ref.add(f"r{i}", [1 + i, 40 + 3 * i, 7], short)[0] for i in range(5)]
        ref.run_until_done()
    finally:
        e.close()
        for om in made:
            om.close()
    assert [list(t) for t in zip(*steps)] == [s.output_ids[1:] for s in want]
