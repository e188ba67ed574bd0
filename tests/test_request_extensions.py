"""vLLM's request extensions, applied: ignore_eos, min_tokens, continuous usage stats,
skip_special_tokens, spaces_between_special_tokens, prompt_logprobs."""

import json

import httpx
import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

from engine.detokenize import Detokenizer
from engine.sampling import SampleRow, SamplingParams, sample
from models.checkpoint import default_model_dir
from models.tokenizer import EngramTokenizer

from .live import serve

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

# The built-in model ends a file here: its greedy next token is end-of-text.
ENDS_FILE = 'if __name__ == "__main__":\n    main()\n'
EOS = "<|endoftext|>"


# --- engine pieces ------------------------------------------------------------------------------
def test_banned_token_is_never_sampled_and_logprobs_stay_raw():
    logits = torch.zeros(2, 8)
    logits[:, 3] = 50.0  # token 3 dominates every row
    p = SamplingParams(temperature=1.0, seed=1, logprobs=0, min_tokens=2)
    banned = p.banned_tokens(0, eos_token_id=3)
    assert banned == [3] and p.banned_tokens(2, 3) == []
    assert SamplingParams(ignore_eos=True, min_tokens=2).banned_tokens(0, 3) == []
    rows = [
        SampleRow(p, [], p.generator(0), banned),
        SampleRow(SamplingParams(temperature=0.0, logprobs=0), [], torch.Generator(), [3]),
    ]
    for _ in range(20):
        tokens, lps = sample(logits, rows)
        assert 3 not in tokens
    # the reported logprob is the model's, not the masked distribution's
    assert lps[1].logprob == pytest.approx(torch.log_softmax(logits[1], -1)[tokens[1]].item())
    assert logits[0, 3] == 50.0  # the caller's logits are untouched
    free, _ = sample(
        logits[:1], [SampleRow(SamplingParams(temperature=0.0), [], torch.Generator())]
    )
    assert free == [3]


def test_prompt_logprobs_k_covers_echo():
    assert SamplingParams().prompt_logprobs_k is None
    assert SamplingParams(logprobs=2).prompt_logprobs_k is None
    assert SamplingParams(logprobs=2, echo=True).prompt_logprobs_k == 2
    assert SamplingParams(logprobs=2, echo=True, prompt_logprobs=4).prompt_logprobs_k == 4
    assert SamplingParams(prompt_logprobs=0).prompt_logprobs_k == 0


def _char_tokenizer(fuse: bool) -> EngramTokenizer:
    """One token per character; without ``fuse`` its decoder joins tokens with spaces."""
    vocab = {c: i for i, c in enumerate("abcdefgh_ ")}
    t = Tokenizer(models.WordLevel(vocab, unk_token="_"))
    t.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    t.add_special_tokens(["[X]", "[Y]"])
    if fuse:
        t.decoder = decoders.Fuse()
    return EngramTokenizer(t)


def test_detokenizer_ignores_stop_strings_before_min_tokens():
    tok = _char_tokenizer(fuse=True)
    ids = tok.encode("abcabcab")  # one token per character
    d = Detokenizer(tok, stop=["ab"], min_tokens=4)
    text = "".join(d.add(t) for t in ids[:5])
    # "ab" at 0 ends inside the first 3 tokens (before min_tokens): ignored; the one ending at
    # token 5 ("ab" at 3..4) counts
    assert d.stopped and d.text == "abc" and text + d.flush() == "abc"
    d = Detokenizer(tok, stop=["ab"], min_tokens=2)
    for t in ids[:2]:
        d.add(t)
    assert d.stopped and d.text == ""  # ends at token 2, the min_tokens-th: counts, as vLLM


def test_decode_special_token_flags():
    tok = _char_tokenizer(fuse=False)
    x, y = tok.token_id("[X]"), tok.token_id("[Y]")
    ids = [tok.token_id("a"), x, y, tok.token_id("b")]
    native = tok.tokenizer.decode(ids, skip_special_tokens=False)
    assert native == "a [X] [Y] b"  # this decoder puts a space between tokens
    assert tok.decode(ids) == "a b"
    assert tok.decode(ids, skip_special_tokens=False) == native
    assert tok.decode(ids, False, spaces_between_special_tokens=False) == "a[X][Y]b"
    d = Detokenizer(tok, skip_special_tokens=False, spaces_between_special_tokens=False)
    assert "".join(d.add(t) for t in ids) + d.flush() == "a[X][Y]b"


# --- on a real server with the built-in model ---------------------------------------------------
@pytest.fixture(scope="module")
def srv():
    with serve(default_model_dir(), served_model_name=["engram-stdlib"], max_num_seqs=8) as s:
        yield s


def _post(srv, **body):
    r = httpx.post(srv.url + "/v1/completions", json={"model": "engram-stdlib", **body}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def _events(srv, **body) -> list[dict]:
    body = {"model": "engram-stdlib", "stream": True, **body}
    with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        lines = [ln[6:] for ln in r.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(x) for x in lines[:-1]]


def test_ignore_eos_always_returns_max_tokens(srv):
    early = _post(srv, prompt=ENDS_FILE, max_tokens=24, temperature=0)
    assert early["choices"][0]["finish_reason"] == "stop"
    assert early["usage"]["completion_tokens"] < 24
    fixed = _post(srv, prompt=ENDS_FILE, max_tokens=24, temperature=0, ignore_eos=True)
    assert fixed["choices"][0]["finish_reason"] == "length"
    assert fixed["usage"]["completion_tokens"] == 24
    sampled = _post(
        srv, prompt=[ENDS_FILE] * 2, n=3, max_tokens=24, temperature=1.0, seed=3, ignore_eos=True
    )
    assert sampled["usage"]["completion_tokens"] == 6 * 24
    assert all(c["finish_reason"] == "length" for c in sampled["choices"])


def test_skip_special_tokens_shows_or_hides_end_of_text(srv):
    args = dict(prompt=ENDS_FILE, max_tokens=3, temperature=0, ignore_eos=True)
    hidden = _post(srv, **args)["choices"][0]["text"]
    shown = _post(srv, **args, skip_special_tokens=False)["choices"][0]["text"]
    assert EOS not in hidden and shown.startswith(EOS)
    assert shown.replace(EOS, "") == hidden
    same = _post(srv, **args, skip_special_tokens=False, spaces_between_special_tokens=False)
    assert same["choices"][0]["text"] == shown  # byte-level BPE puts nothing between tokens


def test_continuous_usage_stats_on_every_chunk(srv):
    # guidellm's body: a fixed-length streamed request with usage on every chunk
    events = _events(
        srv,
        prompt=ENDS_FILE,
        max_tokens=12,
        temperature=0,
        ignore_eos=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True},
    )
    *chunks, last = events
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 12
    assert chunks and all("usage" in c for c in chunks)
    counts = [c["usage"]["completion_tokens"] for c in chunks]
    assert counts == sorted(counts) and counts[-1] == 12
    n_prompt = last["usage"]["prompt_tokens"]
    assert all(c["usage"]["prompt_tokens"] == n_prompt for c in chunks)
    assert all(
        c["usage"]["total_tokens"] == n_prompt + c["usage"]["completion_tokens"] for c in chunks
    )
    # as vLLM: continuous_usage_stats alone (without include_usage) adds nothing
    plain = _events(
        srv,
        prompt="x",
        max_tokens=3,
        temperature=0,
        stream_options={"continuous_usage_stats": True},
    )
    assert all("usage" not in c for c in plain)


def test_min_tokens_holds_back_eos_and_stop_strings(srv):
    free = _post(srv, prompt=ENDS_FILE, max_tokens=16, temperature=0)
    assert free["usage"]["completion_tokens"] == 1  # EOS at once
    held = _post(srv, prompt=ENDS_FILE, max_tokens=16, temperature=0, min_tokens=5, logprobs=0)
    c = held["choices"][0]
    assert held["usage"]["completion_tokens"] >= 5
    assert all(t != EOS for t in c["logprobs"]["tokens"][:5])
    # stop strings: only a match ending after the first min_tokens - 1 tokens' text counts
    base = _post(srv, prompt="import os\n", max_tokens=30, temperature=0, logprobs=0)
    text, toks = base["choices"][0]["text"], base["choices"][0]["logprobs"]["tokens"]
    stop, k = "from", 4
    assert text.startswith(stop)
    floor = len("".join(toks[: k - 1]))
    expect = text[: text.find(stop, floor - len(stop) + 1)]
    r = _post(srv, prompt="import os\n", max_tokens=30, temperature=0, stop=stop, min_tokens=k)
    assert r["choices"][0]["text"] == expect and r["choices"][0]["finish_reason"] == "stop"
    assert len(expect) > 0
    bad = httpx.post(
        srv.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2, "min_tokens": 3}
    )
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "min_tokens"


def test_prompt_logprobs_as_vllm_returns_them(srv):
    prompt = "def add(a, b):\n    return a + b\n"
    r = _post(srv, prompt=prompt, max_tokens=1, temperature=0, prompt_logprobs=2)
    plp = r["choices"][0]["prompt_logprobs"]
    ids = httpx.post(srv.url + "/tokenize", json={"prompt": prompt}).json()["tokens"]
    assert len(plp) == len(ids) and plp[0] is None
    echo = _post(srv, prompt=prompt, max_tokens=1, temperature=0, logprobs=0, echo=True)
    ref = echo["choices"][0]["logprobs"]["token_logprobs"][: len(ids)]
    for tid, entry, want in zip(ids[1:], plp[1:], ref[1:]):
        assert 1 <= len(entry) <= 3
        mine = entry[str(tid)]
        assert mine["logprob"] == pytest.approx(want, abs=1e-6)
        assert mine["rank"] >= 1 and isinstance(mine["decoded_token"], str)
        assert sorted(v["rank"] for v in entry.values())[:2] == [1, 2]
        assert max(entry.values(), key=lambda v: v["logprob"])["rank"] == 1
    assert "prompt_logprobs" not in _post(srv, prompt="x", max_tokens=1)["choices"][0]
    both = _post(srv, prompt=prompt, max_tokens=1, logprobs=1, echo=True, prompt_logprobs=3)
    c = both["choices"][0]
    assert all(len(top) <= 1 for top in c["logprobs"]["top_logprobs"][1:])  # echo keeps logprobs
    assert max(len(e) for e in c["prompt_logprobs"][1:]) >= 3  # prompt_logprobs keeps 3
    streamed = httpx.post(
        srv.url + "/v1/completions", json={"prompt": "x", "stream": True, "prompt_logprobs": 1}
    )
    assert streamed.status_code == 400
    assert streamed.json()["error"]["param"] == "prompt_logprobs"
