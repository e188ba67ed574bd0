"""A Hugging Face ``config.json`` as a :class:`ModelConfig` of the one Llama-style backbone.

Llama (rope scaling ``linear`` / ``llama3``, untied heads, explicit ``head_dim``), Qwen2 (q/k/v
biases), Qwen3 (q/k RMSNorm) and Mistral without a sliding window are options of that backbone.
Everything else is refused with one line naming the field and what is supported
(:class:`UnsupportedModel`; the CLIs exit with status 2 on it).

Engram fields in the same file (``engram_layer_ids``, ... as :class:`ModelConfig` names them,
what engram-attach writes) add this project's Engram layers to the backbone.
"""

from __future__ import annotations

import dataclasses

from .config import ROPE_SCALINGS, ConfigError, ModelConfig
from .hf_files import GenerationDefaults, id_list
from .tinyengram import engram_fields

FAMILIES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mistral": "MistralForCausalLM",
}
OWN_MODEL_TYPE = "engram_llama"
_ENGRAM_FIELDS = {f.name for f in dataclasses.fields(ModelConfig) if f.name.startswith("engram_")}
_ENGRAM_FIELDS.add("hc_mult")


class UnsupportedModel(ConfigError):
    """A checkpoint this server cannot run; the message is one line: the field, the value and
    what is supported."""


def is_hf_config(data: dict) -> bool:
    """True for a Hugging Face config.json, False for this project's own format."""
    return data.get("model_type", OWN_MODEL_TYPE) != OWN_MODEL_TYPE


def _refuse(field: str, value, supported: str) -> None:
    raise UnsupportedModel(
        f"config.json {field}={value!r} is not supported; supported: {supported}"
    )


def rope_settings(data: dict) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling or None) from either transformers 4's ``rope_theta`` +
    ``rope_scaling`` or transformers 5's ``rope_parameters``."""
    params = data.get("rope_parameters") or data.get("rope_scaling") or {}
    if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
        _refuse("rope_parameters", params, "one RoPE setting for every layer")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ("default", *ROPE_SCALINGS):
        _refuse("rope_type", kind, f"default, {', '.join(ROPE_SCALINGS)}")
    if float(params.get("partial_rotary_factor", data.get("partial_rotary_factor", 1.0))) != 1.0:
        _refuse("partial_rotary_factor", params.get("partial_rotary_factor"), "1.0")
    theta = float(params.get("rope_theta", data.get("rope_theta") or 10000.0))
    if kind == "default":
        return theta, None
    scaling = {k: v for k, v in params.items() if k not in ("rope_theta", "type")}
    scaling["rope_type"] = kind
    return theta, scaling


def _check_family(data: dict) -> str:
    model_type = data.get("model_type")
    if model_type not in FAMILIES:
        _refuse("model_type", model_type, ", ".join(FAMILIES))
    for arch in data.get("architectures") or [FAMILIES[model_type]]:
        if arch not in FAMILIES.values():
            _refuse("architectures", arch, ", ".join(FAMILIES.values()))
    for name in ("num_experts", "num_local_experts", "n_routed_experts"):
        if data.get(name):
            _refuse(name, data[name], "dense models (no mixture of experts)")
    if data.get("hidden_act", "silu") != "silu":
        _refuse("hidden_act", data["hidden_act"], "silu")
    if data.get("mlp_bias"):
        _refuse("mlp_bias", data["mlp_bias"], "false")
    window = data.get("sliding_window")
    if window is not None and (model_type == "mistral" or data.get("use_sliding_window")):
        _refuse("sliding_window", window, "null (full attention in every layer)")
    for kind in data.get("layer_types") or []:
        if kind != "full_attention":
            _refuse("layer_types", kind, "full_attention")
    return model_type


def _first(v):
    return v[0] if isinstance(v, list) and v else (v if isinstance(v, int) else None)


def from_hf(data: dict, generation: GenerationDefaults | None = None) -> ModelConfig:
    """The backbone a Hugging Face config describes, plus any Engram fields it carries;
    ``generation`` (generation_config.json) adds its EOS ids."""
    model_type = _check_family(data)
    theta, scaling = rope_settings(data)
    vocab = data["vocab_size"]
    heads = data["num_attention_heads"]
    fields = dict(
        vocab_size=vocab,
        hidden_size=data["hidden_size"],
        intermediate_size=data["intermediate_size"],
        num_hidden_layers=data["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=data.get("num_key_value_heads") or heads,
        rope_theta=theta,
        rms_norm_eps=float(data.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=data.get("max_position_embeddings", 2048),
        tie_word_embeddings=bool(data.get("tie_word_embeddings", False)),
        bos_token_id=_first(data.get("bos_token_id")),
        eos_token_id=_first(data.get("eos_token_id")),
        model_type=model_type,
        attention_head_dim=data.get("head_dim"),
        attention_bias=model_type == "qwen2" or bool(data.get("attention_bias", False)),
        qk_norm=model_type == "qwen3",
        rope_scaling=scaling,
        # no Engram layers unless the config names them
        engram_layer_ids=[],
        engram_compressed_vocab_size=min(vocab, ModelConfig.engram_compressed_vocab_size),
    )
    fields.update({k: v for k, v in data.items() if k in _ENGRAM_FIELDS})
    if generation is not None and generation.engram_cfg is not None:  # TinyEngram
        fields.update(engram_fields(generation.engram_cfg))
        fields["engram_compressed_vocab_size"] = vocab  # the tokenizer's, set at load
    for k in ("bos_token_id", "eos_token_id"):
        if fields[k] is not None and not 0 <= fields[k] < vocab:
            fields[k] = None  # some configs name ids of added tokens past vocab_size
    eos = id_list(data.get("eos_token_id")) + (generation.eos_token_ids if generation else [])
    fields["eos_token_ids"] = sorted({i for i in eos if 0 <= i < vocab} - {fields["eos_token_id"]})
    return ModelConfig(**fields).validate()
