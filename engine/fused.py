"""Fused elementwise kernels for the device path: RMSNorm, RoPE on q and k, SiLU * up, and
the cache writes (rows scattered to slots; a negative slot is skipped, which is how the
padding rows of a CUDA-graph bucket write nothing).

A decode step at small batch is bound by kernel count, not FLOPs: the plain modules launch
about 30 kernels per layer (RoPE alone is a dozen: slices, a cat, products, a cast). On the
Triton path the engine rewires the model in place with :func:`fuse_model`:

- RMSNorm of the backbone (not Engram's norms): one kernel, fp32 math;
- q, k and v from one GEMM over a merged weight, then RoPE on q and k in one kernel;
- gate and up from one GEMM over a merged weight, then SiLU(gate) * up in one kernel.

The merged weights are the old parameters' storage (the per-projection parameters become
views into it), so memory does not grow and checkpoints keep their names. Numerics differ
from the plain modules only by rounding (one fp32 pass instead of per-op bf16 rounding). The
CPU tests run these kernels in Triton's interpreter against the plain modules.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.llama import MLP, Attention, EngramForCausalLM

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None


if triton is not None:

    @triton.jit
    def _rms_norm_kernel(x_ptr, w_ptr, y_ptr, n, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + row * n + offs, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        inv = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n + eps)
        tl.store(y_ptr + row * n + offs, (x * inv * w).to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _rope_kernel(
        src_ptr, dst_ptr, cos_ptr, sin_ptr, heads, src_row, src_off, head_dim,
        HALF: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        # one program: one token, one head of q or k (read from the fused qkv row)
        tok = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1)
        offs = tl.arange(0, BLOCK)
        mask = offs < HALF
        src = src_ptr + tok * src_row + src_off + h * head_dim
        x1 = tl.load(src + offs, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF + offs, mask=mask, other=0.0).to(tl.float32)
        c1 = tl.load(cos_ptr + tok * head_dim + offs, mask=mask, other=0.0)
        c2 = tl.load(cos_ptr + tok * head_dim + HALF + offs, mask=mask, other=0.0)
        s1 = tl.load(sin_ptr + tok * head_dim + offs, mask=mask, other=0.0)
        s2 = tl.load(sin_ptr + tok * head_dim + HALF + offs, mask=mask, other=0.0)
        dst = dst_ptr + (tok * heads + h) * head_dim
        ty = dst_ptr.dtype.element_ty
        tl.store(dst + offs, (x1 * c1 - x2 * s1).to(ty), mask=mask)
        tl.store(dst + HALF + offs, (x2 * c2 + x1 * s2).to(ty), mask=mask)

    @triton.jit
    def _silu_mul_kernel(gu_ptr, out_ptr, f, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < f
        g = tl.load(gu_ptr + row * 2 * f + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(gu_ptr + row * 2 * f + f + offs, mask=mask, other=0.0).to(tl.float32)
        y = g / (1.0 + tl.exp(-g)) * u
        tl.store(out_ptr + row * f + offs, y.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _store_rows_kernel(dst_ptr, idx_ptr, src_ptr, width, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        slot = tl.load(idx_ptr + row).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < tl.where(slot >= 0, width, 0)  # a negative slot stores nothing
        x = tl.load(src_ptr + row.to(tl.int64) * width + offs, mask=mask, other=0.0)
        tl.store(dst_ptr + slot * width + offs, x.to(dst_ptr.dtype.element_ty), mask=mask)


def triton_available() -> bool:
    return triton is not None


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim, fp32 math, output in x's dtype."""
    n = x.shape[-1]
    flat = x.reshape(-1, n).contiguous()
    y = torch.empty_like(flat)
    if flat.shape[0]:
        _rms_norm_kernel[(flat.shape[0],)](flat, weight, y, n, eps, BLOCK=_pow2(n))
    return y.view(x.shape)


def rope_qk(
    qkv: torch.Tensor, heads: int, kv_heads: int, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE (rotate-half) on the q and k parts of a fused ``[N, (H + 2 KV) * D]`` projection;
    cos/sin ``[N, D]`` float32. Returns q ``[N, H, D]`` and k ``[N, KV, D]``."""
    n, width = qkv.shape
    d = cos.shape[-1]
    q = torch.empty((n, heads, d), dtype=qkv.dtype, device=qkv.device)
    k = torch.empty((n, kv_heads, d), dtype=qkv.dtype, device=qkv.device)
    if n:
        cos, sin = cos.contiguous(), sin.contiguous()
        half = d // 2
        for dst, count, off in ((q, heads, 0), (k, kv_heads, heads * d)):
            _rope_kernel[(n, count)](
                qkv, dst, cos, sin, count, width, off, d, HALF=half, BLOCK=_pow2(half)
            )
    return q, k


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up for ``[..., 2F]`` (gate first), fp32 math."""
    f = gate_up.shape[-1] // 2
    flat = gate_up.reshape(-1, 2 * f).contiguous()
    out = torch.empty((flat.shape[0], f), dtype=gate_up.dtype, device=gate_up.device)
    if flat.shape[0]:
        block = min(1024, _pow2(f))
        _silu_mul_kernel[(flat.shape[0], triton.cdiv(f, block))](flat, out, f, BLOCK=block)
    return out.view(*gate_up.shape[:-1], f)


def store_rows(dst: torch.Tensor, slots: torch.Tensor, src: torch.Tensor) -> None:
    """``dst[slots[i]] = src[i]`` over the first dim, skipping negative slots; ``dst`` must be
    contiguous (a KV cache layer, the conv state)."""
    n = src.shape[0]
    width = dst[0].numel() if dst.shape[0] else 0
    if n == 0 or width == 0:
        return
    src = src.reshape(n, width).contiguous()
    block = min(1024, _pow2(width))
    _store_rows_kernel[(n, triton.cdiv(width, block))](dst, slots, src, width, BLOCK=block)


# --- the model, rewired in place -------------------------------------------------------------
class FusedRMSNorm(nn.RMSNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
        return rms_norm(x, self.weight, eps)


class FusedAttention(Attention):
    qkv_weight: torch.Tensor

    def _qkv(self, x, cos, sin):
        if x.dim() != 2:  # whole sequences (forward_full): the plain path
            return super()._qkv(x, cos, sin)
        qkv = F.linear(x, self.qkv_weight)
        q, k = rope_qk(qkv, self.n_heads, self.n_kv, cos, sin)
        v = qkv[:, (self.n_heads + self.n_kv) * self.hd :].view(-1, self.n_kv, self.hd)
        return q, k, v


class FusedMLP(MLP):
    gate_up_weight: torch.Tensor

    def forward(self, x):
        return self.down_proj(silu_mul(F.linear(x, self.gate_up_weight)))


def _merge(module: nn.Module, names: list[str]) -> torch.Tensor:
    """One weight over the named linears' rows; each linear's weight becomes a view of it."""
    linears = [getattr(module, n) for n in names]
    merged = torch.cat([lin.weight.detach() for lin in linears], dim=0)
    row = 0
    for lin in linears:
        rows = lin.weight.shape[0]
        lin.weight = nn.Parameter(merged[row : row + rows], requires_grad=False)
        row += rows
    return merged


def fuse_model(model: EngramForCausalLM) -> EngramForCausalLM:
    """Rewire the backbone's norms, attention projections and MLPs to the fused kernels, in
    place (idempotent). Engram modules keep their plain ops, and so does attention with q/k/v
    biases (Qwen2) or q/k norms (Qwen3), whose extra steps sit between the projection and RoPE."""
    if triton is None:
        raise RuntimeError("fused kernels need Triton (it ships with CUDA builds of torch)")
    norms = [model.model.norm]
    for layer in model.model.layers:
        norms += [layer.input_layernorm, layer.post_attention_layernorm]
        attn, mlp = layer.self_attn, layer.mlp
        plain_attn = model.config.attention_bias or model.config.qk_norm
        if not plain_attn and not isinstance(attn, FusedAttention):
            attn.qkv_weight = _merge(attn, ["q_proj", "k_proj", "v_proj"])
            attn.__class__ = FusedAttention
        if not isinstance(mlp, FusedMLP):
            mlp.gate_up_weight = _merge(mlp, ["gate_proj", "up_proj"])
            mlp.__class__ = FusedMLP
    for norm in norms:
        norm.__class__ = FusedRMSNorm
    return model
