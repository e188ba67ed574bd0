"""An Engram memory's checkpoint against the served one: same backbone, same Engram layout.

A memory is a checkpoint of the served base (this project's format or TinyEngram's) whose
Engram layers (tables plus gate, projection and conv weights) differ; everything else must be
the base's. Two checks, each failing with one line that names what differs:

- ``check_backbone``: the backbone config fields and every backbone tensor are the base's
  (bit for bit in the served dtype; a fine-tune that moved one weight is another model);
- ``check_layout``: the Engram layout is the served one (layers, n-gram orders, heads, row
  width, hash seed and sizes, compression), so one n-gram hash per step serves every memory
  and a sequence's row ids index its own memory's tables.
"""

from __future__ import annotations

import numpy as np
import torch

from .config import ModelConfig
from .llama import EngramForCausalLM

BACKBONE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "rope_theta",
    "rms_norm_eps",
    "tie_word_embeddings",
    "attention_head_dim",
    "attention_bias",
    "qk_norm",
    "rope_scaling",
)
LAYOUT_FIELDS = (
    "engram_layer_ids",
    "engram_max_ngram_size",
    "engram_n_heads",
    "engram_head_dim",
    "engram_vocab_size",
    "engram_compressed_vocab_size",
    "engram_pad_token_id",
    "engram_seed",
    "engram_kernel_size",
    "hc_mult",
)


class MemoryMismatch(ValueError):
    """A memory checkpoint is not one of the served base: the message names what differs."""


def _fields_differ(a: ModelConfig, b: ModelConfig, fields: tuple[str, ...]) -> list[str]:
    return [
        f"{f} {getattr(b, f)!r} (base {getattr(a, f)!r})"
        for f in fields
        if getattr(a, f) != getattr(b, f)
    ]


def is_engram_key(key: str) -> bool:
    return ".engram." in key


def check_backbone(base: EngramForCausalLM, memory: EngramForCausalLM, name: str) -> None:
    """Refuse ``memory`` unless its backbone is ``base``'s: config fields, then tensors."""
    differ = _fields_differ(base.config, memory.config, BACKBONE_FIELDS)
    if differ:
        raise MemoryMismatch(f"memory {name!r} is not a checkpoint of the served base: {differ[0]}")
    theirs = dict(memory.named_parameters())
    for key, ours in base.named_parameters():
        if is_engram_key(key) or ours.is_meta:
            continue
        other = theirs.get(key)
        if other is None:
            raise MemoryMismatch(f"memory {name!r} has no backbone weight {key}")
        other = other.detach()
        if other.shape != ours.shape or not torch.equal(ours.detach().to(other.device), other):
            raise MemoryMismatch(
                f"memory {name!r}: backbone weight {key} differs from the base's "
                "(a memory changes only the Engram layers)"
            )


def check_layout(base: EngramForCausalLM, memory: EngramForCausalLM, name: str) -> None:
    """Refuse ``memory`` unless its Engram layout hashes exactly as the served one."""
    if not memory.config.engram_layer_ids:
        raise MemoryMismatch(f"memory {name!r} has no Engram layers")
    if not base.config.engram_layer_ids:
        raise MemoryMismatch(
            f"memory {name!r}: the served base has no Engram layers; start engram-serve with "
            "--memories to give it an Engram layout"
        )
    differ = _fields_differ(base.config, memory.config, LAYOUT_FIELDS)
    if differ:
        raise MemoryMismatch(
            f"memory {name!r}: its Engram layout differs from the served one: {differ[0]}"
        )
    a, b = base.compression, memory.compression
    if (a is None) != (b is None) or (a is not None and not np.array_equal(a, b)):
        raise MemoryMismatch(f"memory {name!r}: its tokenizer compresses ids differently")
