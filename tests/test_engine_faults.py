"""A fault that belongs to one sequence fails that sequence alone; prompt scoring without
generation (max_tokens 0). The engine on the tiny model, no server."""

import pytest
import torch

import engine.engine as engine_module
from engine.config import EngineConfig
from engine.engine import Engine
from engine.sampling import BadParams, SamplingParams

from .conftest import tiny_model

POISON = 666  # the culprit's seed: the injected sampler fault fires on any batch holding it


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def _engine(model) -> Engine:
    return Engine(model, EngineConfig(max_num_seqs=8, max_num_batched_tokens=64, kv_blocks=64))


def _run(model, requests: dict[str, tuple[list[int], SamplingParams]]):
    eng = _engine(model)
    seqs = {rid: eng.add(rid, ids, p) for rid, (ids, p) in requests.items()}
    outs = []
    while eng.has_work:
        outs += eng.step()
    return eng, seqs, outs


def _requests():
    return {
        "greedy": ([1, 2, 3], SamplingParams(max_tokens=10, temperature=0.0)),
        "seeded": ([4, 5], SamplingParams(max_tokens=10, temperature=1.0, seed=3, n=2)),
        "filtered": ([7], SamplingParams(max_tokens=10, temperature=0.7, top_p=0.8, seed=9)),
    }


def test_a_row_that_breaks_the_batched_sampler_fails_alone(model, monkeypatch):
    _sampler_fault_fails_the_culprit_alone(model, monkeypatch)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_row_that_breaks_the_batched_sampler_fails_alone_on_the_device(monkeypatch):
    _sampler_fault_fails_the_culprit_alone(tiny_model().cuda(), monkeypatch)


def _sampler_fault_fails_the_culprit_alone(model, monkeypatch):
    alone = {rid: [s.output_ids for s in seqs] for rid, seqs in _run(model, _requests())[1].items()}
    real, calls = engine_module.sample, []

    def sampler_that_breaks_on_the_culprit(logits, rows):
        calls.append(len(rows))
        if any(r.params.seed == POISON for r in rows):  # what the old multinomial raised
            raise RuntimeError("probability tensor contains either inf, nan or element < 0")
        return real(logits, rows)

    monkeypatch.setattr(engine_module, "sample", sampler_that_breaks_on_the_culprit)
    reqs = _requests()
    reqs["culprit"] = ([8, 9], SamplingParams(max_tokens=10, temperature=1.0, seed=POISON))
    eng, seqs, outs = _run(model, reqs)
    assert max(calls) == 5  # the culprit shared a batch with all four others
    failed = [o for o in outs if o.error]
    assert [o.seq for o in failed] == seqs["culprit"]
    assert "probability tensor" in failed[0].error and not failed[0].bad_params
    assert seqs["culprit"][0].finish_reason == "error"
    for rid, want in alone.items():
        assert [s.output_ids for s in seqs[rid]] == want, rid
        assert all(s.finish_reason == "length" for s in seqs[rid])
    assert eng.cache.free_blocks == 64 and isinstance(eng.fault, RuntimeError)


def test_a_sequence_whose_detokenizer_raises_fails_alone(model):
    params = SamplingParams(max_tokens=6, temperature=0.8, seed=2)
    alone = _run(model, {"good": ([1, 2], params)})[1]["good"][0].output_ids
    eng = _engine(model)
    good = eng.add("good", [1, 2], params)[0]
    bad = eng.add("bad", [1, 2], SamplingParams(max_tokens=6, temperature=0.0))[0]

    class BrokenDetokenizer:
        stopped = False

        def add(self, token_id: int) -> str:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")

    bad.detok = BrokenDetokenizer()
    outs = []
    while eng.has_work:
        outs += eng.step()
    assert [o.seq for o in outs if o.error] == [bad]
    assert good.finish_reason == "length" and good.output_ids == alone
    assert bad.finish_reason == "error" and len(bad.output_ids) == 1


def test_a_prompt_whose_scoring_raises_fails_alone(model, monkeypatch):
    real = engine_module.prompt_logprobs

    def scorer_that_breaks_for_k_5(logits, targets, k):
        if k == 5:
            raise RuntimeError("scoring fault")
        return real(logits, targets, k)

    monkeypatch.setattr(engine_module, "prompt_logprobs", scorer_that_breaks_for_k_5)
    echo = dict(max_tokens=2, temperature=0.0, echo=True)
    eng, seqs, outs = _run(
        model,
        {
            "ok": ([1, 2, 3, 4], SamplingParams(logprobs=1, **echo)),
            "bad": ([5, 6, 7], SamplingParams(logprobs=5, **echo)),
        },
    )
    assert [o.seq for o in outs if o.error] == seqs["bad"]
    ok = seqs["ok"][0]
    assert ok.finish_reason == "length" and len(ok.prompt_logprobs) == 4
    assert ok.prompt_logprobs[0] is None and all(lp.logprob <= 0 for lp in ok.prompt_logprobs[1:])


def test_max_tokens_0_scores_the_prompt_and_generates_nothing(model):
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    eng, seqs, outs = _run(
        model,
        {
            "score": (prompt, SamplingParams(max_tokens=0, echo=True, logprobs=2)),
            "gen": (prompt, SamplingParams(max_tokens=3, temperature=0.0, echo=True, logprobs=2)),
        },
    )
    score, gen = seqs["score"][0], seqs["gen"][0]
    assert score.output_ids == [] and score.finish_reason == "length"
    assert [o.token_ids for o in outs if o.seq is score] == [[]]
    assert len(score.prompt_logprobs) == len(prompt)
    for a, b in zip(score.prompt_logprobs[1:], gen.prompt_logprobs[1:]):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-5) and len(a.top) == 2
    assert eng.cache.free_blocks == 64


def test_parameters_no_sampler_can_honour_are_refused_at_add(model):
    eng = _engine(model)
    vocab = model.config.vocab_size
    with pytest.raises(BadParams, match="outside the vocab") as e:
        eng.add("x", [1], SamplingParams(logit_bias={vocab: 5.0}))
    assert e.value.param == "logit_bias"
    with pytest.raises(BadParams, match="finite"):
        eng.add("x", [1], SamplingParams(temperature=float("nan")))
    assert not eng.has_work
    # a huge top_k is "no limit", not an overflow
    seq = eng.add("x", [1], SamplingParams(top_k=10**30, max_tokens=2, seed=1))[0]
    eng.run_until_done()
    assert seq.finish_reason == "length" and len(seq.output_ids) == 2
    assert torch.tensor(seq.output_ids).lt(vocab).all()
