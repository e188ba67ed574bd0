"""The sampler is safe for every value the API takes: property tests over extreme parameters
and logits in each backbone dtype (huge, tiny, tied), with banned tokens (min_tokens). Always a
valid token id that is not banned, never NaN, at least one token eligible; greedy rows are the
argmax of the adjusted logits."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.sampling import (
    GREEDY_BELOW,
    BadParams,
    SampleRow,
    SamplingParams,
    adjust_logits,
    ban_tokens,
    filtered_logprobs,
    sample,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
PROPS = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@st.composite
def logits(draw):
    dtype = draw(st.sampled_from(DTYPES))
    big = torch.finfo(dtype).max
    tiny = torch.finfo(dtype).tiny
    rows, vocab = draw(st.integers(1, 4)), draw(st.integers(2, 40))
    value = st.one_of(
        st.floats(-big, big, allow_nan=False),
        st.floats(-8.0, 8.0),
        st.sampled_from([big, -big, 0.0, tiny, -tiny, 1e-30, 65504.0, -65504.0]),
    )
    flat = draw(st.lists(value, min_size=rows * vocab, max_size=rows * vocab))
    x = torch.tensor(flat, dtype=torch.float64).clamp(-big, big).reshape(rows, vocab)
    return x.to(dtype)


@st.composite
def params(draw, vocab: int):
    temperature = draw(
        st.one_of(
            st.floats(0.0, 2.0),
            st.sampled_from([0.0, 1e-30, GREEDY_BELOW / 2, GREEDY_BELOW, GREEDY_BELOW * 1.01]),
            st.floats(2.0, 1e6),
        )
    )
    top_p = draw(
        st.one_of(
            st.floats(0.0, 1.0, exclude_min=True),
            st.sampled_from([5e-324, 1e-45, 1e-38, 1e-8, 1.0]),
        )
    )
    bias = st.dictionaries(st.integers(0, vocab - 1), st.floats(-100.0, 100.0), max_size=4)
    return SamplingParams(
        temperature=temperature,
        top_p=top_p,
        top_k=draw(st.one_of(st.sampled_from([-1, 0, 1, vocab, vocab + 7, 10**30]))),
        min_p=draw(st.one_of(st.floats(0.0, 1.0), st.sampled_from([0.0, 1.0, 1e-45]))),
        presence_penalty=draw(st.floats(-2.0, 2.0)),
        frequency_penalty=draw(st.floats(-2.0, 2.0)),
        # any positive float the API takes, the extremes included
        repetition_penalty=draw(
            st.one_of(
                st.floats(0.0, 1e308, exclude_min=True),
                st.sampled_from([5e-324, 1e-40, 1.0, 1e39, 1.7e308]),
            )
        ),
        logit_bias=draw(bias),
        logprobs=draw(st.sampled_from([None, 0, 3, 20])),
        seed=draw(st.integers(-(2**70), 2**70)),
    )


@st.composite
def batches(draw):
    x = draw(logits())
    vocab = x.shape[1]
    rows = []
    for _ in range(x.shape[0]):
        p = draw(params(vocab))
        p.check(vocab)  # everything drawn is a value the engine accepts
        out = draw(st.lists(st.integers(0, vocab - 1), max_size=12))
        banned = draw(st.lists(st.integers(0, vocab - 1), max_size=vocab - 1, unique=True))
        prompt = draw(st.lists(st.integers(0, vocab - 1), max_size=vocab + 3))
        rows.append(SampleRow(p, out, p.generator(0), banned, prompt))
    return x, rows


def _check(x: torch.Tensor, rows: list[SampleRow]) -> None:
    tokens, lps = sample(x, rows)
    vocab = x.shape[1]
    adjusted = ban_tokens(adjust_logits(x, rows), rows)
    assert not torch.isnan(adjusted).any()
    for i, (tok, lp, row) in enumerate(zip(tokens, lps, rows)):
        assert isinstance(tok, int) and 0 <= tok < vocab and tok not in row.banned
        p = row.params
        if p.greedy:
            assert adjusted[i, tok] == adjusted[i].max()
        else:  # the token is one the filters kept, and at least one always is
            one = lambda v: torch.tensor([v], dtype=torch.float32, device=x.device)
            k = torch.tensor([min(p.top_k, vocab) if p.top_k > 0 else vocab], device=x.device)
            kept, order = filtered_logprobs(
                adjusted[i : i + 1], one(p.temperature), k, one(p.top_p), one(p.min_p)
            )
            assert not torch.isnan(kept).any() and torch.isfinite(kept[0, 0])
            assert torch.isfinite(kept[0][order[0] == tok]).all()
        if p.logprobs is None:
            assert lp is None
        else:
            assert lp.token_id == tok and not math.isnan(lp.logprob) and lp.logprob <= 0
            assert len(lp.top) == min(p.logprobs, vocab)
            assert all(not math.isnan(v) and v <= 0 for _, v in lp.top)


@PROPS
@given(batches())
def test_any_accepted_values_give_a_valid_token(batch):
    _check(*batch)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@settings(PROPS, max_examples=60)
@given(batches())
def test_any_accepted_values_give_a_valid_token_on_the_device(batch):
    x, rows = batch
    rows = [
        SampleRow(r.params, r.output_ids, r.params.generator(0, "cuda"), r.banned) for r in rows
    ]
    _check(x.cuda(), rows)


@PROPS
@given(batches())
def test_a_row_samples_the_same_alone_as_in_any_batch(batch):
    x, rows = batch
    states = [r.generator.get_state() for r in rows]
    together = sample(x, rows)[0]
    for i, r in enumerate(rows):
        r.generator.set_state(states[i])
        assert sample(x[i : i + 1], [r])[0] == [together[i]]


def test_top_p_that_underflows_float32_keeps_the_best_token():
    x = torch.tensor([[0.0, 5.0, 1.0, 5.0 - 1e-3]])
    for top_p in (5e-324, 1e-45, 1e-40):
        p = SamplingParams(temperature=1.0, top_p=top_p, seed=1)
        assert [sample(x, [SampleRow(p, [], p.generator(0))])[0][0] for _ in range(5)] == [1] * 5


@pytest.mark.parametrize(
    "change, param",
    [
        (dict(temperature=float("nan")), "temperature"),
        (dict(temperature=float("inf")), "temperature"),
        (dict(temperature=-1.0), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=float("nan")), "top_p"),
        (dict(min_p=1.5), "min_p"),
        (dict(presence_penalty=float("-inf")), "presence_penalty"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(repetition_penalty=float("inf")), "repetition_penalty"),
        (dict(top_k=-2), "top_k"),
        (dict(logit_bias={40: 1.0}), "logit_bias"),
        (dict(logit_bias={-1: 1.0}), "logit_bias"),
        (dict(logit_bias={3: float("nan")}), "logit_bias"),
        (dict(logprobs=-1), "logprobs"),
    ],
)
def test_values_no_sampler_can_honour_are_refused_by_name(change, param):
    with pytest.raises(BadParams) as e:
        SamplingParams(**change).check(40)
    assert e.value.param == param
    SamplingParams(max_tokens=0, top_k=10**30, logit_bias={39: -100.0}).check(40)  # fine
