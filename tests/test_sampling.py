import math

import pytest
import torch

from models.tokenizer import EngramTokenizer
from server.detokenize import Detokenizer
from server.sampling import (
    SamplingParams,
    apply_penalties,
    filter_top_k_top_p,
    sample_token,
    token_logprobs,
)


def test_penalties_follow_openai_rule():
    logits = torch.zeros(5)
    out = apply_penalties(logits, [1, 1, 3], presence=0.5, frequency=0.25)
    assert out.tolist() == [0.0, -1.0, 0.0, -0.75, 0.0]
    assert logits.tolist() == [0.0] * 5  # input untouched


def test_top_k_and_top_p_keep_the_right_tokens():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert torch.isinf(filter_top_k_top_p(logits, 2, 1.0)).tolist() == [False, False, True, True]
    # top_p 0.75: 0.5 alone is short of it, 0.5 + 0.3 reaches it: two tokens stay
    assert torch.isinf(filter_top_k_top_p(logits, 0, 0.75)).tolist() == [False, False, True, True]
    assert torch.isinf(filter_top_k_top_p(logits, 0, 0.1)).tolist() == [False, True, True, True]


def test_seeded_sampling_is_reproducible_and_respects_filters():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(0))
    p = SamplingParams(temperature=1.0, top_k=3, seed=11)
    a = [sample_token(logits, p, [], p.generator(0)) for _ in range(1)]
    g1, g2 = p.generator(0), p.generator(0)
    seq1 = [sample_token(logits, p, [], g1) for _ in range(30)]
    seq2 = [sample_token(logits, p, [], g2) for _ in range(30)]
    assert seq1 == seq2 and a[0] == seq1[0]
    assert set(seq1) <= set(torch.topk(logits, 3).indices.tolist())
    other = p.generator(1)
    assert [sample_token(logits, p, [], other) for _ in range(30)] != seq1
    greedy = SamplingParams(temperature=0)
    assert sample_token(logits, greedy, [], greedy.generator(0)) == int(logits.argmax())


def test_token_logprobs_are_normalised():
    logits = torch.tensor([2.0, 1.0, 0.0])
    lp = token_logprobs(logits, 1, 3)
    assert math.isclose(sum(math.exp(v) for _, v in lp.top), 1.0, abs_tol=1e-6)
    assert [t for t, _ in lp.top] == [0, 1, 2]
    assert lp.logprob == pytest.approx(lp.top[1][1])
    assert token_logprobs(logits, 2, 0).top == []


def _tok(tiny_ckpt):
    return EngramTokenizer.from_file(tiny_ckpt)


def test_detokenizer_stop_across_token_boundaries(tiny_ckpt):
    tok = _tok(tiny_ckpt)
    ids = tok.encode("def hello_world(): return 42")
    d = Detokenizer(tok, stop=["_wor"])
    out = "".join(d.add(t) for t in ids if not d.stopped)
    out += d.flush()
    assert d.stopped and out == "def hello"


def test_detokenizer_holds_back_partial_utf8(tiny_ckpt):
    tok = _tok(tiny_ckpt)
    text = "x = 'é✓'"
    ids = tok.encode(text)
    d = Detokenizer(tok)
    pieces = [d.add(t) for t in ids] + [d.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
