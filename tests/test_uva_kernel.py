"""Triton row gathers (offload.uva_kernel): bit-identical to index_select, fp8 equal to the
reference dequantisation. On CPU the kernels run under TRITON_INTERPRET=1; the gpu tests run
the same kernels on a mapped pinned table, on a side stream and inside a CUDA graph."""

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

from offload.rowformat import dequantize_fp8, quantize_fp8
from offload.uva_kernel import (
    check_rows,
    gather_rows,
    gather_rows_fp8,
    triton_available,
)

from .conftest import DEV, compile_for_h100


def _bits(t: torch.Tensor) -> torch.Tensor:
    """A tensor's raw bytes, so NaN payloads and -0.0 compare exactly."""
    return t.contiguous().view(torch.uint8)


def _random_table(rows: int, shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0):
    """Random bit patterns (NaNs, infinities, -0.0 included for float dtypes)."""
    g = torch.Generator().manual_seed(seed)
    n = rows * int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)
    return raw.view(dtype).view(rows, *shape).to(DEV)


def _idx(values, device=DEV) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64, device=device)


def test_triton_is_available_here():
    assert triton_available()


# row bytes: 1, 2, 3, 6, 24, 128, 264 (packed fp8 width), 16400 (several column chunks)
ROW_CASES = [
    ((1,), torch.uint8),
    ((1,), torch.bfloat16),
    ((3,), torch.int8),
    ((3,), torch.bfloat16),
    ((6,), torch.float32),
    ((64,), torch.bfloat16),
    ((264,), torch.uint8),
    ((4, 8), torch.float16),
    ((3,), torch.int64),
    ((4100,), torch.float32),
]


@pytest.mark.parametrize("shape,dtype", ROW_CASES)
@pytest.mark.parametrize("sort", [True, False])
def test_gather_is_bit_identical_to_index_select(shape, dtype, sort):
    table = _random_table(53, shape, dtype)
    rng = np.random.default_rng(1)
    for m in (1, 7, 97):
        idx = _idx(rng.integers(0, 53, m))
        out = torch.empty((m, *shape), dtype=dtype, device=DEV)
        assert gather_rows(table, idx, out, sort=sort) is out
        assert torch.equal(_bits(out), _bits(torch.index_select(table, 0, idx)))


def test_duplicated_unsorted_indices_and_every_program_count_agree():
    table = _random_table(40, (12,), torch.bfloat16, seed=3)
    idx = _idx([39, 0, 5, 5, 5, 39, 17, 2, 0, 38, 5] * 9)
    ref = _bits(table[idx])
    for sort in (True, False):
        for programs in (1, 2, 3, None):
            out = torch.empty((idx.numel(), 12), dtype=torch.bfloat16, device=DEV)
            gather_rows(table, idx, out, sort=sort, max_programs=programs)
            assert torch.equal(_bits(out), ref), (sort, programs)


def test_presorted_indices_with_positions_land_in_request_order():
    table = _random_table(30, (5,), torch.float32, seed=4)
    idx = _idx([29, 3, 3, 0, 17, 8])
    sorted_idx, perm = torch.sort(idx)
    out = torch.empty((6, 5), dtype=torch.float32, device=DEV)
    gather_rows(table, sorted_idx, out, sort=False, positions=perm)
    assert torch.equal(_bits(out), _bits(table[idx]))


def test_int32_indices_work():
    table = _random_table(20, (8,), torch.bfloat16)
    idx = _idx([19, 0, 7]).to(torch.int32)
    out = torch.empty((3, 8), dtype=torch.bfloat16, device=DEV)
    gather_rows(table, idx, out)
    assert torch.equal(_bits(out), _bits(table[idx.long()]))


def test_no_rows_launches_nothing_and_returns_out():
    table = _random_table(10, (4,), torch.bfloat16)
    out = torch.empty((0, 4), dtype=torch.bfloat16, device=DEV)
    assert gather_rows(table, _idx([]), out) is out
    fp8 = quantize_fp8(torch.randn(4, 32)).to(DEV)
    out8 = torch.empty((0, 32), dtype=torch.bfloat16, device=DEV)
    assert gather_rows_fp8(fp8, _idx([]), out8) is out8


@pytest.mark.parametrize("sort", [True, False])
def test_rows_outside_the_table_come_back_as_zeros(sort):
    table = _random_table(16, (6,), torch.bfloat16, seed=5)
    idx = _idx([3, -1, 16, 15, 1 << 40, 0])
    out = torch.full((6, 6), 1.0, dtype=torch.bfloat16, device=DEV)
    gather_rows(table, idx, out, sort=sort)
    ok = torch.tensor([True, False, False, True, False, True], device=DEV)
    assert torch.equal(_bits(out[ok]), _bits(table[idx[ok]]))
    assert not _bits(out[~ok]).any()


def test_check_rows_refuses_rows_outside_the_table_before_launch():
    assert check_rows(np.array([0, 9, 3]), 10).dtype == np.int64
    assert check_rows(torch.tensor([[1, 2], [3, 4]]), 5).tolist() == [1, 2, 3, 4]
    with pytest.raises(ValueError, match=r"row 10 \(index 1\) is outside the table \(0\.\.9\)"):
        check_rows(np.array([0, 10, -1]), 10)
    with pytest.raises(ValueError, match="row -1"):
        check_rows(torch.tensor([-1]), 10)


def test_bad_arguments_are_refused_with_the_fix():
    table = _random_table(10, (4,), torch.bfloat16)
    idx = _idx([1, 2])
    with pytest.raises(ValueError, match=r"pass out\[:2\]"):
        gather_rows(table, idx, torch.empty((3, 4), dtype=torch.bfloat16, device=DEV))
    with pytest.raises(ValueError, match="differ from table rows"):
        gather_rows(table, idx, torch.empty((2, 4), dtype=torch.float32, device=DEV))
    with pytest.raises(ValueError, match="1-D int32/int64"):
        gather_rows(table, idx.view(2, 1), torch.empty((2, 4), dtype=torch.bfloat16, device=DEV))
    with pytest.raises(ValueError, match="sort=False"):
        out = torch.empty((2, 4), dtype=torch.bfloat16, device=DEV)
        gather_rows(table, idx, out, positions=idx)
    with pytest.raises(ValueError, match="max_programs"):
        out = torch.empty((2, 4), dtype=torch.bfloat16, device=DEV)
        gather_rows(table, idx, out, max_programs=0)
    with pytest.raises(ValueError, match="contiguous"):
        out = torch.empty((2, 2), dtype=torch.bfloat16, device=DEV)
        gather_rows(table[:, ::2], idx, out)


# --- fp8 ----------------------------------------------------------------------------------
def _fp8_table(rows: int, width: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, width, generator=g) * torch.exp2(torch.randint(-20, 20, (rows, 1)))
    x[0, :32] = 0.0  # an all-zero group
    packed = quantize_fp8(x)
    packed[1, :width] = torch.arange(width, dtype=torch.uint8)  # every e4m3 code, NaN included
    return packed


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    nan = torch.isnan(b)
    return torch.equal(torch.isnan(a), nan) and torch.equal(_bits(a[~nan]), _bits(b[~nan]))


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # f16 inf, as the reference
@pytest.mark.parametrize("width", [3, 16, 32, 96, 256])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("sort", [True, False])
def test_fp8_gather_equals_the_reference_dequantisation(width, dtype, sort):
    packed = _fp8_table(300, width)
    idx = _idx([1, 0, 299, 5, 5, 1, 150, 7, 0, 42, 3])
    out = torch.empty((idx.numel(), width), dtype=dtype, device=DEV)
    gather_rows_fp8(packed.to(DEV), idx, out, sort=sort)
    ref = dequantize_fp8(packed[idx.cpu()], dtype)
    assert _same_values(out.cpu(), ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_fp8_negative_zero_and_negative_subnormals_keep_their_sign_bit(dtype):
    """Byte 0x80 is -0.0 and 0x81..0x87 are negative subnormals: compared as bit patterns (a
    value comparison calls -0.0 equal to +0.0). Triton 3.5/3.6 lower float negation as 0 - x,
    which loses the sign of zero; the kernel must set the sign bit instead."""
    codes = torch.arange(256, dtype=torch.uint8).view(8, 32)  # every e4m3 byte, unit scale
    packed = torch.cat([codes, torch.full((8, 1), 127, dtype=torch.uint8)], 1)
    out = torch.empty((8, 32), dtype=dtype, device=DEV)
    gather_rows_fp8(packed.to(DEV), _idx(list(range(8))), out, sort=False)
    want = dequantize_fp8(packed, dtype)
    neg = _bits(out.cpu()[4, :8].contiguous())  # bytes 0x80..0x87
    assert torch.equal(neg, _bits(want[4, :8].contiguous())), (neg, _bits(want[4, :8]))
    assert torch.signbit(out.cpu()[4, :8].float()).all()
    assert _same_values(out.cpu(), want)


def test_fp8_wide_rows_loop_over_groups_and_bad_rows_are_zeros():
    packed = _fp8_table(9, 4096 + 32, seed=2)  # 129 groups: more than one column chunk
    idx = _idx([8, -3, 2, 9])
    out = torch.full((4, 4128), 5.0, dtype=torch.bfloat16, device=DEV)
    gather_rows_fp8(packed.to(DEV), idx, out, max_programs=2)
    assert _same_values(out[[0, 2]].cpu(), dequantize_fp8(packed[[8, 2]], torch.bfloat16))
    assert not _bits(out[[1, 3]]).any()


def test_fp8_bad_arguments_are_refused():
    packed = quantize_fp8(torch.randn(4, 64)).to(DEV)
    idx = _idx([0, 1])
    with pytest.raises(ValueError, match=r"out must be \[M, 64\]"):
        gather_rows_fp8(packed, idx, torch.empty((2, 32), dtype=torch.bfloat16, device=DEV))
    with pytest.raises(ValueError, match="unsupported"):
        gather_rows_fp8(packed, idx, torch.empty((2, 64), dtype=torch.int32, device=DEV))
    with pytest.raises(ValueError, match="not a packed FP8 row"):
        out = torch.empty((2, 64), dtype=torch.float32, device=DEV)
        gather_rows_fp8(packed[:, :65].contiguous(), idx, out)
    with pytest.raises(ValueError, match="uint8"):
        gather_rows_fp8(packed.float(), idx, torch.empty((2, 64), device=DEV))


# --- compiled for an H100 without one ----------------------------------------------------------
COMPILE_SCRIPT = """
import sys
try:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError:
    sys.exit(3)
from offload import uva_kernel as uk

def ptx(fn, sig, consts):
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(4)}
    src = ASTSource(fn, signature=sig, constexprs=consts, attrs=attrs)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    return k.asm["ptx"]

names = ["table_ptr", "src_ptr", "dst_ptr", "out_ptr", "M", "R"]
for word, rw, bw, rows, vec in [("i32", 32, 32, 64, "v4.b32"), ("i32", 66, 128, 16, "v2.b32"),
                                ("i16", 3, 4, 64, "b16"), ("i32", 4100, 2048, 1, "v4.b32")]:
    sig = dict(zip(names, [f"*{word}", "*i64", "*i64", f"*{word}", "i32", "i64"]))
    sig.update({k: "constexpr" for k in ("HAS_DST", "ROW_WORDS", "ROWS", "BLOCK_W")})
    code = ptx(uk._gather_kernel, sig, {"HAS_DST": True, "ROW_WORDS": rw, "ROWS": rows,
                                        "BLOCK_W": bw})
    assert f"ld.global.{vec}" in code, (word, rw)
for out in ("bf16", "fp16", "fp32"):
    sig = dict(zip(names, ["*u8", "*i64", "*i64", f"*{out}", "i32", "i64"]))
    sig.update({k: "constexpr" for k in ("HAS_DST", "W", "G", "GS", "GS_P2", "RB", "ROWS",
                                         "BLOCK_G")})
    for w, gs, p2, rows, bg in [(256, 32, 32, 16, 8), (16, 16, 16, 64, 1)]:
        consts = {"HAS_DST": False, "W": w, "G": w // gs, "GS": gs, "GS_P2": p2,
                  "RB": w + w // gs, "ROWS": rows, "BLOCK_G": bg}
        code = ptx(uk._gather_fp8_kernel, sig, consts)
        assert "mul.f32" in code and ".ftz" not in code  # exact products, subnormals kept
print("ok")
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests compile and run the kernels")
def test_kernels_compile_for_an_h100_with_wide_loads(tmp_path):
    """The interpreter is lenient; this runs Triton's real compiler (to sm_90 PTX) on the kernels
    and checks the row loads are vectorised (16 bytes for 128-byte rows) and no flush-to-zero."""
    compile_for_h100(COMPILE_SCRIPT, tmp_path)


# --- on the GPU -----------------------------------------------------------------------------
def _cupy_ok() -> bool:
    from offload.store import cupy_ok

    return cupy_ok()


needs_gpu = pytest.mark.skipif(not _cupy_ok(), reason="needs CUDA and CuPy")


def _mapped(table_cpu: torch.Tensor) -> tuple[object, torch.Tensor]:
    from offload.hostmem import PinnedBuffer

    buf = PinnedBuffer(tuple(table_cpu.shape), table_cpu.dtype, "cuda")
    buf.host.copy_(table_cpu)
    view = buf.device_view(torch.device("cuda"))
    assert view.is_cuda and view.data_ptr() == buf.ptr
    return buf, view


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize(
    "shape,dtype", [((64,), torch.bfloat16), ((264,), torch.uint8), ((3,), torch.bfloat16)]
)
@pytest.mark.parametrize("sort", [True, False])
@pytest.mark.parametrize("programs", [None, 4])
def test_gpu_mapped_table_gather_on_a_side_stream_matches_resident(shape, dtype, sort, programs):
    host = _random_table(5000, shape, dtype, seed=7).cpu()
    buf, view = _mapped(host)
    resident = host.cuda()
    idx = torch.from_numpy(np.random.default_rng(0).integers(0, 5000, 4099)).cuda()
    out = torch.empty((4099, *shape), dtype=dtype, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        gather_rows(view, idx, out, sort=sort, max_programs=programs)
        done = torch.cuda.Event()
        done.record(side)
    torch.cuda.current_stream().wait_event(done)
    assert torch.equal(_bits(out), _bits(torch.index_select(resident, 0, idx)))


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_fp8_gather_from_mapped_table_equals_reference(dtype):
    packed = _fp8_table(3000, 256, seed=8)
    buf, view = _mapped(packed)
    idx_cpu = torch.from_numpy(np.random.default_rng(1).integers(0, 3000, 1001))
    idx_cpu[:2] = torch.tensor([1, 0])
    out = torch.empty((1001, 256), dtype=dtype, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        gather_rows_fp8(view, idx_cpu.cuda(), out)
    torch.cuda.current_stream().wait_stream(side)
    assert _same_values(out.cpu(), dequantize_fp8(packed[idx_cpu], dtype))


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("sort", [False, True])
def test_gpu_gather_captured_in_a_cuda_graph_replays_with_new_indices(sort):
    host = _random_table(2048, (64,), torch.bfloat16, seed=9).cpu()
    buf, view = _mapped(host)
    idx = torch.zeros(256, dtype=torch.int64, device="cuda")  # fixed addresses
    out = torch.empty((256, 64), dtype=torch.bfloat16, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile and warm up outside the capture
        gather_rows(view, idx, out, sort=sort)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        gather_rows(view, idx, out, sort=sort)
    rng = np.random.default_rng(2)
    for _ in range(3):
        new = torch.from_numpy(rng.integers(0, 2048, 256))
        idx.copy_(new)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(_bits(out.cpu()), _bits(host[new]))
