"""engram-attach: Engram layers on a Hugging Face backbone whose logits equal the base's until
trained, base weights hard-linked, the result served and benchmarked like any checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import torch
from safetensors import safe_open

from engine.generate import generate
from models.attach import main as attach_main
from models.checkpoint import ENGRAM_FILE, load_checkpoint, table_key
from offload.offloaded_model import OffloadedModel
from tests.hf_models import VOCAB, make_checkpoint


def test_attached_logits_equal_the_base_and_weights_are_hard_linked(tmp_path):
    ref, base = make_checkpoint("qwen3", tmp_path / "base")
    out = tmp_path / "attached"
    assert attach_main([str(base), str(out), "--layers", "0,2", "--table-params", "2e6"]) == 0
    for name in ("model.safetensors", "tokenizer.json", "generation_config.json"):
        assert (out / name).stat().st_ino == (base / name).stat().st_ino  # linked, not copied
    config = json.loads((out / "config.json").read_text())
    assert config["engram_layer_ids"] == [0, 2] and config["model_type"] == "qwen3"
    with safe_open(str(out / ENGRAM_FILE), framework="pt") as f:
        table = f.get_tensor(table_key(0))
        assert f.get_tensor("model.layers.0.engram.value_proj.weight").abs().max() == 0
        assert f.get_tensor("model.layers.2.engram.key_projs.0.weight").abs().max() > 0
    rows, dim = table.shape
    assert table.dtype == torch.bfloat16 and dim == 32
    assert 1.0 <= 2 * rows * dim / 2e6 < 1.05  # two layers share it; primes round it up
    assert abs(table.float().std().item() - 1.0) < 0.05  # N(0, 1), the reference's init

    base_model, _ = load_checkpoint(base)
    attached, _ = load_checkpoint(out)
    assert attached.config.engram_layer_ids == [0, 2]
    ids = torch.randint(0, VOCAB, (2, 23))
    with torch.no_grad():
        got = attached.forward_full(ids)
        torch.testing.assert_close(got, base_model.forward_full(ids), rtol=0, atol=0)
        torch.testing.assert_close(got, ref(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    # the offloaded path (tables in the cpu tier, the engine's packed steps) too
    om = OffloadedModel.load(out, placement="cpu", gather="worker", progress=False)
    try:
        prompt = [int(t) for t in np.random.default_rng(1).integers(3, VOCAB, 9)]
        tokens = generate(om.model, [prompt], 8, 0.0, 0, None, rows=om.prefetcher)[0]
    finally:
        om.close()
    want = ref.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)
    assert tokens == want[0, 9:].tolist()


def test_attach_refuses_what_it_cannot_do(tmp_path, tiny_ckpt, capsys):
    assert (
        attach_main([str(tiny_ckpt), str(tmp_path / "x"), "--layers", "1", "--table-params", "1e5"])
        == 2
    )
    assert "not a Hugging Face checkpoint" in capsys.readouterr().err
    _, base = make_checkpoint("llama3", tmp_path / "base")
    assert (
        attach_main([str(base), str(tmp_path / "y"), "--layers", "7", "--table-params", "1e5"]) == 2
    )
    assert "layer id 7 is outside the backbone" in capsys.readouterr().err


def test_engram_bench_measures_an_attached_backbone(tmp_path):
    _, base = make_checkpoint("llama3", tmp_path / "base")
    out = tmp_path / "attached"
    assert attach_main([str(base), str(out), "--layers", "1", "--table-params", "1e5"]) == 0
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.cli",
            "--model",
            str(out),
            "--quick",
            "--no-plots",
            "--no-micro",
            "--out",
            str(tmp_path / "bench"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
