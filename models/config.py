"""Checkpoint config: a Llama-style backbone plus Engram fields, as stored in config.json."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path


class ConfigError(ValueError):
    """A config value that cannot work; the message names the field and the fix."""


ROPE_SCALINGS = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


def check_rope_scaling(scaling: dict) -> None:
    """ConfigError unless ``scaling`` is a RoPE scaling this backbone computes."""
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind not in ROPE_SCALINGS:
        raise ConfigError(
            f"config field 'rope_scaling': rope_type {kind!r} is not supported; "
            f"supported: default, {', '.join(ROPE_SCALINGS)}"
        )
    missing = [k for k in ROPE_SCALINGS[kind] if k not in scaling]
    if missing:
        raise ConfigError(f"config field 'rope_scaling': {kind} scaling needs {missing}")


def cap_context(config: ModelConfig, max_model_len: int) -> ModelConfig:
    """Serve at most ``max_model_len`` tokens per sequence (0: the model's own limit), as
    vLLM's --max-model-len; the KV pool and every length check follow. In place."""
    if max_model_len < 0 or max_model_len > config.max_position_embeddings:
        raise ConfigError(
            f"--max-model-len {max_model_len} must be from 1 to the model's "
            f"max_position_embeddings ({config.max_position_embeddings}), or 0 for that"
        )
    if max_model_len:
        config.max_position_embeddings = max_model_len
    return config


@dataclass
class ModelConfig:
    # backbone
    vocab_size: int = 8192
    hidden_size: int = 256
    intermediate_size: int = 688
    num_hidden_layers: int = 4
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    # Engram (names as DeepSeek-V4.1 uses them)
    engram_layer_ids: list[int] = field(default_factory=lambda: [1])
    engram_max_ngram_size: int = 3
    engram_n_heads: int = 4
    engram_head_dim: int = 16
    engram_vocab_size: list[int] = field(default_factory=lambda: [20000, 20000])
    engram_compressed_vocab_size: int = 8192
    engram_pad_token_id: int = 0
    engram_seed: int = 0
    engram_kernel_size: int = 4
    hc_mult: int = 1
    model_type: str = "engram_llama"
    # backbone switches for the Hugging Face families (models/hf_config.py sets them)
    attention_head_dim: int | None = None  # HF `head_dim` when it is not hidden / heads
    attention_bias: bool = False  # biases on q/k/v (Qwen2)
    qk_norm: bool = False  # RMSNorm over each q and k head before RoPE (Qwen3)
    rope_scaling: dict | None = None  # {"rope_type": "linear" | "llama3", ...} (HF's keys)
    # more ids that end a sequence besides eos_token_id (a list in HF's config.json or
    # generation_config.json, e.g. Llama 3's <|eot_id|>)
    eos_token_ids: list[int] = field(default_factory=list)

    # --- derived -----------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.attention_head_dim or self.hidden_size // self.num_attention_heads

    @property
    def stop_token_ids(self) -> frozenset[int]:
        """Every token id that ends a sequence (unless ignore_eos)."""
        ids = {*self.eos_token_ids, self.eos_token_id}
        ids.discard(None)
        return frozenset(ids)

    @property
    def engram_total_heads(self) -> int:
        """Heads per Engram layer over all n-gram orders (rows gathered per token per layer)."""
        return (self.engram_max_ngram_size - 1) * self.engram_n_heads

    @property
    def engram_hidden_size(self) -> int:
        """Width of one token's concatenated Engram embedding."""
        return self.engram_total_heads * self.engram_head_dim

    # --- validation ----------------------------------------------------------
    def validate(self) -> ModelConfig:
        def fail(name: str, msg: str) -> None:
            raise ConfigError(f"config field '{name}': {msg}")

        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "max_position_embeddings",
            "engram_n_heads",
            "engram_head_dim",
            "engram_compressed_vocab_size",
            "engram_kernel_size",
            "hc_mult",
        ):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                fail(name, f"must be a positive integer, got {v!r}")
        if self.attention_head_dim is not None and (
            not isinstance(self.attention_head_dim, int) or self.attention_head_dim < 1
        ):
            fail(
                "attention_head_dim", f"must be a positive integer, got {self.attention_head_dim!r}"
            )
        if self.attention_head_dim is None and self.hidden_size % self.num_attention_heads:
            fail(
                "hidden_size",
                f"{self.hidden_size} is not divisible by num_attention_heads "
                f"{self.num_attention_heads}; pick a multiple",
            )
        if self.num_attention_heads % self.num_key_value_heads:
            fail(
                "num_key_value_heads",
                f"{self.num_key_value_heads} must divide num_attention_heads "
                f"{self.num_attention_heads}",
            )
        if self.head_dim % 2:
            fail("hidden_size", f"head dim {self.head_dim} must be even for RoPE")
        if self.rope_scaling is not None:
            check_rope_scaling(self.rope_scaling)
        if self.engram_max_ngram_size < 2:
            fail("engram_max_ngram_size", f"must be >= 2, got {self.engram_max_ngram_size}")
        if len(self.engram_vocab_size) != self.engram_max_ngram_size - 1:
            fail(
                "engram_vocab_size",
                f"needs one size per n-gram order 2..{self.engram_max_ngram_size} "
                f"({self.engram_max_ngram_size - 1} entries), got {len(self.engram_vocab_size)}",
            )
        for v in self.engram_vocab_size:
            if not isinstance(v, int) or v < 2:
                fail("engram_vocab_size", f"entries must be integers >= 2, got {v!r}")
        if len(set(self.engram_layer_ids)) != len(self.engram_layer_ids):
            fail("engram_layer_ids", f"has duplicates: {self.engram_layer_ids}")
        for lid in self.engram_layer_ids:
            if not isinstance(lid, int) or not 0 <= lid < self.num_hidden_layers:
                fail(
                    "engram_layer_ids",
                    f"layer id {lid!r} is outside the backbone "
                    f"(0..{self.num_hidden_layers - 1}); use an existing layer index",
                )
        if self.engram_layer_ids != sorted(self.engram_layer_ids):
            fail("engram_layer_ids", f"must be sorted ascending, got {self.engram_layer_ids}")
        if not 0 <= self.engram_pad_token_id < self.vocab_size:
            fail(
                "engram_pad_token_id",
                f"{self.engram_pad_token_id} is outside the vocab (0..{self.vocab_size - 1}); "
                "use a token id of the tokenizer",
            )
        if self.engram_compressed_vocab_size > self.vocab_size:
            fail(
                "engram_compressed_vocab_size",
                f"{self.engram_compressed_vocab_size} exceeds vocab_size {self.vocab_size}; "
                "rebuild the compression table from the tokenizer",
            )
        if self.engram_head_dim * self.engram_total_heads > 1 << 20:
            fail(
                "engram_head_dim",
                f"row width {self.engram_head_dim} x {self.engram_total_heads} heads does not "
                "fit one Engram embedding (over 1M values per token); use a smaller head dim",
            )
        if self.engram_layer_ids and self.hc_mult != 1:
            fail("hc_mult", f"the backbone supports hc_mult = 1 only, got {self.hc_mult}")
        for name in ("bos_token_id", "eos_token_id"):
            v = getattr(self, name)
            if v is not None and not 0 <= v < self.vocab_size:
                fail(name, f"{v} is outside the vocab (0..{self.vocab_size - 1})")
        for v in self.eos_token_ids:
            if not isinstance(v, int) or not 0 <= v < self.vocab_size:
                fail("eos_token_ids", f"{v!r} is outside the vocab (0..{self.vocab_size - 1})")
        return self

    # --- I/O ------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(
                f"config has unknown field(s) {unknown}; remove them or check the spelling"
            )
        return cls(**d).validate()

    def save(self, directory: str | Path) -> None:
        path = Path(directory) / "config.json"
        path.write_text(json.dumps(self.validate().to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> ModelConfig:
        path = Path(directory) / "config.json"
        if not path.is_file():
            raise ConfigError(f"no config.json in {directory}; point at a checkpoint directory")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from e
        from .hf_config import from_hf, is_hf_config  # they build on this module
        from .hf_files import GenerationDefaults

        if is_hf_config(data):
            return from_hf(data, GenerationDefaults.read(directory))
        return cls.from_dict(data)
