"""Tiny random Hugging Face checkpoints, built with transformers (the `hf` extra), no hub.

Each family's distinguishing option is switched on, so the reference comparison exercises it:
Llama with llama3 / linear rope scaling, untied heads and an explicit head_dim; Qwen2 with its
q/k/v biases; Qwen3 with q/k norms (tied, as Qwen3-0.6B); Mistral without a sliding window.
The built-in model's tokenizer.json (8192 tokens) goes beside the weights.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from models.checkpoint import default_model_dir

transformers = pytest.importorskip("transformers", reason="needs the hf extra (transformers)")

VOCAB = 8192
BASE = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    bos_token_id=1,
    eos_token_id=2,
)
FAMILIES = {
    "llama3": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(
            head_dim=32,  # explicit, not hidden / heads
            tie_word_embeddings=False,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
            rope_theta=500000.0,
        ),
    ),
    "llama-linear": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(tie_word_embeddings=True, rope_scaling={"rope_type": "linear", "factor": 2.0}),
    ),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=False)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=16, tie_word_embeddings=True)),
    "mistral": (
        "MistralConfig",
        "MistralForCausalLM",
        dict(sliding_window=None, head_dim=16, tie_word_embeddings=False),
    ),
}


def hf_config(family: str, **overrides):
    config_cls, _, extra = FAMILIES[family]
    return getattr(transformers, config_cls)(**{**BASE, **extra, **overrides})


def build(family: str, seed: int = 0, **overrides):
    """A random transformers model of ``family`` in float32, eval mode."""
    _, model_cls, _ = FAMILIES[family]
    torch.manual_seed(seed)
    config = hf_config(family, **overrides)
    config._attn_implementation = "eager"
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a skipped one shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.1)
    return model


def save(model, directory: Path, dtype: torch.dtype | None = None, shard: str | None = None):
    """save_pretrained (safetensors; ``shard`` e.g. '200KB' for an index and shards) plus the
    built-in tokenizer.json."""
    directory.mkdir(parents=True, exist_ok=True)
    if dtype is not None:
        model = model.to(dtype)
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(directory, **kwargs)
    shutil.copy(default_model_dir() / "tokenizer.json", directory / "tokenizer.json")
    return directory


def make_checkpoint(family: str, directory: Path, seed: int = 0, **kwargs):
    """(transformers model in float32, its saved directory)."""
    model = build(family, seed)
    save(model, directory, **kwargs)
    return model.float(), directory
