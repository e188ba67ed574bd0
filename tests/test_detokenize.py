"""The byte-level detokenizer against the window one and the tokenizer's own decode."""

import numpy as np
import pytest

from engine.detokenize import Detokenizer
from models.checkpoint import default_model_dir
from models.tokenizer import EngramTokenizer


@pytest.fixture(scope="module")
def tok():
    return EngramTokenizer.from_file(default_model_dir())


def _run(d: Detokenizer, ids: list[int]) -> tuple[list[str], str]:
    deltas = []
    for t in ids:
        deltas.append(d.add(t))
        if d.stopped:
            break
    return deltas, d.flush()


def test_builtin_tokenizer_is_byte_level(tok):
    table = tok.token_bytes()
    assert table is not None and len(table) == tok.vocab_size
    assert b"".join(table[t] for t in tok.encode("déjà vu ✓")).decode() == "déjà vu ✓"


@pytest.mark.parametrize("skip", [True, False])
@pytest.mark.parametrize("spaces", [True, False])
def test_byte_path_equals_window_path_and_full_decode(tok, skip, spaces):
    rng = np.random.default_rng(0)
    text = "def f(x):\n    return 'é✓' + x  # ünïcode 日本語 <|endoftext|> done"
    base = tok.encode(text)
    for trial in range(40):
        # real text, random ids (partial UTF-8 pieces included) and the special token, mixed
        ids = [int(t) for t in rng.integers(0, tok.vocab_size, 30)] + base[: trial + 1] + [0]
        rng.shuffle(ids)
        a = Detokenizer(tok, [], skip, spaces)
        b = Detokenizer(tok, [], skip, spaces, byte_level=False)
        da, fa = _run(a, ids)
        db, fb = _run(b, ids)
        assert "".join(da) + fa == "".join(db) + fb == tok.decode(ids, skip, spaces)
        assert da == db  # the same deltas, token by token
        c = Detokenizer(tok, [], skip, spaces)
        c._plain = False  # the byte path's general steps (stop strings' hold, min_tokens)
        assert _run(c, ids) == (da, fa) and c.text == a.text == b.text


def test_byte_path_stop_strings_and_min_tokens_equal_window_path(tok):
    rng = np.random.default_rng(1)
    ids = tok.encode("for i in range(10):\n    print(i, 'é')\nreturn None\n" * 3)
    for stop in (["print"], ["\n", "None"], ["é'"], ["range(1", "xyz"]):
        for min_tokens in (0, 5, 17):
            cut = int(rng.integers(5, len(ids)))
            a = Detokenizer(tok, stop, min_tokens=min_tokens)
            b = Detokenizer(tok, stop, min_tokens=min_tokens, byte_level=False)
            ra, rb = _run(a, ids[:cut]), _run(b, ids[:cut])
            assert ra == rb and a.stopped == b.stopped and a.text == b.text
