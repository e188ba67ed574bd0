"""Llama-style decoder with Engram layers (HF Llama parameter names for the backbone).

Two forward paths over the same weights:
- ``forward_full``: dense ``[B, T]`` batches from position 0 (training, reference for tests);
- ``forward_step``: a packed step of ragged sequences; a :class:`StepContext` built by the
  engine supplies attention over the cached context and the step's prefetched Engram rows.
"""

from __future__ import annotations

import math
from typing import Protocol

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .engram import ConvStep, Engram, EngramGroup, embedding, fuse_groups
from .hashing import NgramHasher
from .tokenizer import compress_ids


class StepContext(Protocol):
    """What a packed step needs besides the weights; the engine builds one per step.

    The model never sees the KV cache layout, the Engram row tier or the batch composition:
    ``attend`` writes this step's K/V and attends over each sequence's cached context,
    ``engram_rows`` hands a layer its prefetched rows, and the conv history is the small
    per-sequence ShortConv state Engram decoding carries.
    """

    positions: torch.Tensor  # [N]
    conv_step: ConvStep | None

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q ``[N, H, D]``, k/v ``[N, KV, D]`` of the new tokens -> ``[N, H, D]``."""
        ...

    def engram_rows(self, layer: int) -> torch.Tensor:
        """The layer's rows for every new token, ``[N, heads, dim]`` on the model's device."""
        ...

    def engram_groups(self, layer: int) -> list[EngramGroup] | None:
        """The layer's modules and rows per memory when the step's tokens read several
        Engram memories; None: every token reads the model's own module (``engram_rows``)."""
        ...

    def conv_history(self, layer: int) -> torch.Tensor: ...

    def set_conv_history(self, layer: int, history: torch.Tensor) -> None: ...


def scale_inv_freq(inv: torch.Tensor, scaling: dict | None) -> torch.Tensor:
    """Hugging Face's 'linear' and 'llama3' RoPE scalings of the inverse frequencies."""
    if scaling is None:
        return inv
    kind, factor = scaling.get("rope_type", scaling.get("type")), float(scaling["factor"])
    if kind == "linear":
        return inv / factor
    # llama3: long wavelengths slowed by `factor`, short ones kept, a smooth blend between
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv
    out = torch.where(wavelen > old_len / low, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * out / factor + smooth * out
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, blended, out)


def rope_cache(config: ModelConfig, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables, computed on the CPU in float64 (also while a model is built on the meta
    device, whose arange would import torch's compiler stack) and moved to ``device``."""
    hd = config.head_dim
    cpu = torch.device("cpu")
    inv = 1.0 / (
        config.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64, device=cpu) / hd)
    )
    inv = scale_inv_freq(inv, config.rope_scaling)
    t = torch.arange(config.max_position_embeddings, dtype=torch.float64, device=cpu)
    freqs = torch.outer(t, inv)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().float().to(device), emb.sin().float().to(device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x ``[..., T, heads, hd]``; cos/sin ``[..., T, hd]``."""
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos.unsqueeze(-2) + rot * sin.unsqueeze(-2)).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.n_heads = config.num_attention_heads
        self.n_kv = config.num_key_value_heads
        self.hd = config.head_dim
        d, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(d, self.n_heads * self.hd, bias=bias)
        self.k_proj = nn.Linear(d, self.n_kv * self.hd, bias=bias)
        self.v_proj = nn.Linear(d, self.n_kv * self.hd, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.hd, d, bias=False)
        if config.qk_norm:  # Qwen3: per-head RMSNorm of q and k before RoPE
            self.q_norm = nn.RMSNorm(self.hd, eps=config.rms_norm_eps)
            self.k_norm = nn.RMSNorm(self.hd, eps=config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def _qkv(self, x, cos, sin):
        shape = x.shape[:-1]
        q = self.q_proj(x).view(*shape, self.n_heads, self.hd)
        k = self.k_proj(x).view(*shape, self.n_kv, self.hd)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        v = self.v_proj(x).view(*shape, self.n_kv, self.hd)
        return q, k, v

    def forward_full(self, x, cos, sin):
        """x ``[B, T, D]``, causal from position 0."""
        q, k, v = (t.transpose(1, 2) for t in self._qkv(x, cos, sin))
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.o_proj(o.transpose(1, 2).flatten(2))

    def forward_step(self, x, cos, sin, attend) -> torch.Tensor:
        """x ``[N, D]`` packed new tokens; ``attend(q, k, v)`` does the cache work."""
        q, k, v = self._qkv(x, cos, sin)
        return self.o_proj(attend(q, k, v).flatten(1))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d, f = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, engram: Engram | None) -> None:
        super().__init__()
        self.engram = engram
        self.input_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = MLP(config)


class Backbone(nn.Module):
    def __init__(self, config: ModelConfig, hasher: NgramHasher) -> None:
        super().__init__()
        self.embed_tokens = embedding(config.vocab_size, config.hidden_size)
        layers = []
        for i in range(config.num_hidden_layers):
            engram = None
            if i in config.engram_layer_ids:
                engram = Engram(
                    config.hidden_size,
                    hasher.flat_head_sizes(i),
                    config.engram_head_dim,
                    config.engram_max_ngram_size,
                    config.engram_kernel_size,
                    config.hc_mult,
                )
            layers.append(DecoderLayer(config, engram))
        self.layers = nn.ModuleList(layers)
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)


class EngramForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig, compression: np.ndarray | None = None) -> None:
        """compression: raw id -> compressed id table (None: identity, for synthetic models)."""
        super().__init__()
        self.config = config.validate()
        self.compression = compression
        pad = config.engram_pad_token_id
        self.hasher = NgramHasher(
            config.engram_vocab_size,
            config.engram_max_ngram_size,
            config.engram_n_heads,
            config.engram_layer_ids,
            config.engram_compressed_vocab_size,
            int(compression[pad]) if compression is not None else pad,
            config.engram_seed,
        )
        self.model = Backbone(config, self.hasher)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        cos, sin = rope_cache(config)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    # --- Engram lookups ------------------------------------------------------------------------
    def engram_layers(self) -> dict[int, Engram]:
        return {i: self.model.layers[i].engram for i in self.config.engram_layer_ids}

    def engram_table(self, layer_id: int) -> torch.Tensor:
        return self.model.layers[layer_id].engram.multi_head_embedding.embedding.weight

    def compress(self, ids: np.ndarray) -> np.ndarray:
        return compress_ids(self.compression, ids)

    def row_ids(
        self, histories: np.ndarray, new_ids: np.ndarray, lengths: np.ndarray
    ) -> tuple[dict[int, np.ndarray], np.ndarray]:
        """Global table rows ``{layer: [N, heads]}`` for a packed step, and the next histories.

        histories: ``[S, max_ngram_size - 1]`` compressed ids; new_ids: raw token ids ``[N]``.
        """
        hashes, nxt = self.hasher.hash_packed(histories, self.compress(new_ids), lengths)
        rows = {lid: h + self.hasher.head_offsets(lid) for lid, h in hashes.items()}
        return rows, nxt

    def full_row_ids(self, input_ids: np.ndarray) -> dict[int, np.ndarray]:
        """``[B, T]`` raw ids from position 0 -> global rows ``{layer: [B, T, heads]}``."""
        hashes = self.hasher.hash(self.compress(input_ids))
        return {lid: h + self.hasher.head_offsets(lid) for lid, h in hashes.items()}

    # --- forward paths -------------------------------------------------------------------------
    def forward_full(
        self, input_ids: torch.Tensor, engram_scale: float = 1.0, return_hidden: bool = False
    ) -> torch.Tensor:
        """Logits ``[B, T, V]`` for whole sequences; engram_scale=0 ablates the Engram output."""
        B, T = input_ids.shape
        rows = self.full_row_ids(input_ids.cpu().numpy())
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        h = self.model.embed_tokens(input_ids)
        for i, layer in enumerate(self.model.layers):
            if layer.engram is not None:
                head_rows = F.embedding(
                    torch.from_numpy(rows[i]).to(h.device), self.engram_table(i)
                )
                h = h + engram_scale * layer.engram.fuse(h.unsqueeze(2), head_rows).squeeze(2)
            h = h + layer.self_attn.forward_full(layer.input_layernorm(h), cos, sin)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        h = self.model.norm(h)
        return h if return_hidden else self.lm_head(h)

    def layer_step(
        self, i: int, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: StepContext
    ) -> torch.Tensor:
        """One decoder layer of a packed step: ``h = h + engram; h = h + attn; h = h + mlp``."""
        layer = self.model.layers[i]
        # None: every token reads this module; [] : none reads an Engram memory here
        groups = ctx.engram_groups(i) if layer.engram is not None else []
        if groups is None:
            out, nxt = layer.engram.fuse_packed(
                h.unsqueeze(1), ctx.engram_rows(i), ctx.conv_history(i), ctx.conv_step
            )
        elif groups:
            out, nxt = fuse_groups(groups, h.unsqueeze(1), ctx.conv_history(i), ctx.conv_step)
        if groups is None or groups:
            ctx.set_conv_history(i, nxt)
            h = h + out.squeeze(1)
        attend = lambda q, k, v: ctx.attend(i, q, k, v)
        h = h + layer.self_attn.forward_step(layer.input_layernorm(h), cos, sin, attend)
        return h + layer.mlp(layer.post_attention_layernorm(h))

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rope_cos[positions], self.rope_sin[positions]

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.model.norm(h))

    def forward_step(
        self,
        input_ids: torch.Tensor,
        ctx: StepContext,
        logits_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits of a packed step: for the rows ``logits_index`` picks (``[len, V]``), or for
        every new token (``[N, V]``) when it is None. The engine's CUDA-graph path runs the
        same pieces (``embed_tokens``, ``layer_step``, ``logits``) split at the Engram layers."""
        cos, sin = self.rope(ctx.positions)
        h = self.model.embed_tokens(input_ids)
        for i in range(len(self.model.layers)):
            h = self.layer_step(i, h, cos, sin, ctx)
        if logits_index is not None:
            h = h[logits_index]
        return self.logits(h)


def init_weights(model: EngramForCausalLM, generator: torch.Generator, skip=()) -> None:
    """Training init: norms 1, biases 0, ShortConv 0 (Engram starts as a plain gated lookup),
    Engram tables N(0, 1), residual-out projections scaled by depth, the rest N(0, 0.02).
    Parameters named in ``skip`` (e.g. unmaterialised tables) are left alone."""
    n_layers = model.config.num_hidden_layers
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in skip:
                continue
            if "norm" in name:
                p.fill_(1.0)
            elif name.endswith(".bias") or "short_conv.conv" in name:
                p.zero_()
            elif "multi_head_embedding" in name:
                p.normal_(0.0, 1.0, generator=generator)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                p.normal_(0.0, 0.02 / math.sqrt(2 * n_layers), generator=generator)
            else:
                p.normal_(0.0, 0.02, generator=generator)
