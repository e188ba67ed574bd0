"""Triton row gathers for the UVA path: rows of a (mapped pinned host) table into a fixed buffer.

``gather_rows`` copies rows as raw words, so bf16 (or any dtype) stays bit-identical;
``gather_rows_fp8`` reads packed FP8 rows (see ``rowformat``) and dequantises while gathering.

Shape of the kernels, after the H100 measurements (shared/measurements/h100-2026-11-25.md):
- Indices are sorted first (the permutation is kept): neighbouring rows then share PCIe
  transactions, which lifted 1M-row gathers 8.5x. Each row is written straight to its request
  position (``out[perm[k]] = table[sorted[k]]``), so there is no second pass.
- A persistent grid: at most ``max_programs`` programs loop over tiles of rows. The default is a
  multiple of the SM count (the kernel's shape barely mattered); pass fewer to leave SMs to the
  compute stream when the gather runs on a side stream.
- The row width is a compile-time constant and rows are read as the widest word that divides
  it (int32, int16 or bytes), so Triton knows the alignment and issues vector loads, up to
  16 bytes per thread.

Launches go to the current stream (wrap a call in ``torch.cuda.stream(side)``) and allocate
nothing except ``torch.sort``'s outputs when ``sort=True``; ``out`` is written in place, so a
call can be captured in a CUDA graph and replayed with new indices copied into ``idx``.
Nothing here syncs with the host. Bounds: check indices on the host (``check_rows``; the lookup
plan already does) before they are uploaded; the kernels also mask any row outside [0, R) and
write zeros for it instead of reading out of bounds.

Importable without Triton or CUDA: ``triton_available()`` says whether the kernels can run. On a
machine without CUDA set ``TRITON_INTERPRET=1`` before Triton is imported to run them on CPU
tensors (the tests do).
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch

from .rowformat import group_size, packed_width
from .triton_compat import patch_interpreter

try:
    import triton
    import triton.language as tl
except ImportError:  # the kernels are unavailable; everything else in the package still works
    triton = None
    tl = None
if os.environ.get("TRITON_INTERPRET") == "1":
    patch_interpreter()

TILE_BYTES = 8192  # bytes of rows one program moves per loop iteration
TILE_VALUES = 4096  # fp8: values one program dequantises per loop iteration
MAX_TILE_ROWS = 64
PROGRAMS_PER_SM = 8
CPU_PROGRAMS = 4  # interpreter: few programs, each loops over many tiles
NUM_WARPS = 4


def triton_available() -> bool:
    return triton is not None


def check_rows(idx, num_rows: int) -> np.ndarray:
    """Host-side bounds check (numpy array or CPU tensor): int64 numpy rows, or ValueError
    naming the first row outside [0, num_rows)."""
    if isinstance(idx, torch.Tensor):
        if idx.device.type != "cpu":
            raise ValueError("check_rows runs on the host; pass the indices before upload")
        idx = idx.numpy()
    rows = np.ascontiguousarray(idx, dtype=np.int64).reshape(-1)
    bad = np.flatnonzero((rows < 0) | (rows >= num_rows))
    if bad.size:
        raise ValueError(
            f"row {int(rows[bad[0]])} (index {int(bad[0])}) is outside the table "
            f"(0..{num_rows - 1}); fix the row ids before gathering"
        )
    return rows


def default_programs(device: torch.device) -> int:
    if device.type != "cuda":
        return CPU_PROGRAMS
    index = device.index if device.index is not None else torch.cuda.current_device()
    return PROGRAMS_PER_SM * torch.cuda.get_device_properties(index).multi_processor_count


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _pow2_at_most(n: int) -> int:
    return 1 << max(0, n.bit_length() - 1)


def _rows_as_words(t: torch.Tensor, name: str) -> torch.Tensor:
    """A contiguous [R, ...] tensor as [R, words]: int32 words when the row bytes allow,
    else int16, else bytes. A view, never a copy."""
    if t.dim() < 1 or not t.is_contiguous():
        raise ValueError(f"{name} must be a contiguous [rows, ...] tensor; call .contiguous()")
    row_bytes = math.prod(t.shape[1:]) * t.element_size()
    raw = t.reshape(t.shape[0], -1).view(torch.uint8) if t.numel() else _empty_rows(t, row_bytes)
    for dtype in (torch.int32, torch.int16):
        if row_bytes % dtype.itemsize == 0:
            return raw.view(dtype)
    return raw


def _empty_rows(t: torch.Tensor, row_bytes: int) -> torch.Tensor:
    return torch.empty((t.shape[0], row_bytes), dtype=torch.uint8, device=t.device)


def _index_args(idx: torch.Tensor, out_rows: int, sort: bool, positions: torch.Tensor | None):
    if idx.dim() != 1 or idx.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"idx must be a 1-D int32/int64 tensor, got {tuple(idx.shape)} {idx.dtype}"
        )
    if out_rows != idx.numel():
        raise ValueError(
            f"out has {out_rows} rows for {idx.numel()} indices; pass out[:{idx.numel()}]"
        )
    if positions is not None:
        if sort:
            raise ValueError("positions are for indices the caller sorted; pass sort=False")
        if positions.shape != idx.shape or positions.device != idx.device:
            raise ValueError("positions must match idx in shape and device")
        return idx.contiguous(), positions.contiguous()
    if sort:
        src, perm = torch.sort(idx)
        return src, perm
    return idx.contiguous(), None


def _check_device(table: torch.Tensor, idx: torch.Tensor, out: torch.Tensor) -> None:
    if not (table.device == idx.device == out.device):
        raise ValueError(
            f"table ({table.device}), idx ({idx.device}) and out ({out.device}) must be on one "
            "device; use the table's device view for UVA"
        )
    if triton is None:
        raise RuntimeError(
            "the Triton gather needs triton; pip install triton (or use index_select)"
        )


def _grid(device: torch.device, tiles: int, max_programs: int | None) -> tuple[int]:
    cap = max_programs if max_programs is not None else default_programs(device)
    if cap < 1:
        raise ValueError(f"max_programs must be at least 1, got {cap}")
    return (max(1, min(cap, tiles)),)


def gather_rows(
    table: torch.Tensor,
    idx: torch.Tensor,
    out: torch.Tensor,
    *,
    sort: bool = True,
    positions: torch.Tensor | None = None,
    max_programs: int | None = None,
) -> torch.Tensor:
    """``out[k] = table[idx[k]]`` bit for bit; returns ``out``.

    table: contiguous [R, ...] (a mapped host view or any device tensor); out: contiguous
    [len(idx), ...] with the same bytes per row; idx: int64/int32 [M] on the same device.
    ``sort``: gather in sorted row order (recommended). ``positions``: the caller already
    sorted; ``out[positions[k]] = table[idx[k]]`` (e.g. a plan sorted on the host).
    Rows outside [0, R) come back as zeros.
    """
    _check_device(table, idx, out)
    words = _rows_as_words(table, "table")
    out_words = _rows_as_words(out, "out")
    if out_words.shape[1:] != words.shape[1:] or out_words.dtype != words.dtype:
        raise ValueError(
            f"out rows ({out[0].numel() * out.element_size() if out.numel() else 0} bytes) "
            "differ from table rows; allocate out as [M, *table.shape[1:]] of table.dtype"
        )
    src, dst = _index_args(idx, out.shape[0], sort, positions)
    m, row_words = src.numel(), words.shape[1]
    if m == 0 or row_words == 0:
        return out
    word = words.element_size()
    block_w = min(_pow2_at_least(row_words), _pow2_at_most(TILE_BYTES // word))
    rows = max(1, min(MAX_TILE_ROWS, _pow2_at_most(TILE_BYTES // (block_w * word))))
    grid = _grid(table.device, triton.cdiv(m, rows), max_programs)
    _gather_kernel[grid](
        words,
        src,
        src if dst is None else dst,
        out_words,
        m,
        words.shape[0],
        HAS_DST=dst is not None,
        ROW_WORDS=row_words,
        ROWS=rows,
        BLOCK_W=block_w,
        num_warps=NUM_WARPS,
    )
    return out


def gather_rows_fp8(
    packed_table: torch.Tensor,
    idx: torch.Tensor,
    out: torch.Tensor,
    *,
    sort: bool = True,
    positions: torch.Tensor | None = None,
    max_programs: int | None = None,
) -> torch.Tensor:
    """``out[k] = dequantize_fp8(packed_table[idx[k]])``, dequantised in the kernel, bit for bit
    equal to ``rowformat.dequantize_fp8``; returns ``out``.

    packed_table: uint8 [R, W + W/32] (W + 1 for rows under 32 values); out: [len(idx), W]
    bfloat16, float16 or float32.
    Same ``sort`` / ``positions`` / bounds behaviour as :func:`gather_rows`.
    """
    _check_device(packed_table, idx, out)
    if packed_table.dim() != 2 or packed_table.dtype != torch.uint8:
        raise ValueError("packed_table must be uint8 [R, W + W/32]; see rowformat.quantize_fp8")
    if not packed_table.is_contiguous() or not out.is_contiguous():
        raise ValueError("packed_table and out must be contiguous; call .contiguous()")
    w = packed_width(packed_table.shape[1])
    gs = group_size(w)
    if out.dim() != 2 or out.shape[1] != w:
        raise ValueError(f"out must be [M, {w}] for these rows, got {tuple(out.shape)}")
    if out.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"out dtype {out.dtype} unsupported; use bfloat16, float16 or float32")
    src, dst = _index_args(idx, out.shape[0], sort, positions)
    m = src.numel()
    if m == 0:
        return out
    gs_p2 = _pow2_at_least(gs)
    block_g = min(_pow2_at_least(w // gs), TILE_VALUES // gs_p2)
    rows = max(1, min(MAX_TILE_ROWS, TILE_VALUES // (block_g * gs_p2)))
    grid = _grid(packed_table.device, triton.cdiv(m, rows), max_programs)
    _gather_fp8_kernel[grid](
        packed_table,
        src,
        src if dst is None else dst,
        out,
        m,
        packed_table.shape[0],
        HAS_DST=dst is not None,
        W=w,
        G=w // gs,
        GS=gs,
        GS_P2=gs_p2,
        RB=packed_table.shape[1],
        ROWS=rows,
        BLOCK_G=block_g,
        num_warps=NUM_WARPS,
    )
    return out


if triton is not None:

    @triton.jit
    def _tile_rows(src_ptr, dst_ptr, tile, M, R, HAS_DST: tl.constexpr, ROWS: tl.constexpr):
        """Source rows, destination rows and masks of one tile of requests."""
        k = tile * ROWS + tl.arange(0, ROWS)
        in_req = k < M
        src = tl.load(src_ptr + k, mask=in_req, other=0).to(tl.int64)
        ok = in_req & (src >= 0) & (src < R)  # out-of-range rows are masked: zeros
        if HAS_DST:
            dst = tl.load(dst_ptr + k, mask=in_req, other=0).to(tl.int64)
        else:
            dst = k.to(tl.int64)
        return src, dst, ok, in_req

    # The index arrays are views into the step's single upload at any offset, and M changes
    # every step: not specialising on them keeps one compiled kernel per row shape.
    @triton.jit(do_not_specialize=["src_ptr", "dst_ptr", "M"])
    def _gather_kernel(
        table_ptr,
        src_ptr,
        dst_ptr,
        out_ptr,
        M,
        R,
        HAS_DST: tl.constexpr,
        ROW_WORDS: tl.constexpr,
        ROWS: tl.constexpr,
        BLOCK_W: tl.constexpr,
    ):
        cols = tl.arange(0, BLOCK_W)
        num_tiles = tl.cdiv(M, ROWS)
        for tile in range(tl.program_id(0), num_tiles, tl.num_programs(0)):
            src, dst, ok, in_req = _tile_rows(src_ptr, dst_ptr, tile, M, R, HAS_DST, ROWS)
            src_off = src * ROW_WORDS  # constexpr stride: Triton sees the row alignment
            dst_off = dst * ROW_WORDS
            for c0 in range(0, ROW_WORDS, BLOCK_W):
                col = c0 + cols
                cm = col < ROW_WORDS
                vals = tl.load(
                    table_ptr + src_off[:, None] + col[None, :],
                    mask=ok[:, None] & cm[None, :],
                    other=0,
                )
                tl.store(
                    out_ptr + dst_off[:, None] + col[None, :],
                    vals,
                    mask=in_req[:, None] & cm[None, :],
                )

    @triton.jit
    def _e4m3_to_f32(b):
        """float8 e4m3fn bytes -> float32 with integer ops only (exact, any GPU, interpreter)."""
        x = b.to(tl.int32)
        sign = (x & 0x80) << 24
        e = (x >> 3) & 0xF
        m = x & 0x7
        bits = sign | ((e + 120) << 23) | (m << 20)  # normal: 2**(e-7) * (1 + m/8)
        bits = tl.where((x & 0x7F) == 0x7F, sign | 0x7FC00000, bits)  # NaN
        # subnormal: m * 2**-9 (exact), its sign set as a bit: Triton 3.5/3.6 lower a float
        # negation as 0 - x, which turns byte 0x80 into +0.0 instead of -0.0
        sub = (m.to(tl.float32) * 0.001953125).to(tl.int32, bitcast=True)
        bits = tl.where(e == 0, sign | sub, bits)
        return bits.to(tl.float32, bitcast=True)

    @triton.jit(do_not_specialize=["src_ptr", "dst_ptr", "M"])
    def _gather_fp8_kernel(
        table_ptr,
        src_ptr,
        dst_ptr,
        out_ptr,
        M,
        R,
        HAS_DST: tl.constexpr,
        W: tl.constexpr,
        G: tl.constexpr,
        GS: tl.constexpr,
        GS_P2: tl.constexpr,
        RB: tl.constexpr,
        ROWS: tl.constexpr,
        BLOCK_G: tl.constexpr,
    ):
        """G groups of GS values per row (GS = 32, or the whole row when it is narrower)."""
        g_ar = tl.arange(0, BLOCK_G)
        j = tl.arange(0, GS_P2)
        jm = j < GS
        num_tiles = tl.cdiv(M, ROWS)
        for tile in range(tl.program_id(0), num_tiles, tl.num_programs(0)):
            src, dst, ok, in_req = _tile_rows(src_ptr, dst_ptr, tile, M, R, HAS_DST, ROWS)
            src_off = src * RB
            dst_off = dst * W
            for g0 in range(0, G, BLOCK_G):
                g = g0 + g_ar
                gm = g < G
                sb = tl.load(
                    table_ptr + src_off[:, None] + W + g[None, :],
                    mask=ok[:, None] & gm[None, :],
                    other=0,
                )
                scale = (sb.to(tl.int32) << 23).to(tl.float32, bitcast=True)  # ue8m0; 0 -> 0.0
                col = g[:, None] * GS + j[None, :]  # [BLOCK_G, GS_P2]
                cm = gm[:, None] & jm[None, :]
                vb = tl.load(
                    table_ptr + src_off[:, None, None] + col[None, :, :],
                    mask=ok[:, None, None] & cm[None, :, :],
                    other=0,
                )
                vals = _e4m3_to_f32(vb) * scale[:, :, None]
                tl.store(
                    out_ptr + dst_off[:, None, None] + col[None, :, :],
                    vals.to(out_ptr.dtype.element_ty),
                    mask=in_req[:, None, None] & cm[None, :, :],
                )
