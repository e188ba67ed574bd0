"""vLLM's tokenizer endpoints on a real server: /tokenize, /detokenize, /tokenizer_info."""

import json
import re
from pathlib import Path

import httpx
import pytest
from tokenizers import Tokenizer

from models.tokenizer import EngramTokenizer

from .live import serve

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def srv(tiny_ckpt):
    with serve(
        tiny_ckpt, served_model_name=["tiny-ckpt0"], max_num_seqs=4, max_num_batched_tokens=64
    ) as s:
        yield s


@pytest.fixture(scope="module")
def tok(tiny_ckpt):
    return EngramTokenizer.from_file(tiny_ckpt)


def _error(r, status, param, code=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param and (code is None or err["code"] == code)
    return err


def test_tokenize_detokenize_round_trip(srv, tok):
    text = "def f(x):\n    return x  # é ✓"
    r = httpx.post(srv.url + "/tokenize", json={"prompt": text})
    assert r.status_code == 200, r.text
    body = r.json()
    assert list(body) == ["count", "max_model_len", "tokens", "token_strs"]  # vLLM's order
    assert body["tokens"] == tok.encode(text) and body["count"] == len(body["tokens"])
    assert body["max_model_len"] == 512 and body["token_strs"] is None
    back = httpx.post(srv.url + "/detokenize", json={"tokens": body["tokens"]}).json()
    assert back == {"prompt": text}


def test_tokenize_token_strs_special_tokens_and_model(srv, tok):
    eos = "<|endoftext|>"
    body = httpx.post(
        srv.url + "/tokenize",
        json={"prompt": "x" + eos, "return_token_strs": True, "model": "tiny-ckpt0"},
    ).json()
    assert body["token_strs"] == [tok.id_to_token(t) for t in body["tokens"]]
    assert body["tokens"][-1] == tok.token_id(eos) and body["token_strs"][-1] == eos
    # detokenize keeps special tokens (as vLLM's does)
    assert httpx.post(srv.url + "/detokenize", json={"tokens": body["tokens"]}).json() == {
        "prompt": "x" + eos
    }
    empty = httpx.post(srv.url + "/tokenize", json={"prompt": "", "add_special_tokens": False})
    assert empty.json()["tokens"] == [] and empty.json()["count"] == 0


def test_tokenize_and_detokenize_errors(srv):
    url = srv.url
    chat = httpx.post(url + "/tokenize", json={"messages": [{"role": "user", "content": "hi"}]})
    assert "chat template" in _error(chat, 400, "messages", "chat_template_missing")["message"]
    _error(httpx.post(url + "/tokenize", json={}), 400, "prompt")
    _error(httpx.post(url + "/tokenize", json={"prompt": 5}), 400, "prompt")
    _error(httpx.post(url + "/tokenize", json={"prompt": "x", "model": "nope"}), 404, "model")
    _error(httpx.post(url + "/detokenize", json={"tokens": [1, 10**6]}), 400, "tokens")
    _error(httpx.post(url + "/detokenize", json={"tokens": [-1]}), 400, "tokens")
    _error(httpx.post(url + "/detokenize", json={"tokens": "abc"}), 400, "tokens")
    _error(httpx.post(url + "/detokenize", json={}), 400, "tokens")


def test_tokenizer_info_rebuilds_the_tokenizer_offline(srv, tok):
    info = httpx.get(srv.url + "/tokenizer_info").json()
    assert info["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert info["eos_token"] == "<|endoftext|>" and info["bos_token"] is None
    assert info["model_max_length"] == 512
    eos_id = str(tok.token_id("<|endoftext|>"))
    assert info["added_tokens_decoder"][eos_id]["special"] is True
    rebuilt = Tokenizer.from_str(info["tokenizer_json"])
    text = "class A:\n    pass\n" * 3
    assert rebuilt.encode(text, add_special_tokens=False).ids == tok.encode(text)
    assert rebuilt.get_vocab_size() == tok.vocab_size


def test_models_list_carries_max_model_len(srv):
    card = httpx.get(srv.url + "/v1/models").json()["data"][0]
    assert card["max_model_len"] == 512


def test_tokenizer_endpoints_are_behind_the_api_key(tiny_ckpt):
    with serve(tiny_ckpt, api_key="sekret", max_num_seqs=2) as s:
        for method, path, body in [
            ("POST", "/tokenize", {"prompt": "x"}),
            ("POST", "/detokenize", {"tokens": [1]}),
            ("GET", "/tokenizer_info", None),
        ]:
            r = httpx.request(method, s.url + path, json=body)
            _error(r, 401, None, "invalid_api_key")
            ok = httpx.request(
                method, s.url + path, json=body, headers={"Authorization": "Bearer sekret"}
            )
            assert ok.status_code == 200, ok.text
        assert httpx.get(s.url + "/health").status_code == 200


def test_readme_snippet_writes_a_tokenizer_folder(srv, tok, tmp_path, monkeypatch):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    (snippet,) = [
        b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "/tokenizer_info" in b
    ]
    monkeypatch.chdir(tmp_path)
    exec(snippet.replace("http://127.0.0.1:8000", srv.url), {})
    folder = tmp_path / "engram-tokenizer"
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast" and "tokenizer_json" not in config
    rebuilt = Tokenizer.from_file(str(folder / "tokenizer.json"))
    assert rebuilt.encode("import os\n", add_special_tokens=False).ids == tok.encode("import os\n")
