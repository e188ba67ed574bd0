"""Attention over the paged KV cache, two backends with one call shape: ``attend(layer, q, k,
v)`` writes the new tokens' K/V into the cache, then attends over each sequence's context.

- ``PagedAttention``: the Triton kernels of :mod:`engine.paged_attention` read the KV blocks in
  place (split-K decode, varlen chunked prefill); no context copy, no dense mask. The CUDA
  default; CPU tests run it in Triton's interpreter.
- ``ReferenceAttention``: SDPA, the CPU path and what the kernels are checked against. The
  decodes of a step attend in one SDPA call and each prompt chunk in its own; a sequence's
  context is gathered through its block table and masked causally by position.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import paged_attention
from .fused import store_rows
from .inputs import StepInputs, to_device
from .kv_cache import KVCache

BACKENDS = ("auto", "triton", "reference")


def pick_backend(choice: str, device: torch.device) -> str:
    """'auto': the Triton kernels on CUDA when Triton is installed, else the SDPA reference."""
    if choice not in BACKENDS:
        raise ValueError(f"unknown attention backend {choice!r}; use one of {', '.join(BACKENDS)}")
    if choice == "triton" and not paged_attention.triton_available():
        raise ValueError("attention 'triton' needs Triton (it ships with CUDA builds of torch)")
    if choice == "triton" and device.type != "cuda" and not os.environ.get("TRITON_INTERPRET"):
        raise ValueError(
            "attention 'triton' runs on CUDA (or in Triton's interpreter with "
            "TRITON_INTERPRET=1); use 'reference' on a CPU"
        )
    if choice == "auto":
        cuda = device.type == "cuda" and paged_attention.triton_available()
        return "triton" if cuda else "reference"
    return choice


def write_kv(cache: KVCache, layer: int, slots: torch.Tensor, k, v, kernel: bool) -> None:
    """The new tokens' K/V into their slots: one Triton store per tensor on the kernel path
    (negative slots skipped: CUDA-graph padding), indexed assignment on the reference path."""
    k_cache, v_cache = cache.k[layer], cache.v[layer]
    if kernel:
        store_rows(k_cache, slots, k)
        store_rows(v_cache, slots, v)
    else:
        k_cache[slots] = k.to(k_cache.dtype)
        v_cache[slots] = v.to(v_cache.dtype)


@dataclass
class _Group:
    token_index: torch.Tensor | slice  # rows of the packed step
    seqs: torch.Tensor  # [S] rows of the block table
    q_len: int
    kv_len: int  # longest context in the group
    masked: bool  # False: every query sees the whole kv_len context (no mask needed)


def _groups(inp: StepInputs) -> list[_Group]:
    dev = inp.input_ids.device
    groups = []
    decodes = [i for i, n in enumerate(inp.lengths) if n == 1]
    if decodes:
        at = to_device(decodes, dev)
        ends = {inp.starts[i] + 1 for i in decodes}
        rows = inp.query_start_loc[at].long()
        if len(decodes) == len(inp.lengths):  # a decode step: the rows are 0..S-1
            rows = slice(0, len(decodes))
        groups.append(_Group(rows, at, 1, max(ends), len(ends) > 1))
    tok = 0
    for i, n in enumerate(inp.lengths):
        if n > 1:
            at = to_device([i], dev)
            groups.append(_Group(slice(tok, tok + n), at, n, inp.starts[i] + n, True))
        tok += n
    return groups


class ReferenceAttention:
    """``attend`` for one step: write the new K/V into the cache, then SDPA per group."""

    def __init__(self, cache: KVCache, inp: StepInputs) -> None:
        self.cache, self.inp = cache, inp
        self.groups: list[_Group] | None = None  # made when the first layer attends

    def _prepare(self) -> None:
        """Each group's flat KV index ``[S, L]`` and mask: device work, as large as the step's
        contexts, so it runs inside the forward pass (at its first layer), not before it."""
        inp, bs = self.inp, self.cache.block_size
        self.groups, self.context, self.mask = _groups(inp), [], []
        for g in self.groups:
            ctx = torch.arange(g.kv_len, device=inp.input_ids.device)
            tables = inp.block_tables[g.seqs]
            self.context.append(tables[:, ctx // bs] * bs + ctx % bs)  # [S, L] flat KV index
            mask = None
            if g.masked:
                q_pos = inp.positions[g.token_index].view(len(g.seqs), g.q_len)
                mask = (ctx[None, None, :] <= q_pos[:, :, None]).unsqueeze(1)  # [S, 1, q, L]
            self.mask.append(mask)

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        if self.groups is None:
            self._prepare()
        write_kv(self.cache, layer, self.inp.slot_mapping, k, v, kernel=False)
        k_cache, v_cache = self.cache.k[layer], self.cache.v[layer]
        out = torch.empty_like(q)
        heads, hd = q.shape[1], q.shape[2]
        for g, ctx, mask in zip(self.groups, self.context, self.mask):
            kk = k_cache[ctx].transpose(1, 2).to(q.dtype)  # [S, kv, L, hd]
            vv = v_cache[ctx].transpose(1, 2).to(q.dtype)
            qq = q[g.token_index].view(len(g.seqs), g.q_len, heads, hd).transpose(1, 2)
            o = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, enable_gqa=True)
            out[g.token_index] = o.transpose(1, 2).reshape(-1, heads, hd)
        return out


class PagedAttention:
    """``attend`` through the paged kernels: decode when every sequence adds one token (the
    CUDA-graph path), varlen prefill otherwise."""

    def __init__(self, cache: KVCache, inp: StepInputs) -> None:
        self.cache, self.inp = cache, inp
        self.max_query_len = max(inp.lengths)
        self.scale = cache.config.head_dim**-0.5

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        inp, cache = self.inp, self.cache
        write_kv(cache, layer, inp.slot_mapping, k, v, kernel=True)
        args = (q, cache.k[layer], cache.v[layer], inp.block_tables)
        if self.max_query_len == 1:
            return paged_attention.paged_attention_decode(
                *args, inp.context_lens, cache.block_size, self.scale
            )
        return paged_attention.paged_attention_prefill(
            *args,
            inp.query_start_loc,
            inp.context_lens,
            self.max_query_len,
            cache.block_size,
            self.scale,
        )
