"""Overlapped steps give exactly what steps in series give: tokens, text, stops, aborts,
preemption, late joiners; a finished sequence's extra token is never streamed."""

import numpy as np
import pytest
import torch

from engine.config import EngineConfig
from engine.engine import Engine
from engine.sampling import SamplingParams
from models.checkpoint import load_checkpoint


@pytest.fixture(scope="module")
def built():
    torch.set_num_threads(1)
    return load_checkpoint()


def _requests(seed: int, n: int):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        prompt = rng.integers(1, 8000, int(rng.integers(2, 50))).tolist()
        params = SamplingParams(
            max_tokens=int(rng.integers(1, 40)),
            temperature=[0.0, 0.8, 1.3][i % 3],
            seed=1000 * seed + i,  # seeded: the same tokens whatever the batch
            top_p=0.9 if i % 4 == 1 else 1.0,
            stop=["\n", "(", "e"][i % 3 : i % 3 + 1] if i % 2 else [],
            presence_penalty=0.5 if i % 5 == 2 else 0.0,
            repetition_penalty=1.3 if i % 5 == 3 else 1.0,
            min_tokens=3 if i % 7 == 4 else 0,
        )
        out.append((prompt, params))
    return out


def _run(
    built,
    overlap: bool,
    reqs,
    kv_blocks=0,
    max_seqs=6,
    join_at=None,
    abort=None,
    device_rows=None,
    full_paths=False,
    **config,
):
    """Every request's streamed (token ids, text) and finish reason. ``join_at``: requests
    from this index on are added once the first has streamed 3 tokens; ``abort``: request
    index -> abort it once it has streamed this many tokens; ``config``: more engine
    settings; ``full_paths``: every sequence takes the engine's full append and sampler-row
    paths (the flags Engine.add works out cleared)."""
    model, tok = built
    cfg = EngineConfig(
        device="cpu",
        max_num_seqs=max_seqs,
        max_num_batched_tokens=48,
        kv_blocks=kv_blocks,
        no_overlap=not overlap,
        device_rows=device_rows,
        **config,
    )
    e = Engine(model, cfg, tokenizer=tok)
    add = e.add
    if full_paths:

        def add(*args):
            got = e.add(*args)
            for s in got:
                s.plain = s.same_row = False
            return got

    first = len(reqs) if join_at is None else join_at
    seqs = [add(f"r{i}", p, sp)[0] for i, (p, sp) in enumerate(reqs[:first])]
    streamed = {i: [] for i in range(len(reqs))}
    text = {i: "" for i in range(len(reqs))}
    reason = {}
    index = {}
    for i, s in enumerate(seqs):
        index[s] = i
    aborted = set()
    while e.has_work or len(seqs) < len(reqs):
        if len(seqs) < len(reqs) and len(streamed[0]) >= 3:
            for i in range(len(seqs), len(reqs)):
                seqs.append(add(f"r{i}", *reqs[i])[0])
                index[seqs[-1]] = i
        for out in e.step():
            i = index[out.seq]
            assert i not in reason, "nothing streams after a sequence's last output"
            streamed[i] += out.token_ids
            text[i] += out.text
            if out.finish_reason is not None:
                reason[i] = out.finish_reason
        for i, m in (abort or {}).items():
            if i < len(seqs) and len(streamed[i]) >= m and i not in aborted:
                aborted.add(i)
                e.abort([seqs[i]])
                reason.setdefault(i, "abort")
    e.close()
    assert e.cache.free_blocks == e.cache.num_blocks  # every block back
    for s in seqs:  # what was streamed is what the sequence holds
        assert s.output_ids == streamed[index[s]]
    return streamed, text, reason, e.scheduler.num_preempted


@pytest.mark.parametrize("seed", [0, 1])
def test_tokens_text_and_stops_identical_with_and_without_overlap(built, seed):
    reqs = _requests(seed, 9)
    a, b = _run(built, False, reqs), _run(built, True, reqs)
    assert a[:3] == b[:3]
    assert "stop" in a[2].values() and "length" in a[2].values()


def test_preemption_with_a_small_kv_pool(built):
    reqs = _requests(2, 8)
    for _, p in reqs:
        p.max_tokens, p.stop = 40, []
    a, b = _run(built, False, reqs, kv_blocks=10), _run(built, True, reqs, kv_blocks=10)
    assert a[3] > 0 and b[3] > 0  # sequences were preempted and recomputed
    assert a[:3] == b[:3]


def test_late_joiners_and_aborts(built):
    reqs = _requests(3, 8)
    for _, p in reqs[:3]:
        p.max_tokens, p.stop = 30, []
    abort = {1: 4, 5: 2}
    a = _run(built, False, reqs, join_at=3, abort=abort)
    b = _run(built, True, reqs, join_at=3, abort=abort)
    assert a[2][1] == "abort" and a[2][5] == "abort"
    assert a[:3] == b[:3]


def test_a_stopped_sequence_s_extra_token_is_not_streamed(built):
    # greedy, so the stop is found from what the model says; the sequence has run one step
    # past it on the device when its stop is read
    model, tok = built
    prompt = tok.encode("def main():\n    ")
    p = SamplingParams(max_tokens=50, temperature=0.0, stop=["\n"])
    a = _run(built, False, [(prompt, p)])
    b = _run(built, True, [(prompt, p)])
    assert a[2][0] == "stop" and a == b and "\n" not in b[1][0]


def test_no_overlap_is_an_engine_setting(built):
    model, tok = built
    assert Engine(model, EngineConfig(device="cpu"), tokenizer=tok).overlap is not None
    assert Engine(model, EngineConfig(device="cpu", no_overlap=True)).overlap is None


@pytest.mark.parametrize("overlap", [False, True])
def test_the_short_paths_give_what_the_full_paths_give(built, overlap):
    # plain sequences (no stop strings, no logprobs; some sampled at a high temperature, whose
    # tokens are more often pieces of a character) and ones with stop strings, penalties or
    # min_tokens; late joiners and an abort
    reqs = _requests(4, 10)
    for i, (_, p) in enumerate(reqs):
        p.max_tokens = 24
        if i % 3 == 0:
            p.temperature, p.stop = 2.0, []
    probe = Engine(built[0], EngineConfig(device="cpu", no_overlap=True), tokenizer=built[1])
    flags = [s for i, (pr, sp) in enumerate(reqs) for s in probe.add(f"f{i}", pr, sp)]
    assert any(s.plain and s.same_row for s in flags)  # the short paths are taken
    assert any(not s.plain for s in flags) and any(not s.same_row for s in flags)
    abort = {2: 5}
    short = _run(built, overlap, reqs, join_at=4, abort=abort)
    full = _run(built, overlap, reqs, join_at=4, abort=abort, full_paths=True)
    assert short[:3] == full[:3]
    assert "length" in short[2].values() and "abort" in short[2].values()
