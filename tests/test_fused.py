"""The fused kernels (Triton's interpreter on CPU) against the plain modules they replace."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine import fused
from engine.kv_cache import KVCache
from engine.model_runner import ModelRunner
from models.llama import apply_rope

from .conftest import DEV, compile_for_h100, new_seq, tiny_model

pytestmark = pytest.mark.skipif(not fused.triton_available(), reason="needs triton")
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("n", [16, 40, 96])
def test_rms_norm_matches_torch(dtype, n):
    x = torch.randn(7, n).to(DEV, dtype)
    w = torch.randn(n).to(DEV, dtype)
    ref = F.rms_norm(x.float(), (n,), w.float(), 1e-5).to(dtype)
    torch.testing.assert_close(fused.rms_norm(x, w, 1e-5), ref, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", list(TOL))
def test_rope_on_a_fused_projection_matches_apply_rope(dtype):
    n, heads, kv, d = 5, 4, 2, 16
    qkv = torch.randn(n, (heads + 2 * kv) * d).to(DEV, dtype)
    pos = torch.tensor([0, 3, 7, 1, 100])
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    freqs = torch.outer(pos.double(), inv)
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = emb.cos().float().to(DEV), emb.sin().float().to(DEV)
    q, k = fused.rope_qk(qkv, heads, kv, cos, sin)
    ref_q = apply_rope(qkv[:, : heads * d].view(n, heads, d), cos, sin)
    ref_k = apply_rope(qkv[:, heads * d : (heads + kv) * d].view(n, kv, d), cos, sin)
    torch.testing.assert_close(q, ref_q, atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(k, ref_k, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", list(TOL))
def test_silu_mul_matches_torch(dtype):
    gu = (3 * torch.randn(6, 2 * 50)).to(DEV, dtype)
    ref = (F.silu(gu[:, :50].float()) * gu[:, 50:].float()).to(dtype)
    torch.testing.assert_close(fused.silu_mul(gu), ref, atol=TOL[dtype], rtol=TOL[dtype])


def test_fused_model_keeps_weights_and_outputs():
    plain = tiny_model(4).to(DEV)
    model = fused.fuse_model(copy.deepcopy(plain))
    fused.fuse_model(model)  # idempotent
    assert model.state_dict().keys() == plain.state_dict().keys()
    for k, v in plain.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.weight.data_ptr() == attn.qkv_weight.data_ptr()  # a view, no copy
    rng = np.random.default_rng(1)
    ids = [rng.integers(0, 300, size=n).tolist() for n in (9, 1, 17)]
    outs = []
    for m in (plain, model):
        cache = KVCache(m.config, 32, 4, 3, device=DEV)
        runner = ModelRunner(m, cache, attention="reference")
        seqs = [new_seq(cache) for _ in ids]
        a = runner.step(seqs, ids, all_logits=True)
        b = runner.step(seqs, [[1], [2], [3]])
        outs.append(torch.cat([a, b]))
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # whole-sequence forward still works on the fused model
        x = torch.tensor([ids[0]], device=DEV)
        torch.testing.assert_close(model.forward_full(x), plain.forward_full(x))


def test_store_rows_writes_valid_slots_and_skips_negative_ones():
    dst = torch.zeros(10, 3, 4, device=DEV)
    src = torch.randn(4, 3, 4, device=DEV)
    fused.store_rows(dst, torch.tensor([7, -1, 0, 3], device=DEV), src)
    assert torch.equal(dst[7], src[0]) and torch.equal(dst[0], src[2])
    assert torch.equal(dst[3], src[3])
    others = [i for i in range(10) if i not in (0, 3, 7)]
    assert not dst[others].any()  # the skipped row went nowhere


COMPILE = """
import sys
try:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError:
    sys.exit(3)
from engine import fused as f

def build(fn, sig, consts):
    src = ASTSource(fn, signature=sig, constexprs=consts)
    triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})

for t in ("bf16", "fp16", "fp32"):
    p = "*" + t
    build(f._rms_norm_kernel, {"x_ptr": p, "w_ptr": p, "y_ptr": p, "n": "i32", "eps": "fp32",
          "BLOCK": "constexpr"}, {"BLOCK": 4096})
    build(f._rope_kernel, {"src_ptr": p, "dst_ptr": p, "cos_ptr": "*fp32", "sin_ptr": "*fp32",
          "heads": "i32", "src_row": "i32", "src_off": "i32", "head_dim": "i32",
          "HALF": "constexpr", "BLOCK": "constexpr"}, {"HALF": 64, "BLOCK": 64})
    build(f._silu_mul_kernel, {"gu_ptr": p, "out_ptr": p, "f": "i32", "BLOCK": "constexpr"},
          {"BLOCK": 1024})
    build(f._store_rows_kernel, {"dst_ptr": p, "idx_ptr": "*i64", "src_ptr": p, "width": "i32",
          "BLOCK": "constexpr"}, {"BLOCK": 512})
print("ok")
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests compile and run the kernels")
def test_kernels_compile_for_an_h100(tmp_path):
    """The interpreter is lenient: Triton's real compiler must accept the kernels for sm_90."""
    compile_for_h100(COMPILE, tmp_path)
