"""TinyEngram checkpoints (AutoArk/TinyEngram): a Hugging Face Qwen3 saved with
``save_pretrained`` plus Engram modules under ``model.engram_layers.{L}.*`` (the reference's
module names), their settings in ``generation_config.json["engram_cfg"]``.

What maps onto this project's Engram layer, as the reference builds it:
- ``layer_ids`` are 0-based decoder layers; the module adds to the residual before layer L
  (hc_mult 1), exactly where this backbone applies ``model.layers.{L}.engram``;
- ``n_embed_per_ngram`` is split over ``n_head_per_ngram`` heads (row width = the quotient);
- ``pad_id`` is a raw token id, compressed before hashing; the hash's vocabulary bound is the
  number of compressed ids of the checkpoint's tokenizer (the reference's
  ``len(CompressedTokenizer)``), so it is taken from tokenizer.json at load;
- training-only fields (``warmup_steps``, ``soft_constraint_steps``: gate forcing while
  training) and ``tokenizer_name_or_path`` (the directory's own tokenizer is used) are ignored.
"""

from __future__ import annotations

import re

from .config import ConfigError

ENGRAM_CFG_KEY = "engram_cfg"
_KEY = re.compile(r"^model\.engram_layers\.(\d+)\.")
IGNORED = ("tokenizer_name_or_path", "warmup_steps", "soft_constraint_steps")


def engram_fields(cfg: dict) -> dict:
    """ModelConfig's Engram fields for a TinyEngram ``engram_cfg`` (its defaults where a key
    is absent, as its EngramConfig has them)."""
    if not isinstance(cfg, dict):
        raise ConfigError(f"generation_config.json {ENGRAM_CFG_KEY} must be an object")
    n_embed = cfg.get("n_embed_per_ngram", 512)
    n_head = cfg.get("n_head_per_ngram", 8)
    if not isinstance(n_embed, int) or not isinstance(n_head, int) or n_head < 1:
        raise ConfigError(f"{ENGRAM_CFG_KEY}: n_embed_per_ngram and n_head_per_ngram must be ints")
    if n_embed % n_head:
        raise ConfigError(
            f"{ENGRAM_CFG_KEY}: n_embed_per_ngram {n_embed} is not divisible by "
            f"n_head_per_ngram {n_head}"
        )
    return dict(
        engram_layer_ids=list(cfg.get("layer_ids", [1, 15])),
        engram_max_ngram_size=cfg.get("max_ngram_size", 3),
        engram_n_heads=n_head,
        engram_head_dim=n_embed // n_head,
        engram_vocab_size=list(cfg.get("engram_vocab_size", [129280 * 5, 129280 * 5])),
        engram_pad_token_id=cfg.get("pad_id", 2),
        engram_seed=cfg.get("seed", 0),
        engram_kernel_size=cfg.get("kernel_size", 4),
        hc_mult=1,
    )


def our_key(key: str) -> str:
    """``model.engram_layers.{L}.X`` -> ``model.layers.{L}.engram.X``; other keys unchanged."""
    return _KEY.sub(lambda m: f"model.layers.{m.group(1)}.engram.", key)


def their_key(key: str) -> str:
    """The inverse of :func:`our_key` (writing a TinyEngram-format file)."""
    return re.sub(r"^model\.layers\.(\d+)\.engram\.", r"model.engram_layers.\1.", key)
