"""Hugging Face checkpoints on the one backbone: logits equal transformers' per family."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from models.checkpoint import CheckpointError, load_checkpoint
from models.config import ConfigError, ModelConfig
from models.dtype import stored_dtype
from models.hf_config import UnsupportedModel
from tests.hf_models import FAMILIES, VOCAB, build, make_checkpoint, save

LENGTHS = (1, 7, 33, 130)  # 130 > original_max_position_embeddings of the llama3 case
TOL = dict(rtol=1e-4, atol=1e-4)  # float32: the same math in a different order


def reference_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logits_equal_transformers(family, tmp_path):
    ref, directory = make_checkpoint(family, tmp_path)
    ours, tok = load_checkpoint(directory, dtype="float32")
    assert tok is not None and ours.config.model_type in family
    gen = torch.Generator().manual_seed(1)
    for n in LENGTHS:
        ids = torch.randint(0, VOCAB, (2, n), generator=gen)
        want = reference_logits(ref, ids)
        with torch.no_grad():
            got = ours.forward_full(ids)
        torch.testing.assert_close(got, want, **TOL)


def test_family_options_reach_the_backbone(tmp_path):
    cases = {
        "llama3": dict(attention_head_dim=32, tie_word_embeddings=False),
        "qwen2": dict(attention_bias=True, qk_norm=False),
        "qwen3": dict(qk_norm=True, attention_bias=False, tie_word_embeddings=True),
        "mistral": dict(rope_scaling=None, attention_head_dim=16),
    }
    for family, want in cases.items():
        _, directory = make_checkpoint(family, tmp_path / family)
        config = ModelConfig.load(directory)
        assert {k: getattr(config, k) for k in want} == want, family
        assert config.engram_layer_ids == []
    assert ModelConfig.load(tmp_path / "llama3").rope_scaling["rope_type"] == "llama3"


def test_sharded_checkpoint(tmp_path):
    ref, directory = make_checkpoint("qwen3", tmp_path, shard="200KB")
    assert (directory / "model.safetensors.index.json").is_file()
    assert len(list(directory.glob("model-*.safetensors"))) > 2
    ours, _ = load_checkpoint(directory)
    ids = torch.randint(0, VOCAB, (1, 20))
    torch.testing.assert_close(ours.forward_full(ids), reference_logits(ref, ids), **TOL)
    (directory / sorted(directory.glob("model-*.safetensors"))[0].name).unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(directory)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_checkpoints(dtype, tmp_path):
    ref = build("llama3")
    save(ref, tmp_path, dtype=dtype)  # rounds ref's weights in place
    ref = ref.float()
    assert stored_dtype(tmp_path) == dtype
    ours, _ = load_checkpoint(tmp_path, dtype="float32")  # each tensor converted alone
    ids = torch.randint(0, VOCAB, (1, 16))
    torch.testing.assert_close(ours.forward_full(ids), reference_logits(ref, ids), **TOL)
    half, _ = load_checkpoint(tmp_path, dtype=dtype)  # as stored
    assert half.model.embed_tokens.weight.dtype == dtype


def _with_config(directory, **changes):
    path = directory / "config.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


REFUSED = [
    (dict(model_type="mixtral", architectures=["MixtralForCausalLM"]), "model_type='mixtral'"),
    (dict(num_experts=8), "num_experts=8"),
    (dict(sliding_window=4096), "sliding_window=4096"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0}), "rope_type='yarn'"),
    (dict(rope_scaling={"type": "dynamic", "factor": 2.0}), "rope_type='dynamic'"),
    (dict(hidden_act="gelu"), "hidden_act='gelu'"),
    (dict(architectures=["MistralForSequenceClassification"]), "architectures="),
]


@pytest.mark.parametrize("changes,names", REFUSED)
def test_refused_configs_name_the_field(changes, names, tmp_path):
    _, directory = make_checkpoint("mistral", tmp_path)
    if "rope_scaling" in changes:
        changes["rope_parameters"] = None
    _with_config(directory, **changes)
    with pytest.raises(UnsupportedModel) as e:
        load_checkpoint(directory)
    msg = str(e.value)
    assert names in msg and "supported:" in msg and "\n" not in msg


def test_pickled_weights_are_refused(tmp_path):
    _, directory = make_checkpoint("qwen2", tmp_path)
    (directory / "model.safetensors").unlink()
    (directory / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(UnsupportedModel, match="pytorch_model.bin are pickled"):
        load_checkpoint(directory)


def test_cli_exits_2_with_one_line(tmp_path):
    _, directory = make_checkpoint("qwen3", tmp_path)
    _with_config(directory, model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"])
    cmd = [sys.executable, "-m", "engine.generate", "--model", str(directory), "--prompt", "hi"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "model_type='qwen3_moe'" in lines[0], r.stderr


def test_mismatched_weights_are_named(tmp_path):
    _, directory = make_checkpoint("llama-linear", tmp_path)
    save_file({"model.extra.weight": torch.zeros(2)}, str(directory / "model.safetensors"))
    with pytest.raises(CheckpointError, match="model.extra.weight"):
        load_checkpoint(directory)
    with pytest.raises(ConfigError):
        _with_config(directory, head_dim=-1)
        ModelConfig.load(directory)


def test_engine_packed_steps_equal_full_forward(tmp_path):
    """The engine's packed, paged path runs the Qwen3 options too (q/k norms, explicit head_dim,
    biases off): greedy tokens equal transformers' greedy generate."""
    from engine.generate import generate

    ref, directory = make_checkpoint("qwen2", tmp_path)
    ours, _ = load_checkpoint(directory)
    prompts = [list(np.random.default_rng(i).integers(0, VOCAB, n)) for i, n in enumerate((5, 11))]
    got = generate(ours, [[int(t) for t in p] for p in prompts], 12, 0.0, 0, None)
    for p, g in zip(prompts, got):
        want = ref.generate(
            torch.tensor([p]), max_new_tokens=12, do_sample=False, eos_token_id=None
        )[0, len(p) :].tolist()
        assert g == want
