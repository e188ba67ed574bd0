"""Llama-style decoder with Engram layers (HF Llama parameter names for the backbone).

Two forward paths over the same weights:
- ``forward_full``: dense ``[B, T]`` batches from position 0 (training, reference for tests);
- ``forward_step``: a packed step of ragged sequences against the paged KV cache, with the
  Engram rows supplied by a :class:`RowSource` (resident lookup here, the offload engine's
  prefetcher elsewhere).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .cache import KVCache, StepBatch
from .config import ModelConfig
from .engram import Engram
from .hashing import NgramHasher
from .tokenizer import compress_ids


class RowSource(Protocol):
    """Engram rows of one step, per layer, ``[N, heads, head_dim]`` on the model's device."""

    def rows(self, layer_id: int) -> torch.Tensor: ...


class ResidentRows:
    """Rows read from the model's own (resident) tables."""

    def __init__(self, model: EngramForCausalLM, row_ids: dict[int, torch.Tensor]) -> None:
        self.model, self.row_ids = model, row_ids

    def rows(self, layer_id: int) -> torch.Tensor:
        table = self.model.engram_table(layer_id)
        return F.embedding(self.row_ids[layer_id].to(table.device), table)


def rope_cache(config: ModelConfig, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    hd = config.head_dim
    inv = 1.0 / (config.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    t = torch.arange(config.max_position_embeddings, dtype=torch.float64)
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
        d = config.hidden_size
        self.q_proj = nn.Linear(d, self.n_heads * self.hd, bias=False)
        self.k_proj = nn.Linear(d, self.n_kv * self.hd, bias=False)
        self.v_proj = nn.Linear(d, self.n_kv * self.hd, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.hd, d, bias=False)

    def _qkv(self, x, cos, sin):
        shape = x.shape[:-1]
        q = apply_rope(self.q_proj(x).view(*shape, self.n_heads, self.hd), cos, sin)
        k = apply_rope(self.k_proj(x).view(*shape, self.n_kv, self.hd), cos, sin)
        v = self.v_proj(x).view(*shape, self.n_kv, self.hd)
        return q, k, v

    def forward_full(self, x, cos, sin):
        """x ``[B, T, D]``, causal from position 0."""
        q, k, v = (t.transpose(1, 2) for t in self._qkv(x, cos, sin))
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.o_proj(o.transpose(1, 2).flatten(2))

    def forward_step(self, x, cos, sin, batch: StepBatch, groups: list[_Group], k_cache, v_cache):
        """x ``[N, D]`` packed; writes this step's K/V, attends over each sequence's context."""
        q, k, v = self._qkv(x, cos, sin)
        k_cache[batch.slot_mapping] = k.to(k_cache.dtype)
        v_cache[batch.slot_mapping] = v.to(v_cache.dtype)
        out = torch.empty_like(q)
        for group in groups:
            out[group.token_index] = self._attend(q, k_cache, v_cache, batch, group)
        return self.o_proj(out.flatten(1))

    def _attend(self, q, k_cache, v_cache, batch: StepBatch, g: _Group) -> torch.Tensor:
        ctx = batch.context_index[g.seqs, : g.kv_len]  # [S, L]
        kk = k_cache[ctx].transpose(1, 2).to(q.dtype)  # [S, kv, L, hd]
        vv = v_cache[ctx].transpose(1, 2).to(q.dtype)
        qq = q[g.token_index].view(len(g.seqs), g.q_len, self.n_heads, self.hd).transpose(1, 2)
        o = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=g.mask, enable_gqa=True)
        return o.transpose(1, 2).reshape(-1, self.n_heads, self.hd)


class _Group:
    """Sequences attended in one SDPA call: all decodes together, each prompt chunk alone."""

    def __init__(self, batch: StepBatch, seqs: list[int], q_len: int, tok_start: np.ndarray):
        dev = batch.input_ids.device
        self.seqs = torch.tensor(seqs, dtype=torch.long, device=dev)
        self.q_len = q_len
        starts = np.array([batch.starts[i] for i in seqs])
        self.kv_len = int((starts + q_len).max())
        idx = np.concatenate([tok_start[i] + np.arange(q_len) for i in seqs])
        self.token_index = torch.from_numpy(idx).to(dev)
        q_pos = starts[:, None] + np.arange(q_len)[None, :]  # [S, q]
        k_pos = np.arange(self.kv_len)
        mask = k_pos[None, None, :] <= q_pos[:, :, None]  # [S, q, L]
        self.mask = torch.from_numpy(mask).unsqueeze(1).to(dev)


def attention_groups(batch: StepBatch) -> list[_Group]:
    lengths = np.array(batch.lengths)
    tok_start = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    decodes = [i for i, n in enumerate(batch.lengths) if n == 1]
    groups = [_Group(batch, decodes, 1, tok_start)] if decodes else []
    return groups + [_Group(batch, [i], n, tok_start) for i, n in enumerate(lengths) if n > 1]


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
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
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

    def forward_step(
        self,
        batch: StepBatch,
        cache: KVCache,
        rows: RowSource,
        all_logits: bool = False,
    ) -> torch.Tensor:
        """Logits for each sequence's last new token ``[S, V]`` (or every new token ``[N, V]``)."""
        cos, sin = self.rope_cos[batch.positions], self.rope_sin[batch.positions]
        groups = attention_groups(batch)
        h = self.model.embed_tokens(batch.input_ids)
        for i, layer in enumerate(self.model.layers):
            if layer.engram is not None:
                hist = cache.conv[i][batch.conv_slots]
                out, nxt = layer.engram.fuse_packed(
                    h.unsqueeze(1), rows.rows(i), hist, batch.conv_step
                )
                cache.conv[i][batch.conv_slots] = nxt.to(cache.conv[i].dtype)
                h = h + out.squeeze(1)
            attn_in = layer.input_layernorm(h)
            h = h + layer.self_attn.forward_step(
                attn_in, cos, sin, batch, groups, cache.k[i], cache.v[i]
            )
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        if not all_logits:
            h = h[batch.last_token_index.to(h.device)]
        return self.lm_head(self.model.norm(h))
