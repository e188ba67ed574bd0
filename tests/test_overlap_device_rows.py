"""Overlap with step N's tokens kept on the device (``device_rows``, CPU tensors here): step
N+1's placeholders get their input ids and Engram rows from them there, and the tokens, text,
stops, aborts and preemption are those of steps in series."""

import pytest
import torch

from engine.config import EngineConfig
from engine.engine import Engine
from engine.model_runner import ModelRunner
from engine.sampling import SamplingParams
from models.checkpoint import load_checkpoint
from tests.test_overlap import _requests, _run


@pytest.fixture(scope="module")
def built():
    torch.set_num_threads(1)
    return load_checkpoint()


@pytest.fixture
def device_steps(monkeypatch):
    """How many steps took the device path."""
    count = [0]
    real = ModelRunner._execute_device

    def counted(self, prep, tokens, timer=None):
        count[0] += 1
        return real(self, prep, tokens) if timer is None else real(self, prep, tokens, timer)

    monkeypatch.setattr(ModelRunner, "_execute_device", counted)
    return count


def _plain(reqs, logprobs=None):
    """No penalties (a penalised row reads its token on the host first)."""
    for _, p in reqs:
        p.presence_penalty, p.repetition_penalty, p.logprobs = 0.0, 1.0, logprobs
    return reqs


@pytest.mark.parametrize("seed", [0, 1])
def test_tokens_text_and_stops_identical(built, device_steps, seed):
    reqs = _plain(_requests(seed, 9))
    a = _run(built, False, reqs)
    b = _run(built, True, reqs, device_rows=True)
    assert a[:3] == b[:3]
    assert "stop" in a[2].values() and "length" in a[2].values()
    assert device_steps[0] > 10


def test_with_penalties_and_logprobs_in_the_mix(built, device_steps):
    reqs = _requests(4, 9)  # penalised rows: those steps read the tokens on the host first
    for i, (_, p) in enumerate(reqs):
        p.logprobs = 2 if i % 3 == 0 else None
    a = _run(built, False, reqs)
    b = _run(built, True, reqs, device_rows=True)
    assert a[:3] == b[:3]
    assert device_steps[0] > 0


def test_preemption_aborts_and_late_joiners(built, device_steps):
    reqs = _plain(_requests(2, 8))
    for _, p in reqs:
        p.max_tokens, p.stop = 40, []
    a = _run(built, False, reqs, kv_blocks=10)
    b = _run(built, True, reqs, kv_blocks=10, device_rows=True)
    assert a[3] > 0 and b[3] > 0
    assert a[:3] == b[:3]
    reqs = _plain(_requests(3, 8))
    for _, p in reqs[:3]:  # the first streams long enough for the late joiners to come
        p.max_tokens, p.stop = 30, []
    abort = {1: 4, 5: 2}
    a = _run(built, False, reqs, join_at=3, abort=abort)
    b = _run(built, True, reqs, join_at=3, abort=abort, device_rows=True)
    assert a[2][1] == "abort" and a[2][5] == "abort"
    assert a[:3] == b[:3]


def test_a_stopped_sequence_s_extra_token_is_not_streamed(built, device_steps):
    model, tok = built
    prompt = tok.encode("def main():\n    ")
    p = SamplingParams(max_tokens=50, temperature=0.0, stop=["\n"])
    a = _run(built, False, [(prompt, p)])
    b = _run(built, True, [(prompt, p)], device_rows=True)
    assert a[2][0] == "stop" and a == b and "\n" not in b[1][0]
    assert device_steps[0] > 0


def test_on_by_default_only_on_cuda_and_for_paths_reading_device_ids(built):
    model, tok = built
    assert Engine(model, EngineConfig(device="cpu")).runner.device_rows is None
    on = Engine(model, EngineConfig(device="cpu", device_rows=True)).runner.device_rows
    assert on is not None
    assert (
        Engine(
            model, EngineConfig(device="cpu", device_rows=True, no_overlap=True)
        ).runner.device_rows
        is None
    )


def capture_rows(engine: Engine) -> list[dict]:
    """Every step's requested Engram rows ``{layer: [N * heads]}`` (on the host), in request
    order, as the gather reads them (a sorted plan's positions put back)."""
    log, real = [], engine.runner.rows.start

    def start(plan, index=None, uploaded=None):
        got = {}
        for lid, lp in plan.layers.items():
            f = torch.from_numpy(lp.fetch) if index is None else index[f"fetch{lid}"]
            pos = None if index is None else index.get(f"positions{lid}")
            if pos is not None:
                placed = torch.empty_like(f)
                placed[pos] = f
                f = placed
            got[lid] = f.cpu().clone()
        log.append(got)
        return real(plan, index, uploaded)

    engine.runner.rows.start = start
    return log


def rows_with_and_without(
    model, tok, device: str, rows=None, device_rows=True, num_seqs=6, max_tokens=12, **config
):
    """Tokens and each step's rows of one workload, rows hashed on the device or the host
    (``config``: engine settings besides eager steps and 8 sequences)."""
    out = []
    for on in (device_rows, False):
        settings = {"max_num_seqs": 8, "enforce_eager": True, **config}
        cfg = EngineConfig(device=device, device_rows=on, **settings)
        e = Engine(model, cfg, rows() if rows else None, tokenizer=tok)
        log = capture_rows(e)
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        prompts = [[1 + i, 40 + 3 * i, 7] for i in range(num_seqs)]
        seqs = [e.add(f"r{i}", p, params)[0] for i, p in enumerate(prompts)]
        e.run_until_done()
        e.close()
        out.append(([s.output_ids for s in seqs], log, e.runner.device_rows is not None))
    return out


def test_rows_bit_identical_to_the_host_hashed_path(built):
    model, tok = built
    (ta, ra, on), (tb, rb, off) = rows_with_and_without(model, tok, "cpu")
    assert on and not off and ta == tb and len(ra) == len(rb) > 10
    for a, b in zip(ra, rb):
        assert a.keys() == b.keys()
        for lid in a:
            assert torch.equal(a[lid], b[lid])
