"""Paged attention over the KV block cache: Triton kernels for decode (split-K) and prefill.

Cache layout (the engine's): per layer ``k_cache`` and ``v_cache`` of shape
``[num_blocks * block_size, num_kv_heads, head_dim]``; position p of sequence s lives at slot
``block_tables[s, p // block_size] * block_size + p % block_size``. The step's new K/V are
already in the cache. Nothing here reads a tensor value on the host: launch parameters come
from shapes and Python ints only, so decode calls can be captured in CUDA graphs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from offload.triton_compat import patch_interpreter

try:
    import triton
    import triton.language as tl
except ImportError:  # the module still imports; the kernels refuse to run
    triton = None
if os.environ.get("TRITON_INTERPRET") == "1":
    patch_interpreter()

LOG2E = 1.4426950408889634
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_HEAD_DIM = 256
DECODE_TILE = 64  # KV tokens per split unit of default_num_splits (the widest decode tile)


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and warps of one kernel launch."""

    block_n: int  # KV tokens per loop iteration
    num_warps: int
    block_m: int = 0  # prefill: new tokens per program
    num_stages: int = 2


# (half precision?, BLOCK_D) -> config. Chosen by compiling every kernel for sm_90 with
# Triton 3.6 (what CUDA torch 2.11 ships) and 3.9 and reading ptxas's spill count: each entry
# is one that spills nothing, with room below the 255-register limit (tests/test_paged_attention
# compiles them again). float32 runs the dot products on FMAs (no TF32), so its accumulators
# need smaller tiles than bf16/fp16 on tensor cores.
DECODE_CONFIGS = {
    (True, 64): KernelConfig(64, 4),
    (True, 128): KernelConfig(64, 8),
    (True, 256): KernelConfig(32, 4),
    (False, 64): KernelConfig(32, 8),
    (False, 128): KernelConfig(32, 8),
    (False, 256): KernelConfig(16, 4),
}
PREFILL_CONFIGS = {
    (True, 64): KernelConfig(64, 8, block_m=64),
    (True, 128): KernelConfig(32, 8, block_m=64),
    (True, 256): KernelConfig(16, 8, block_m=32),
    (False, 64): KernelConfig(32, 8, block_m=32),
    (False, 128): KernelConfig(16, 8, block_m=32),
    (False, 256): KernelConfig(16, 4, block_m=16),
}


def _block_d(head_dim: int) -> int:
    return max(16, _next_pow2(head_dim))


def _block_g(group: int) -> int:
    return max(16, _next_pow2(group))


def decode_config(head_dim: int, group: int, dtype: torch.dtype) -> KernelConfig:
    """The decode kernel's launch for this head_dim, query heads per KV head and dtype."""
    cfg = DECODE_CONFIGS[(dtype != torch.float32, max(64, _block_d(head_dim)))]
    wide = _block_g(group) // 16  # more query heads per program: a narrower KV tile
    if wide > 1:
        cfg = KernelConfig(max(16, cfg.block_n // wide), 8)
    return cfg


def prefill_config(head_dim: int, dtype: torch.dtype) -> KernelConfig:
    """The prefill kernel's launch for this head_dim and dtype."""
    return PREFILL_CONFIGS[(dtype != torch.float32, max(64, _block_d(head_dim)))]


def triton_available() -> bool:
    return triton is not None


if triton is not None:

    @triton.jit
    def _dot(a, b, IEEE: tl.constexpr, UPCAST: tl.constexpr):
        # IEEE: float32 inputs stay exact (no TF32). UPCAST only under TRITON_INTERPRET with
        # bfloat16, which the interpreter multiplies as raw integer bits; the operands are
        # already rounded to bfloat16, so the products match the tensor cores'.
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if IEEE or UPCAST:
            acc = tl.dot(a, b, input_precision="ieee")
        else:
            acc = tl.dot(a, b)
        return acc

    @triton.jit
    def _decode_split_kernel(
        q_ptr, k_ptr, v_ptr, bt_ptr, ctx_ptr, o_ptr, lse_ptr,
        stride_qs, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_bts, stride_btb,
        stride_os, stride_oh, stride_osplit, stride_ls, stride_lh,
        qk_scale, num_splits, max_tokens,
        HEAD_DIM: tl.constexpr, GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr,
        BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
        DIRECT: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    ):  # fmt: skip
        # One program: one sequence, one KV head (all GROUP query heads), one split. Split j
        # takes tiles j, j + num_splits, ... so short contexts still spread over all splits.
        seq = tl.program_id(0)
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        offs_g = tl.arange(0, BLOCK_G)
        offs_d = tl.arange(0, BLOCK_D)
        offs_n = tl.arange(0, BLOCK_N)
        g_mask = offs_g < GROUP
        d_mask = offs_d < HEAD_DIM
        heads = kvh * GROUP + offs_g
        q = tl.load(
            q_ptr + seq * stride_qs + heads[:, None] * stride_qh + offs_d[None, :],
            mask=g_mask[:, None] & d_mask[None, :],
            other=0.0,
        )
        # Clamping keeps a bad length from reading past the block table row.
        ctx = tl.minimum(tl.maximum(tl.load(ctx_ptr + seq), 0), max_tokens)
        num_tiles = (ctx + BLOCK_N - 1) // BLOCK_N
        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        for tile in range(split, num_tiles, num_splits):
            pos = tile * BLOCK_N + offs_n
            n_mask = pos < ctx  # every tile visited holds at least one valid token
            blk = tl.load(bt_ptr + seq * stride_bts + (pos // BLOCK_SIZE) * stride_btb, mask=n_mask)
            slot = (blk.to(tl.int64) * BLOCK_SIZE + pos % BLOCK_SIZE)[:, None]
            kv_mask = n_mask[:, None] & d_mask[None, :]
            k = tl.load(
                k_ptr + slot * stride_kt + kvh * stride_kh + offs_d[None, :],
                mask=kv_mask,
                other=0.0,
            )
            s = _dot(q, tl.trans(k), IEEE, UPCAST) * qk_scale
            s = tl.where(n_mask[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(
                v_ptr + slot * stride_vt + kvh * stride_vh + offs_d[None, :],
                mask=kv_mask,
                other=0.0,
            )
            acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE, UPCAST)
            m_i = m_new
        l_safe = tl.where(l_i > 0, l_i, 1.0)
        o = acc / l_safe[:, None]  # an empty split (or context 0) leaves zeros
        o_offs = seq * stride_os + heads[:, None] * stride_oh + split * stride_osplit
        tl.store(
            o_ptr + o_offs + offs_d[None, :],
            o.to(o_ptr.dtype.element_ty),
            mask=g_mask[:, None] & d_mask[None, :],
        )
        if not DIRECT:
            lse = tl.where(l_i > 0, m_i + tl.log2(l_safe), float("-inf"))
            tl.store(lse_ptr + seq * stride_ls + heads * stride_lh + split, lse, mask=g_mask)

    @triton.jit
    def _decode_reduce_kernel(
        o_part_ptr, lse_ptr, out_ptr,
        stride_ps, stride_ph, stride_psplit, stride_ls, stride_lh, stride_os, stride_oh,
        num_splits,
        HEAD_DIM: tl.constexpr, BLOCK_SPLITS: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        # Combine the splits of one (sequence, head) by log-sum-exp (base 2).
        seq = tl.program_id(0)
        head = tl.program_id(1)
        offs_sp = tl.arange(0, BLOCK_SPLITS)
        offs_d = tl.arange(0, BLOCK_D)
        sp_mask = offs_sp < num_splits
        d_mask = offs_d < HEAD_DIM
        lse = tl.load(
            lse_ptr + seq * stride_ls + head * stride_lh + offs_sp,
            mask=sp_mask,
            other=float("-inf"),
        )
        m = tl.max(lse, 0)
        m = tl.where(m == float("-inf"), 0.0, m)  # all splits empty: context 0, output zeros
        w = tl.exp2(lse - m)
        denom = tl.sum(w, 0)
        denom = tl.where(denom > 0, denom, 1.0)
        o = tl.load(
            o_part_ptr + seq * stride_ps + head * stride_ph + offs_sp[:, None] * stride_psplit
            + offs_d[None, :],
            mask=sp_mask[:, None] & d_mask[None, :],
            other=0.0,
        )  # fmt: skip
        res = tl.sum(o * w[:, None], 0) / denom
        out = out_ptr + seq * stride_os + head * stride_oh + offs_d
        tl.store(out, res.to(out_ptr.dtype.element_ty), mask=d_mask)

    @triton.jit
    def _prefill_kernel(
        q_ptr, k_ptr, v_ptr, bt_ptr, qsl_ptr, ctx_ptr, o_ptr,
        stride_qn, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_bts, stride_btb,
        stride_on, stride_oh,
        qk_scale, max_tokens,
        HEAD_DIM: tl.constexpr, GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        IEEE: tl.constexpr, UPCAST: tl.constexpr,
    ):  # fmt: skip
        # One program: BLOCK_M new tokens of one sequence, one query head; online softmax over
        # the causal KV tiles gathered through the block table.
        m_tile = tl.program_id(0)
        head = tl.program_id(1)
        seq = tl.program_id(2)
        q_start = tl.load(qsl_ptr + seq)
        q_len = tl.load(qsl_ptr + seq + 1) - q_start
        if m_tile * BLOCK_M >= q_len:
            return
        kvh = head // GROUP
        ctx = tl.minimum(tl.load(ctx_ptr + seq), max_tokens)
        offs_m = m_tile * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        m_mask = offs_m < q_len
        d_mask = offs_d < HEAD_DIM
        rows = (q_start + offs_m).to(tl.int64)[:, None]
        q = tl.load(
            q_ptr + rows * stride_qn + head * stride_qh + offs_d[None, :],
            mask=m_mask[:, None] & d_mask[None, :],
            other=0.0,
        )
        q_pos = ctx - q_len + offs_m  # the new tokens are the last q_len positions
        kv_end = tl.minimum(ctx - q_len + tl.minimum((m_tile + 1) * BLOCK_M, q_len), ctx)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for start in range(0, kv_end, BLOCK_N):
            pos = start + offs_n
            n_mask = pos < kv_end
            blk = tl.load(bt_ptr + seq * stride_bts + (pos // BLOCK_SIZE) * stride_btb, mask=n_mask)
            slot = (blk.to(tl.int64) * BLOCK_SIZE + pos % BLOCK_SIZE)[:, None]
            kv_mask = n_mask[:, None] & d_mask[None, :]
            k = tl.load(
                k_ptr + slot * stride_kt + kvh * stride_kh + offs_d[None, :],
                mask=kv_mask,
                other=0.0,
            )
            s = _dot(q, tl.trans(k), IEEE, UPCAST) * qk_scale
            keep = n_mask[None, :] & (pos[None, :] <= q_pos[:, None])
            s = tl.where(keep, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet
            alpha = tl.exp2(m_i - m_use)
            p = tl.exp2(s - m_use[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(
                v_ptr + slot * stride_vt + kvh * stride_vh + offs_d[None, :],
                mask=kv_mask,
                other=0.0,
            )
            acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE, UPCAST)
            m_i = m_new
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(
            o_ptr + rows * stride_on + head * stride_oh + offs_d[None, :],
            o.to(o_ptr.dtype.element_ty),
            mask=m_mask[:, None] & d_mask[None, :],
        )


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _check_inputs(q, k_cache, v_cache, block_tables, context_lens, block_size, scale, out) -> None:
    if triton is None:
        raise RuntimeError("paged attention needs triton: pip install triton")
    if q.dim() != 3 or k_cache.dim() != 3:
        raise ValueError(
            f"q must be [tokens, heads, head_dim] and k_cache [slots, kv_heads, head_dim], "
            f"got {tuple(q.shape)} and {tuple(k_cache.shape)}"
        )
    if v_cache.shape != k_cache.shape:
        raise ValueError(
            f"v_cache {tuple(v_cache.shape)} must match k_cache {tuple(k_cache.shape)}"
        )
    if q.dtype not in DTYPES or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(
            f"q, k_cache and v_cache must share one dtype of float32/bfloat16/float16, "
            f"got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}"
        )
    heads, head_dim = q.shape[1], q.shape[2]
    kv_heads = k_cache.shape[1]
    if k_cache.shape[2] != head_dim:
        raise ValueError(f"q head_dim {head_dim} != cache head_dim {k_cache.shape[2]}")
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be in 1..{MAX_HEAD_DIM}, got {head_dim}")
    if kv_heads == 0 or heads % kv_heads != 0:
        raise ValueError(f"num_heads {heads} must be a multiple of num_kv_heads {kv_heads}")
    if not isinstance(block_size, int) or block_size < 1 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two, got {block_size!r}")
    if k_cache.shape[0] % block_size != 0:
        raise ValueError(f"cache slots {k_cache.shape[0]} are not a multiple of {block_size}")
    if not isinstance(scale, (int, float)):
        raise ValueError(f"scale must be a Python float, got {type(scale).__name__}")
    if block_tables.dtype != torch.int32 or block_tables.dim() != 2:
        raise ValueError(
            f"block_tables must be int32 [seqs, max_blocks], "
            f"got {block_tables.dtype} {tuple(block_tables.shape)}"
        )
    seqs = block_tables.shape[0]
    if context_lens.dtype != torch.int32 or tuple(context_lens.shape) != (seqs,):
        raise ValueError(
            f"context_lens must be int32 [{seqs}], "
            f"got {context_lens.dtype} {tuple(context_lens.shape)}"
        )
    tensors = [q, k_cache, v_cache, block_tables, context_lens] + ([out] if out is not None else [])
    if any(t.device != q.device for t in tensors):
        raise ValueError("all paged attention tensors must be on one device")
    if q.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("paged attention needs CUDA tensors (or TRITON_INTERPRET=1 on CPU)")
    if any(t.stride(-1) != 1 for t in (q, k_cache, v_cache)):
        raise ValueError("q, k_cache and v_cache need a contiguous last (head_dim) dimension")
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1):
        raise ValueError(
            f"out must be {q.dtype} {tuple(q.shape)} with a contiguous last dimension, "
            f"got {out.dtype} {tuple(out.shape)}"
        )


def default_num_splits(
    num_seqs: int, num_kv_heads: int, max_blocks: int, block_size: int, sm_count: int
) -> int:
    """Splits per (sequence, kv head) for decode, from shapes only (stable under graph capture).

    Aims at about four programs per SM so one sequence still fills the GPU; never more splits
    than KV tiles a full block-table row can hold, at most 64.
    """
    tiles = -(-max_blocks * block_size // DECODE_TILE)
    want = -(-4 * sm_count // max(1, num_seqs * num_kv_heads))
    return max(1, min(want, tiles, 64))


def _dot_flags(q: torch.Tensor) -> dict[str, bool]:
    upcast = q.dtype == torch.bfloat16 and q.device.type != "cuda"  # see _dot
    return {"IEEE": q.dtype == torch.float32, "UPCAST": upcast}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1  # the interpreter: fewer programs run faster
    return torch.cuda.get_device_properties(device).multi_processor_count


def paged_attention_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    block_size: int,
    scale: float,
    out: torch.Tensor | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """One new token per sequence: q [S, H, D] attends to its first context_lens[s] positions.

    Rows with context length 0 give zeros. Split-K (flash-decoding): programs over
    (sequence, kv head, split), then a log-sum-exp combine when num_splits > 1.
    """
    _check_inputs(q, k_cache, v_cache, block_tables, context_lens, block_size, scale, out)
    seqs, heads, head_dim = q.shape
    kv_heads = k_cache.shape[1]
    if q.shape[0] != block_tables.shape[0]:
        raise ValueError(f"q has {seqs} rows but block_tables has {block_tables.shape[0]}")
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    max_blocks = block_tables.shape[1]
    if num_splits is None:
        num_splits = default_num_splits(seqs, kv_heads, max_blocks, block_size, _sm_count(q.device))
    if not isinstance(num_splits, int) or num_splits < 1:
        raise ValueError(f"num_splits must be a positive int, got {num_splits!r}")
    if seqs == 0:
        return out
    group = heads // kv_heads
    block_d = _block_d(head_dim)
    cfg = decode_config(head_dim, group, q.dtype)
    direct = num_splits == 1
    if direct:
        o_part, lse = out, out  # lse is unused when writing straight to out
        o_strides = (out.stride(0), out.stride(1), 0)
        lse_strides = (0, 0)
    else:
        o_part = torch.empty(seqs, heads, num_splits, head_dim, device=q.device)
        lse = torch.empty(seqs, heads, num_splits, device=q.device)
        o_strides = o_part.stride()[:3]
        lse_strides = lse.stride()[:2]
    _decode_split_kernel[(seqs, kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, o_part, lse,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1),
        v_cache.stride(0), v_cache.stride(1), block_tables.stride(0), block_tables.stride(1),
        *o_strides, *lse_strides,
        float(scale) * LOG2E, num_splits, max_blocks * block_size,
        HEAD_DIM=head_dim, GROUP=group, BLOCK_SIZE=block_size,
        BLOCK_G=_block_g(group), BLOCK_D=block_d, BLOCK_N=cfg.block_n, DIRECT=direct,
        **_dot_flags(q), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    if not direct:
        _decode_reduce_kernel[(seqs, heads)](
            o_part, lse, out,
            *o_part.stride()[:3], *lse.stride()[:2], out.stride(0), out.stride(1),
            num_splits,
            HEAD_DIM=head_dim, BLOCK_SPLITS=_next_pow2(num_splits), BLOCK_D=block_d,
            num_warps=4,
        )  # fmt: skip
    return out


def paged_attention_prefill(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    context_lens: torch.Tensor,
    max_query_len: int,
    block_size: int,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Varlen causal attention for packed new tokens q [N, H, D] (chunked prefill, mixed steps).

    Sequence s owns q rows query_start_loc[s]:query_start_loc[s+1]; they are the last q_len of
    its context_lens[s] positions, and new token i sees positions <= context_lens[s] - q_len + i.
    max_query_len must be >= every q_len (a Python int: prefill runs eagerly).
    """
    _check_inputs(q, k_cache, v_cache, block_tables, context_lens, block_size, scale, out)
    seqs = block_tables.shape[0]
    if query_start_loc.dtype != torch.int32 or tuple(query_start_loc.shape) != (seqs + 1,):
        raise ValueError(
            f"query_start_loc must be int32 [{seqs + 1}], "
            f"got {query_start_loc.dtype} {tuple(query_start_loc.shape)}"
        )
    if query_start_loc.device != q.device:
        raise ValueError("all paged attention tensors must be on one device")
    if not isinstance(max_query_len, int) or max_query_len < 0:
        raise ValueError(f"max_query_len must be a non-negative int, got {max_query_len!r}")
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    tokens, heads, head_dim = q.shape
    if tokens == 0 or seqs == 0 or max_query_len == 0:
        return out
    cfg = prefill_config(head_dim, q.dtype)
    grid = (triton.cdiv(max_query_len, cfg.block_m), heads, seqs)
    _prefill_kernel[grid](
        q, k_cache, v_cache, block_tables, query_start_loc, context_lens, out,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1),
        v_cache.stride(0), v_cache.stride(1), block_tables.stride(0), block_tables.stride(1),
        out.stride(0), out.stride(1),
        float(scale) * LOG2E, block_tables.shape[1] * block_size,
        HEAD_DIM=head_dim, GROUP=heads // k_cache.shape[1], BLOCK_SIZE=block_size,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=_block_d(head_dim), **_dot_flags(q),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return out


def bench_decode(
    seqs: int = 1,
    context: int = 1024,
    heads: int = 20,
    kv_heads: int = 4,
    head_dim: int = 128,
    layers: int = 36,
    block_size: int = 16,
    dtype: torch.dtype = torch.bfloat16,
    replays: int = 20,
) -> float:
    """Microseconds per decode call on CUDA: one call per layer (each with its own cache, so L2
    does not flatter it), all captured in one CUDA graph and replayed."""
    if not torch.cuda.is_available():
        raise RuntimeError("bench_decode needs CUDA")
    dev = torch.device("cuda")
    blocks = -(-context // block_size)
    shape = (seqs * blocks * block_size, kv_heads, head_dim)
    caches = [
        (torch.randn(shape, device=dev, dtype=dtype), torch.randn(shape, device=dev, dtype=dtype))
        for _ in range(layers)
    ]
    tables = torch.randperm(seqs * blocks, device=dev, dtype=torch.int32).view(seqs, blocks)
    ctx = torch.full((seqs,), context, dtype=torch.int32, device=dev)
    q = torch.randn(seqs, heads, head_dim, device=dev, dtype=dtype)
    out = torch.empty_like(q)
    paged_attention_decode(q, *caches[0], tables, ctx, block_size, head_dim**-0.5, out=out)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for k, v in caches:
            paged_attention_decode(q, k, v, tables, ctx, block_size, head_dim**-0.5, out=out)
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1000.0 / (replays * layers)
