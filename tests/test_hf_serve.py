"""A Hugging Face directory served by the real server: greedy tokens equal transformers'
greedy generate while other requests share the batch; generation_config.json's EOS ids and
sampling defaults; --max-model-len; engram-generate and engram-bench read the same directory."""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch

from models.tokenizer import EngramTokenizer
from server.completions import sampling_fields
from server.protocol import CompletionRequest
from tests.hf_models import VOCAB, make_checkpoint

from .live import serve

N_TOKENS = 32


def _complete(url: str, body: dict) -> dict:
    r = httpx.post(url + "/v1/completions", json={"max_tokens": N_TOKENS, **body}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def _ids(url: str, text: str) -> list[int]:
    return httpx.post(url + "/tokenize", json={"prompt": text}, timeout=30).json()["tokens"]


@pytest.mark.parametrize("family", ["llama3", "qwen3"])
def test_greedy_tokens_through_the_server_equal_transformers(family, tmp_path):
    ref, directory = make_checkpoint(family, tmp_path)
    rng = np.random.default_rng(0)
    prompts = [[int(t) for t in rng.integers(3, VOCAB, n)] for n in (4, 19, 40)]
    with serve(directory, max_num_seqs=8, max_num_batched_tokens=64) as srv:
        others = [  # sampled requests in the same batch, longer and shorter
            {"prompt": [int(t) for t in rng.integers(3, VOCAB, n)], "temperature": 1.0, "seed": n}
            for n in (7, 60, 2)
        ]
        bodies = [{"prompt": p, "temperature": 0} for p in prompts] + others
        with ThreadPoolExecutor(len(bodies)) as pool:
            results = list(pool.map(lambda b: _complete(srv.url, b), bodies))
        text = "def add(a, b):\n    return a + b"
        text_result = _complete(srv.url, {"prompt": text, "temperature": 0})
        text_ids = _ids(srv.url, text)
    tok = EngramTokenizer.from_file(directory)
    for p, res in zip([*prompts, text_ids], [*results[: len(prompts)], text_result]):
        want = ref.generate(
            torch.tensor([p]),
            attention_mask=torch.ones(1, len(p), dtype=torch.long),
            max_new_tokens=N_TOKENS,
            do_sample=False,
        )[0, len(p) :].tolist()
        got = res["usage"]["completion_tokens"]
        assert got == len(want) == N_TOKENS
        assert res["choices"][0]["text"] == tok.decode(want)


def test_generation_config_eos_ids_and_sampling_defaults(tmp_path):
    ref, directory = make_checkpoint("qwen2", tmp_path)
    prompt = [5, 6, 7, 8]
    greedy = ref.generate(
        torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=None
    )[0, 4:].tolist()
    stop_at = next(t for i, t in enumerate(greedy) if i >= 2 and t not in greedy[:i])
    cut = greedy.index(stop_at)
    # a second EOS id and a greedy default, as a checkpoint's generation_config.json says
    gen = {"eos_token_id": [2, stop_at], "temperature": 0.0, "top_k": 20}
    (directory / "generation_config.json").write_text(json.dumps(gen))
    with serve(directory, max_num_seqs=2, max_model_len=64) as srv:
        r = _complete(srv.url, {"prompt": prompt, "max_tokens": 8})  # no temperature: 0.0
        assert r["choices"][0]["finish_reason"] == "stop"
        assert r["usage"]["completion_tokens"] == cut + 1  # the EOS token counts, as vLLM's
        ignored = _complete(srv.url, {"prompt": prompt, "max_tokens": 8, "ignore_eos": True})
        assert ignored["usage"]["completion_tokens"] == 8
        models = httpx.get(srv.url + "/v1/models").json()["data"][0]
        assert models["max_model_len"] == 64
        long = httpx.post(srv.url + "/v1/completions", json={"prompt": [1] * 60, "max_tokens": 10})
        assert long.status_code == 400 and "64" in long.json()["error"]["message"]


def test_sampling_fields_take_the_request_first():
    defaults = {"temperature": 0.6, "top_k": 20, "top_p": 0.95}
    req = CompletionRequest.model_validate({"prompt": "x", "top_p": 0.5})
    assert sampling_fields(req, defaults) == {
        "temperature": 0.6,
        "top_p": 0.5,
        "top_k": 20,
        "min_p": 0.0,
        "repetition_penalty": 1.0,
    }
    assert sampling_fields(req, {})["temperature"] == 1.0


def test_generate_and_bench_load_an_hf_directory(tmp_path):
    _, directory = make_checkpoint("mistral", tmp_path / "m")
    exe = [sys.executable, "-m"]
    r = subprocess.run(
        [*exe, "engine.generate", "--model", str(directory), "--prompt", "hi", "--max-tokens", "4"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0 and "[4 tokens" in r.stderr, r.stderr
    out = tmp_path / "bench"
    r = subprocess.run(
        [*exe, "bench.cli", "--model", str(directory), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    # the bench measures Engram offload: a plain backbone is read, then refused with the reason
    assert r.returncode == 2 and "has no Engram layers" in r.stderr, r.stderr[-2000:]
