"""Paged attention kernels against a plain torch reference (interpreter on CPU, real on CUDA)."""

import importlib.util
import sys

import pytest
import torch

pytest.importorskip("triton")

from engine import paged_attention as pa
from engine.paged_attention import (
    default_num_splits,
    paged_attention_decode,
    paged_attention_prefill,
    triton_available,
)

from .conftest import DEV, compile_for_h100

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 3e-2}


def make_case(ctx_lens, heads, kv_heads, head_dim, block_size=16, dtype=torch.float32, seed=0):
    """A cache with shuffled blocks: each sequence owns enough of them for its context."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-c // block_size) for c in ctx_lens]
    max_blocks = max(max(blocks_per_seq), 1) + 1  # one padded entry at least
    num_blocks = sum(blocks_per_seq) + 3  # spare blocks nobody owns
    order = torch.randperm(num_blocks, generator=gen).tolist()
    tables = torch.zeros(len(ctx_lens), max_blocks, dtype=torch.int32)
    for s, n in enumerate(blocks_per_seq):
        tables[s, :n] = torch.tensor(order[:n], dtype=torch.int32)
        order = order[n:]
    shape = (num_blocks * block_size, kv_heads, head_dim)
    k = torch.randn(shape, generator=gen).to(dtype)
    v = torch.randn(shape, generator=gen).to(dtype)
    ctx = torch.tensor(ctx_lens, dtype=torch.int32)
    return k.to(DEV), v.to(DEV), tables.to(DEV), ctx.to(DEV)


def reference(q, k, v, tables, qsl, ctx, block_size, scale, acc=torch.float64):
    """Gather each context through its block table, then causal softmax in `acc`."""
    q, k, v, tables = q.to(acc), k.to(acc), v.to(acc), tables.long()
    qsl, ctx = qsl.tolist(), ctx.tolist()
    group = q.shape[1] // k.shape[1]
    out = torch.zeros_like(q)
    for s in range(len(ctx)):
        a, b, n = qsl[s], qsl[s + 1], ctx[s]
        if b == a or n == 0:
            continue
        pos = torch.arange(n, device=q.device)
        slots = tables[s, pos // block_size] * block_size + pos % block_size
        ks = k[slots].repeat_interleave(group, 1)
        vs = v[slots].repeat_interleave(group, 1)
        scores = torch.einsum("qhd,khd->hqk", q[a:b], ks) * scale
        q_pos = torch.arange(n - (b - a), n, device=q.device)
        scores = scores.masked_fill(pos[None, None, :] > q_pos[None, :, None], float("-inf"))
        out[a:b] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), vs)
    return out


def decode_reference(q, k, v, tables, ctx, block_size, scale):
    qsl = torch.arange(q.shape[0] + 1)
    return reference(q.cpu(), k.cpu(), v.cpu(), tables.cpu(), qsl, ctx.cpu(), block_size, scale)


def close(got, want, dtype):
    err = (got.double().cpu() - want.double().cpu()).abs().max().item()
    assert err <= TOL[dtype], f"max abs error {err} > {TOL[dtype]}"
    return err


CTX = [1, 15, 16, 17, 33, 100, 0]


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 2, 32), (8, 1, 16), (2, 2, 80)])
def test_decode_matches_reference_fp32(heads, kv_heads, head_dim):
    k, v, tables, ctx = make_case(CTX, heads, kv_heads, head_dim)
    q = torch.randn(len(CTX), heads, head_dim).to(DEV)
    scale = head_dim**-0.5
    want = decode_reference(q, k, v, tables, ctx, 16, scale)
    for splits in (1, 3):
        got = paged_attention_decode(q, k, v, tables, ctx, 16, scale, num_splits=splits)
        close(got, want, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_half_precision(dtype):
    k, v, tables, ctx = make_case(CTX, 4, 2, 32, dtype=dtype, seed=1)
    q = torch.randn(len(CTX), 4, 32).to(dtype).to(DEV)
    want = decode_reference(q, k, v, tables, ctx, 16, 32**-0.5)  # from the rounded inputs
    got = paged_attention_decode(q, k, v, tables, ctx, 16, 32**-0.5, num_splits=2)
    assert got.dtype == dtype
    close(got, want, dtype)


def test_decode_splits_agree_and_empty_splits_are_harmless():
    # 100 tokens are at most four KV tiles: with 5 splits, one or more of them see nothing
    k, v, tables, ctx = make_case([100, 17, 64, 65], 4, 2, 16, seed=2)
    q = torch.randn(4, 4, 16).to(DEV)
    outs = [paged_attention_decode(q, k, v, tables, ctx, 16, 0.3, num_splits=n) for n in (1, 2, 5)]
    for o in outs[1:]:
        assert (o - outs[0]).abs().max().item() < 1e-6
    close(outs[0], decode_reference(q, k, v, tables, ctx, 16, 0.3), torch.float32)


@pytest.mark.parametrize("block_size", [8, 32, 64])
def test_decode_block_sizes(block_size):
    lens = [1, block_size - 1, block_size, block_size + 1, 3 * block_size + 5]
    k, v, tables, ctx = make_case(lens, 4, 2, 16, block_size=block_size, seed=3)
    q = torch.randn(len(lens), 4, 16).to(DEV)
    got = paged_attention_decode(q, k, v, tables, ctx, block_size, 0.25, num_splits=2)
    close(got, decode_reference(q, k, v, tables, ctx, block_size, 0.25), torch.float32)


def test_decode_padding_rows_are_zero_and_out_is_written_in_place():
    k, v, tables, ctx = make_case([0, 20, 0], 4, 2, 16, seed=4)
    q = (torch.randn(3, 4, 16) * 1e4).to(DEV)  # padding rows may hold anything
    for splits in (1, 3):
        out = torch.full((3, 4, 16), float("nan"), device=DEV)
        got = paged_attention_decode(q, k, v, tables, ctx, 16, 0.25, out=out, num_splits=splits)
        assert got is out
        assert torch.isfinite(out).all()
        assert torch.equal(out[0], torch.zeros_like(out[0]))
        assert torch.equal(out[2], torch.zeros_like(out[2]))


def test_decode_reads_strided_q_from_a_fused_projection():
    heads, kv_heads, d = 4, 2, 16
    k, v, tables, ctx = make_case([5, 40], heads, kv_heads, d, seed=5)
    qkv = torch.randn(2, (heads + 2 * kv_heads) * d).to(DEV)
    q = qkv[:, : heads * d].view(2, heads, d)  # row stride is not heads * d
    got = paged_attention_decode(q, k, v, tables, ctx, 16, 0.25)
    close(got, decode_reference(q, k, v, tables, ctx, 16, 0.25), torch.float32)


def prefill_case(prefixes, q_lens, heads, kv_heads, head_dim, dtype=torch.float32, seed=0):
    ctx_lens = [p + n for p, n in zip(prefixes, q_lens)]
    k, v, tables, ctx = make_case(ctx_lens, heads, kv_heads, head_dim, dtype=dtype, seed=seed)
    qsl = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0).to(torch.int32)
    gen = torch.Generator().manual_seed(seed + 100)
    q = torch.randn(sum(q_lens), heads, head_dim, generator=gen).to(dtype).to(DEV)
    return q, k, v, tables, qsl.to(DEV), ctx


def run_prefill(q, k, v, tables, qsl, ctx, scale, dtype):
    max_q = int((qsl[1:] - qsl[:-1]).max())
    got = paged_attention_prefill(q, k, v, tables, qsl, ctx, max_q, 16, scale)
    want = reference(q.cpu(), k.cpu(), v.cpu(), tables.cpu(), qsl.cpu(), ctx.cpu(), 16, scale)
    assert got.dtype == q.dtype
    return close(got, want, dtype)


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 2, 32), (4, 1, 16)])
def test_prefill_ragged_chunks_fp32(heads, kv_heads, head_dim):
    # fresh prompts, chunks continuing a cached prefix, single decode tokens, block boundaries
    prefixes = [0, 0, 16, 7, 30, 0, 63]
    q_lens = [1, 40, 17, 1, 35, 16, 1]
    case = prefill_case(prefixes, q_lens, heads, kv_heads, head_dim, seed=6)
    run_prefill(*case, head_dim**-0.5, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_prefill_half_precision(dtype):
    case = prefill_case([0, 20, 5], [33, 12, 1], 4, 2, 32, dtype=dtype, seed=7)
    run_prefill(*case, 32**-0.5, dtype)


def test_prefill_single_tokens_equal_decode():
    q, k, v, tables, qsl, ctx = prefill_case([0, 15, 16, 40], [1, 1, 1, 1], 4, 2, 16, seed=8)
    pre = paged_attention_prefill(q, k, v, tables, qsl, ctx, 1, 16, 0.25)
    dec = paged_attention_decode(q, k, v, tables, ctx, 16, 0.25, num_splits=2)
    assert (pre - dec).abs().max().item() < 1e-6


def test_prefill_skips_empty_sequences_and_writes_out():
    q, k, v, tables, qsl, ctx = prefill_case([3, 4, 0], [5, 0, 2], 2, 1, 16, seed=9)
    out = torch.full_like(q, float("nan"))
    got = paged_attention_prefill(q, k, v, tables, qsl, ctx, 8, 16, 0.25, out=out)
    assert got is out and torch.isfinite(out).all()
    want = reference(q.cpu(), k.cpu(), v.cpu(), tables.cpu(), qsl.cpu(), ctx.cpu(), 16, 0.25)
    close(out, want, torch.float32)


def _decode_args():
    k, v, tables, ctx = make_case([5, 9], 4, 2, 16)
    return dict(
        q=torch.randn(2, 4, 16).to(DEV),
        k_cache=k,
        v_cache=v,
        block_tables=tables,
        context_lens=ctx,
        block_size=16,
        scale=0.25,
    )


def _t(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEV).to(dtype)


BAD = {
    "q 2-d": lambda: dict(q=_t(2, 64)),
    "q dtype": lambda: dict(q=_t(2, 4, 16, dtype=torch.float64)),
    "cache dtype": lambda: dict(k_cache=_t(64, 2, 16, dtype=torch.float16)),
    "head_dim": lambda: dict(q=_t(2, 4, 32)),
    "gqa": lambda: dict(q=_t(2, 3, 16)),
    "v shape": lambda: dict(v_cache=_t(64, 1, 16)),
    "tables dtype": lambda: dict(block_tables=torch.zeros(2, 2, dtype=torch.int64, device=DEV)),
    "lens shape": lambda: dict(context_lens=torch.zeros(3, dtype=torch.int32, device=DEV)),
    "rows": lambda: dict(q=_t(3, 4, 16)),
    "block size": lambda: dict(block_size=12),
    "scale tensor": lambda: dict(scale=torch.tensor(0.25)),
    "out dtype": lambda: dict(out=_t(2, 4, 16, dtype=torch.float16)),
    "q strided": lambda: dict(q=_t(2, 4, 32)[:, :, ::2]),
    "num_splits": lambda: dict(num_splits=0),
}


@pytest.mark.parametrize("name", list(BAD))
def test_decode_refuses_bad_inputs_in_one_line(name):
    args = _decode_args() | BAD[name]()
    with pytest.raises(ValueError) as err:
        paged_attention_decode(**args)
    assert "\n" not in str(err.value)


@pytest.mark.gpu
@gpu
def test_gpu_refuses_host_tensors():
    args = {key: t.cpu() if isinstance(t, torch.Tensor) else t for key, t in _decode_args().items()}
    with pytest.raises(ValueError, match="CUDA"):
        paged_attention_decode(**args)


def test_prefill_refuses_bad_query_start_loc():
    args = _decode_args()
    args.pop("context_lens")
    ctx = torch.tensor([5, 9], dtype=torch.int32, device=DEV)
    for qsl in (torch.tensor([0, 1], dtype=torch.int32), torch.tensor([0, 1, 2])):
        with pytest.raises(ValueError, match="query_start_loc"):
            paged_attention_prefill(
                query_start_loc=qsl.to(DEV), context_lens=ctx, max_query_len=1, **args
            )


def test_default_splits_fill_the_gpu_from_shapes_only():
    assert default_num_splits(1, 4, 64, 16, 132) == 16  # 1024 tokens: one 64-token tile each
    assert default_num_splits(1, 4, 256, 16, 132) == 64  # capped
    assert default_num_splits(64, 4, 64, 16, 132) == 3
    assert default_num_splits(512, 8, 64, 16, 132) == 1
    assert default_num_splits(1, 1, 1, 16, 132) == 1


def test_module_imports_and_refuses_cleanly_without_triton(monkeypatch):
    assert triton_available()
    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` now fails
    monkeypatch.setitem(sys.modules, "triton.language", None)
    spec = importlib.util.spec_from_file_location("pa_no_triton", pa.__file__)
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "pa_no_triton", mod)  # dataclasses look the module up
    spec.loader.exec_module(mod)
    assert not mod.triton_available()
    with pytest.raises(RuntimeError, match="triton"):
        mod.paged_attention_decode(**_decode_args())


# --- CUDA, realistic sizes --------------------------------------------------------------


def realistic_decode(seqs, max_ctx, seed=0):
    gen = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, max_ctx + 1, (seqs,), generator=gen).tolist()
    lens[0] = max_ctx
    k, v, tables, ctx = make_case(lens, 20, 4, 128, dtype=torch.bfloat16, seed=seed)
    q = torch.randn(seqs, 20, 128, generator=gen).to(torch.bfloat16).to(DEV)
    return q, k, v, tables, ctx


def gpu_reference(q, k, v, tables, qsl, ctx, block_size, scale):
    return reference(q, k, v, tables, qsl, ctx, block_size, scale, acc=torch.float32)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("seqs", [1, 7, 64])
def test_gpu_decode_bf16_realistic(seqs):
    q, k, v, tables, ctx = realistic_decode(seqs, 1024, seed=seqs)
    qsl = torch.arange(seqs + 1, device=DEV)
    want = gpu_reference(q, k, v, tables, qsl, ctx, 16, 128**-0.5)
    for splits in (None, 1, 7):
        got = paged_attention_decode(q, k, v, tables, ctx, 16, 128**-0.5, num_splits=splits)
        close(got, want, torch.bfloat16)


@pytest.mark.gpu
@gpu
def test_gpu_prefill_bf16_realistic():
    prefixes, q_lens = [0, 300, 1000, 17, 0], [512, 200, 1, 1, 129]
    q, k, v, tables, qsl, ctx = prefill_case(prefixes, q_lens, 20, 4, 128, torch.bfloat16)
    got = paged_attention_prefill(q, k, v, tables, qsl, ctx, 512, 16, 128**-0.5)
    close(got, gpu_reference(q, k, v, tables, qsl, ctx, 16, 128**-0.5), torch.bfloat16)


@pytest.mark.gpu
@gpu
def test_gpu_decode_graph_replay_follows_inputs_changed_in_place():
    q, k, v, tables, ctx = realistic_decode(8, 1024, seed=3)
    out = torch.empty_like(q)
    args = (q, k, v, tables, ctx, 16, 128**-0.5)
    paged_attention_decode(*args, out=out)  # compile before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        paged_attention_decode(*args, out=out)
    q.copy_(torch.randn_like(q))
    ctx.copy_(torch.tensor([1, 0, 1024, 17, 64, 65, 500, 999], dtype=torch.int32))
    graph.replay()
    torch.cuda.synchronize()
    eager = paged_attention_decode(*args)
    assert torch.equal(out, eager)
    assert torch.equal(out[1], torch.zeros_like(out[1]))


@pytest.mark.gpu
@gpu
def test_gpu_decode_never_syncs_the_host():
    q, k, v, tables, ctx = realistic_decode(4, 256, seed=4)
    paged_attention_decode(q, k, v, tables, ctx, 16, 128**-0.5)  # compile outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        paged_attention_decode(q, k, v, tables, ctx, 16, 128**-0.5)
        paged_attention_decode(q, k, v, tables, ctx, 16, 128**-0.5, num_splits=1)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
@gpu
def test_gpu_bench_decode_runs():
    us = pa.bench_decode(layers=2, replays=2)  # a smoke test: speed lives in benchmarks
    assert 0.0 < us < 1e6


def test_bench_decode_needs_cuda():
    if torch.cuda.is_available():
        pytest.skip("CUDA is present")
    with pytest.raises(RuntimeError, match="CUDA"):
        pa.bench_decode()


# --- compiled for an H100 without one: no register spills ------------------------------------
SPILL_SCRIPT = """
import contextlib, io, os, re, sys
os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"  # Triton prints ptxas -v: registers and spills
try:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError:
    sys.exit(3)
import torch
from engine import paged_attention as pa

NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}

def spills(fn, ptr_types, consts, cfg):
    sig = {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = ptr_types[name]
        else:
            sig[name] = "fp32" if name == "qk_scale" else "i32"
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
             if n.endswith("_ptr")}
    src = ASTSource(fn, signature=sig, constexprs=consts, attrs=attrs)
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        triton.compile(src, target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    found = re.findall(r"(\\d+) bytes spill stores, (\\d+) bytes spill loads", log.getvalue())
    if not found:
        sys.exit(4)  # this Triton does not show ptxas's log
    return sum(int(a) + int(b) for a, b in found)

bad = []
for dtype in (torch.bfloat16, torch.float16, torch.float32):
    t = NAMES[dtype]
    for head_dim, group in [(64, 5), (128, 5), (128, 1), (256, 5), (128, 32), (256, 32)]:
        if dtype == torch.float16 and (head_dim, group) != (128, 5):
            continue  # fp16 compiles as bf16 does; one case shows it
        cfg = pa.decode_config(head_dim, group, dtype)
        consts = dict(HEAD_DIM=head_dim, GROUP=group, BLOCK_SIZE=16, BLOCK_G=pa._block_g(group),
                      BLOCK_D=pa._block_d(head_dim), BLOCK_N=cfg.block_n, DIRECT=False,
                      IEEE=dtype == torch.float32, UPCAST=False)
        ptrs = dict(q_ptr="*" + t, k_ptr="*" + t, v_ptr="*" + t, bt_ptr="*i32", ctx_ptr="*i32",
                    o_ptr="*fp32", lse_ptr="*fp32")
        n = spills(pa._decode_split_kernel, ptrs, consts, cfg)
        if n:
            bad.append(f"decode {t} head_dim {head_dim} group {group} {cfg}: {n} B spilled")
        if group != 5:
            continue
        cfg = pa.prefill_config(head_dim, dtype)
        consts = dict(HEAD_DIM=head_dim, GROUP=group, BLOCK_SIZE=16, BLOCK_M=cfg.block_m,
                      BLOCK_N=cfg.block_n, BLOCK_D=pa._block_d(head_dim),
                      IEEE=dtype == torch.float32, UPCAST=False)
        ptrs = dict(q_ptr="*" + t, k_ptr="*" + t, v_ptr="*" + t, bt_ptr="*i32", qsl_ptr="*i32",
                    ctx_ptr="*i32", o_ptr="*" + t)
        n = spills(pa._prefill_kernel, ptrs, consts, cfg)
        if n:
            bad.append(f"prefill {t} head_dim {head_dim} {cfg}: {n} B spilled")
if bad:
    print("\\n".join(bad), file=sys.stderr)
    sys.exit(1)
print("ok")
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests compile and run the kernels")
def test_attention_kernels_compile_for_an_h100_without_register_spills(tmp_path):
    """Triton's real compiler (sm_90) on every launch configuration the kernels pick by
    head_dim, GQA group and dtype; ptxas's spill count (Triton prints its log) must be zero."""
    compile_for_h100(SPILL_SCRIPT, tmp_path)
