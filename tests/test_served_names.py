"""Served model names as vLLM's: by default the --model string as given, so tools that load a
tokenizer by the model's name (guidellm, aiperf) find tokenizer.json and tokenizer_config.json
there offline; several --served-model-name; the built-in model's tokenizer_config.json."""

from __future__ import annotations

import json

import httpx

from models.checkpoint import default_model_dir
from models.config import ModelConfig
from models.tokenizer import EngramTokenizer
from server.cli import parse_args, to_config
from server.tokenization import tokenizer_info
from tests.hf_models import make_checkpoint, transformers

from .live import serve


def test_default_name_is_the_model_string_and_its_tokenizer_loads_from_it(tmp_path):
    _, directory = make_checkpoint("llama3", tmp_path / "llama")
    given = str(directory)
    with serve(given, max_num_seqs=2) as s:
        models = httpx.get(s.url + "/v1/models").json()["data"]
        assert [m["id"] for m in models] == [given]
        r = httpx.post(s.url + "/v1/completions", json={"model": given, "prompt": "a b"})
        assert r.status_code == 200 and r.json()["model"] == given
        served = httpx.post(s.url + "/tokenize", json={"prompt": "def f(x):"}).json()["tokens"]
    # what a load tool does with the name it was given: load the tokenizer from it, offline
    hf = transformers.AutoTokenizer.from_pretrained(models[0]["id"])
    assert hf("def f(x):")["input_ids"] == served


def test_several_served_names(tiny_ckpt):
    with serve(tiny_ckpt, served_model_name=["main", "alias"], max_num_seqs=2) as s:
        ids = [m["id"] for m in httpx.get(s.url + "/v1/models").json()["data"]]
        assert ids == ["main", "alias"]
        for name in ids:
            r = httpx.post(s.url + "/v1/completions", json={"model": name, "prompt": "x"})
            assert r.status_code == 200 and r.json()["model"] == "main"  # the first name
            assert httpx.get(f"{s.url}/v1/models/{name}").json()["id"] == name
        other = httpx.post(s.url + "/v1/completions", json={"model": "other", "prompt": "x"})
        assert other.status_code == 404


def test_served_model_name_flag_and_variable_take_several(monkeypatch):
    assert to_config(parse_args(["--served-model-name", "a", "b"])).model_names == ["a", "b"]
    monkeypatch.setenv("ENGRAM_SERVED_MODEL_NAME", "x y")
    assert to_config(parse_args([])).model_names == ["x", "y"]
    monkeypatch.delenv("ENGRAM_SERVED_MODEL_NAME")
    assert to_config(parse_args([])).model_names == ["engram-stdlib"]
    assert to_config(parse_args(["--model", "some/dir"])).model_names == ["some/dir"]


def test_builtin_model_ships_its_tokenizer_config():
    d = default_model_dir()
    shipped = json.loads((d / "tokenizer_config.json").read_text())
    tok = EngramTokenizer.from_file(d)
    c = ModelConfig.load(d)
    info = tokenizer_info(tok, c.eos_token_id, c.bos_token_id, c.max_position_embeddings)
    info.pop("tokenizer_json")
    assert shipped == info  # the file is what /tokenizer_info answers
    hf = transformers.AutoTokenizer.from_pretrained(str(d))
    text = "import os\nprint(os.getcwd())"
    assert hf(text)["input_ids"] == tok.encode(text) and hf.eos_token == "<|endoftext|>"
