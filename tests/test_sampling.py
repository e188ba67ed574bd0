import math

import pytest
import torch

from engine.detokenize import Detokenizer
from engine.sampling import (
    SampleRow,
    SamplingParams,
    adjust_logits,
    filtered_logprobs,
    prompt_logprobs,
    sample,
)
from models.tokenizer import EngramTokenizer


def _row(params: SamplingParams, output_ids=(), choice: int = 0) -> SampleRow:
    return SampleRow(params, list(output_ids), params.generator(choice))


def _filtered(logits: torch.Tensor, top_k: int, top_p: float, min_p: float = 0.0):
    """Which tokens the filters drop, in vocab order."""
    one = lambda v: torch.tensor([v], dtype=torch.float32)
    k = torch.tensor([top_k if top_k > 0 else logits.numel()])
    lp, order = filtered_logprobs(logits[None].float(), one(1.0), k, one(top_p), one(min_p))
    dropped = torch.empty_like(lp[0], dtype=torch.bool)
    dropped[order[0]] = torch.isinf(lp[0])
    return dropped.tolist()


def _draw(logits: torch.Tensor, row: SampleRow) -> int:
    return sample(logits[None], [row])[0][0]


def test_penalties_follow_openai_rule():
    logits = torch.zeros(1, 5)
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    out = adjust_logits(logits, [_row(params, [1, 1, 3])])
    assert out[0].tolist() == [0.0, -1.0, 0.0, -0.75, 0.0]
    assert logits.tolist() == [[0.0] * 5]  # input untouched


def test_top_k_and_top_p_keep_the_right_tokens():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    assert _filtered(logits, 2, 1.0) == [False, False, True, True]
    # top_p 0.75: 0.5 alone is short of it, 0.5 + 0.3 reaches it: two tokens stay
    assert _filtered(logits, 0, 0.75) == [False, False, True, True]
    assert _filtered(logits, 0, 0.1) == [False, True, True, True]
    # min_p 0.5: tokens under half the best one's probability go
    assert _filtered(logits, 0, 1.0, 0.5) == [False, False, True, True]


def test_seeded_sampling_is_reproducible_and_respects_filters():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(0))
    p = SamplingParams(temperature=1.0, top_k=3, seed=11)
    a = [_draw(logits, _row(p)) for _ in range(1)]
    r1, r2 = _row(p), _row(p)
    seq1 = [_draw(logits, r1) for _ in range(30)]
    seq2 = [_draw(logits, r2) for _ in range(30)]
    assert seq1 == seq2 and a[0] == seq1[0]
    assert set(seq1) <= set(torch.topk(logits, 3).indices.tolist())
    other = _row(p, choice=1)
    assert [_draw(logits, other) for _ in range(30)] != seq1
    greedy = SamplingParams(temperature=0)
    assert _draw(logits, _row(greedy)) == int(logits.argmax())


def test_a_seeded_row_does_not_depend_on_its_batch():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(1))
    p = SamplingParams(temperature=0.8, top_p=0.9, seed=5)
    alone = [_draw(logits[2], r) for r in [_row(p)] * 10]
    mates = [SamplingParams(temperature=t, seed=s) for t, s in ((0.0, 1), (1.5, 2), (0.3, 3))]
    rows = [_row(mates[0]), _row(mates[1]), _row(p), _row(mates[2])]
    batched = [sample(logits, rows)[0][2] for _ in range(10)]
    assert batched == alone


def test_token_logprobs_are_normalised():
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    lp = prompt_logprobs(logits, [1], 3)[0]
    assert math.isclose(sum(math.exp(v) for _, v in lp.top), 1.0, abs_tol=1e-6)
    assert [t for t, _ in lp.top] == [0, 1, 2]
    assert lp.logprob == pytest.approx(lp.top[1][1])
    assert prompt_logprobs(logits, [2], 0)[0].top == []
    # the sampled token's logprobs come back with it, in the same copy
    toks, lps = sample(logits, [_row(SamplingParams(temperature=0, logprobs=2))])
    assert toks == [0] and lps[0].token_id == 0 and len(lps[0].top) == 2
    assert lps[0].logprob == pytest.approx(lp.top[0][1])


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


def test_top_p_mass_on_integers_matches_the_float_sum():
    """The integer prefix sum (what deterministic CUDA runs) equals the float one."""
    from engine.sampling import mass_before

    probs = torch.softmax(torch.randn(8, 500, generator=torch.Generator().manual_seed(2)), -1)
    probs = probs.sort(dim=-1, descending=True).values
    exact = mass_before(probs, integer=True)
    torch.testing.assert_close(exact, mass_before(probs, integer=False), atol=1e-6, rtol=0)
    assert torch.equal(exact[:, 0], torch.zeros(8))


def test_incremental_detokenizing_equals_decoding_everything():
    """The windowed decode hands out exactly the text of all ids, for random ids of the
    built-in byte-level tokenizer (split and invalid UTF-8 included), in any flag setting."""
    import numpy as np

    from models.checkpoint import default_model_dir

    tok = EngramTokenizer.from_file(default_model_dir() / "tokenizer.json")
    rng = np.random.default_rng(0)
    words = ["x = 'é✓'", " 😀🎉", " 日本語のテキスト", " naïve café", "\n\tdef f():", " Ωμέγα"]
    for trial in range(40):
        if trial % 2:  # text whose characters span several byte tokens
            text = "".join(rng.choice(words, size=int(rng.integers(1, 12))))
            ids = tok.encode(text)
        else:  # any ids at all, invalid UTF-8 included
            ids = rng.integers(0, tok.vocab_size, size=int(rng.integers(1, 120))).tolist()
        skip = bool(trial % 4 < 2)
        d = Detokenizer(tok, skip_special_tokens=skip)
        text = "".join(d.add(t) for t in ids) + d.flush()
        assert text == tok.decode(ids, skip), trial


def _vllm_penalties(logits, prompts, outputs, rep, presence, frequency, bias):
    """vLLM's rule, written row by row with a dense mask: bias, then each token seen in the
    prompt or the output divided by the penalty where its logit is positive (multiplied where
    not), then presence and frequency on output counts."""
    x = logits.clone().float()
    for i in range(x.shape[0]):
        for tok, b in bias[i].items():
            x[i, tok] += b
        seen = torch.zeros(x.shape[1], dtype=torch.bool)
        seen[list(prompts[i]) + list(outputs[i])] = True
        p = torch.full_like(x[i], rep[i])
        x[i] = torch.where(seen, torch.where(x[i] > 0, x[i] / p, x[i] * p), x[i])
        counts = torch.bincount(torch.tensor(outputs[i], dtype=torch.long), minlength=x.shape[1])
        x[i] -= frequency[i] * counts + presence[i] * (counts > 0)
    return x


def test_repetition_penalty_matches_vllms_rule_across_a_batch():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 40, generator=g) * 3
    prompts = [[1, 2, 3, 3], [5], [], [7, 8]]
    outputs = [[3, 9], [], [4, 4, 11], [8]]
    rep = [1.3, 0.7, 2.0, 1.0]  # below 1 favours seen tokens; 1.0 is off
    presence, frequency = [0.5, 0.0, -0.2, 0.3], [0.25, 0.1, 0.4, 0.0]
    bias = [{2: 5.0}, {5: -3.0}, {}, {8: 1.0}]  # bias first: it can flip a logit's sign
    rows = [
        SampleRow(
            SamplingParams(
                repetition_penalty=rep[i],
                presence_penalty=presence[i],
                frequency_penalty=frequency[i],
                logit_bias=bias[i],
            ),
            outputs[i],
            torch.Generator(),
            prompt_ids=prompts[i],
        )
        for i in range(4)
    ]
    want = _vllm_penalties(logits, prompts, outputs, rep, presence, frequency, bias)
    got = adjust_logits(logits, rows)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert not torch.equal(got[0], logits[0])  # the penalty moved the seen tokens
    torch.testing.assert_close(got[3], want[3])  # penalty 1.0: presence/bias only


def test_repetition_penalty_changes_what_greedy_picks():
    logits = torch.tensor([0.0, 2.0, 1.9, -1.0])
    base = SamplingParams(temperature=0.0)
    assert _draw(logits, _row(base)) == 1
    p = SamplingParams(temperature=0.0, repetition_penalty=1.2)
    row = SampleRow(p, [], torch.Generator(), prompt_ids=[1])
    assert _draw(logits, row) == 2  # 2.0 / 1.2 < 1.9
