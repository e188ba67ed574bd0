"""Engram tables streamed from a safetensors file into the memory they are served from.

Nothing maps the file: each table's bytes are read with ``preadv`` in bounded chunks, straight
into the table's own host memory when the stored rows already are what the tier holds, else
into one reusable staging buffer of at most ``chunk_bytes`` that is converted into the table.
The page cache behind every chunk is released (``posix_fadvise(DONTNEED)``), so a load holds
the tables plus one chunk: peak RSS stays near the tables' bytes (the old path, copying out of
safetensors' mapping, kept the whole mapped file resident beside the copy: ~2x).

Stored layouts (``table_source``): plain rows (bf16/f16/f32); packed FP8 rows (uint8
``[R, W + W/32]``, recorded by engram-quantize); split FP8, values F8_E4M3 ``[R, W]`` with the
ue8m0 scale bytes beside them, either engram-quantize's ``<name>.scales`` (U8) or
DeepSeek-V4.1's ``...engram.embed.weight`` + ``...engram.embed.scale`` (F8_E8M0 ``[R, W/32]``).
Our packed fp8 row is exactly V4.1's value bytes followed by its scale bytes (``rowformat``;
byte 0 excepted, which we read as scale 0 and E8M0 as 2**-127), so split tables load as our
rows by placing both tensors' bytes into each row, with no arithmetic.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from models.safetensors_header import SafetensorsHeader, TableFileError, TensorInfo

from .rowformat import (
    PLAIN_DTYPES,
    ROW_FORMATS_KEY,
    RowFormat,
    dequantize_fp8,
    group_size,
    quantize_fp8,
)

PLAIN = {"BF16": "bf16", "F16": "f16", "F32": "f32"}  # safetensors dtype -> row format name
SCALE_DTYPES = ("U8", "F8_E8M0")
CHUNK_BYTES = 16 << 20  # what one read moves: the bound on staging memory


@dataclass(frozen=True)
class TableSource:
    """Where one table's rows are in the file and how they are stored."""

    key: str
    fmt: RowFormat
    rows: int
    values: TensorInfo  # the rows, or split fp8's values
    scales: TensorInfo | None = None  # split fp8's scale bytes [rows, W/32]

    @property
    def row_bytes(self) -> int:
        return self.values.nbytes // max(self.rows, 1) + (
            self.scales.nbytes // max(self.rows, 1) if self.scales is not None else 0
        )


@dataclass(frozen=True)
class LoadStats:
    bytes: int
    seconds: float

    @property
    def mb_per_s(self) -> float:
        return self.bytes / 1e6 / self.seconds if self.seconds > 0 else float("inf")


def recorded_formats(header: SafetensorsHeader) -> dict[str, RowFormat]:
    """Row formats engram-quantize recorded in the file's metadata."""
    text = header.metadata.get(ROW_FORMATS_KEY)
    if text is None:
        return {}
    try:
        recorded = dict(json.loads(text))
    except (ValueError, TypeError):
        raise TableFileError(
            f"{header.path}: bad {ROW_FORMATS_KEY}; re-run engram-quantize"
        ) from None
    return {k: RowFormat.from_dict(v) for k, v in recorded.items()}


def row_formats(header: SafetensorsHeader) -> dict[str, RowFormat]:
    """Recorded formats, and the plain format of every other 2-D bf16/f16/f32 tensor."""
    out = {
        t.name: RowFormat(PLAIN[t.dtype], t.shape[1])
        for t in header.tensors.values()
        if len(t.shape) == 2 and t.dtype in PLAIN
    }
    out.update(recorded_formats(header))
    return out


def scales_key(header: SafetensorsHeader, key: str) -> str | None:
    """The scale tensor beside fp8 values ``key``: ``<key>.scales`` or V4.1's ``<stem>.scale``."""
    for cand in (f"{key}.scales", key.removesuffix(".weight") + ".scale"):
        if cand != key and cand in header:
            return cand
    return None


def table_source(header: SafetensorsHeader, key: str) -> TableSource:
    """Check tensor ``key`` is a table of rows and say how it is stored (TableFileError if not)."""

    def bad(name: str, why: str) -> TableFileError:
        return TableFileError(f"{header.path}: tensor {name}: {why}; check the checkpoint")

    if key not in header:
        raise bad(key, "missing (want a 2-D table of rows)")
    info = header[key]
    if len(info.shape) != 2:
        raise bad(key, f"shape {list(info.shape)} is not a 2-D table of rows")
    rows, width = info.shape
    fmt = recorded_formats(header).get(key)
    if fmt is None and info.dtype in PLAIN:
        fmt = RowFormat(PLAIN[info.dtype], width)
    elif fmt is None and info.dtype == "F8_E4M3":
        try:
            fmt = RowFormat("fp8", width, packed=False)
        except ValueError as e:
            raise bad(key, str(e)) from None
    elif fmt is None:
        raise bad(key, f"{info.dtype} is not a table's dtype (bf16/f16/f32, or fp8 rows)")
    want = fmt.row_bytes if fmt.name == "fp8" else fmt.values * info.itemsize
    if fmt.name == "fp8" and fmt.packed:
        ok = info.dtype == "U8" and width == want
    elif fmt.name == "fp8":
        ok = info.dtype in ("F8_E4M3", "U8") and width == fmt.values
    else:
        ok = info.dtype in PLAIN and width * info.itemsize == want
    if not ok:
        raise bad(
            key,
            f"{info.dtype} {list(info.shape)} does not hold {fmt.name} rows of {fmt.values} values",
        )
    if fmt.name != "fp8" or fmt.packed:
        return TableSource(key, fmt, rows, info)
    skey = scales_key(header, key)
    if skey is None:
        raise bad(key, f"fp8 values without scales ({key}.scales or a .scale beside .weight)")
    scales = header[skey]
    groups = fmt.values // group_size(fmt.values)
    if scales.dtype not in SCALE_DTYPES or scales.shape != (rows, groups):
        raise bad(
            skey,
            f"{scales.dtype} {list(scales.shape)}; want ue8m0 scales [{rows}, {groups}] for {key}",
        )
    return TableSource(key, fmt, rows, info, scales)


def pread_into(fd: int, buf: memoryview, offset: int, where: str) -> None:
    """Fill ``buf`` from the file at ``offset``; a short file is a TableFileError."""
    got = 0
    while got < len(buf):
        n = os.preadv(fd, [buf[got:]], offset + got)
        if n == 0:
            raise TableFileError(f"{where}: file ended at byte {offset + got} (truncated?)")
        got += n


def drop_cache(fd: int, offset: int, length: int) -> None:
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


def byte_view(t: torch.Tensor) -> memoryview:
    """Writable bytes of a contiguous CPU tensor."""
    return memoryview(t.view(torch.uint8).reshape(-1).numpy()).cast("B")


def direct(src: TableSource, dst: torch.Tensor, dst_fp8: bool) -> bool:
    """Whether the stored bytes are the tier's bytes: read straight into the table."""
    if dst.device.type != "cpu" or src.scales is not None:
        return False
    if src.fmt.name == "fp8":
        return dst_fp8
    return not dst_fp8 and PLAIN_DTYPES[src.fmt.name] == dst.dtype


def load_tables(
    path: str,
    sources: dict[int, TableSource],
    tables: dict,
    chunk_rows: int = 1 << 16,
    chunk_bytes: int = CHUNK_BYTES,
    progress: bool = True,
) -> LoadStats:
    """Stream every ``sources[layer]`` into ``tables[layer]`` (a store ``Table``)."""
    total = sum(s.rows * s.row_bytes for s in sources.values())
    start = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        staging: torch.Tensor | None = None
        show = progress and sys.stderr.isatty()
        with tqdm(
            total=total, desc="loading Engram tables", unit="B", unit_scale=True, disable=not show
        ) as bar:
            for lid, src in sources.items():
                dst = tables[lid]
                step = max(1, min(chunk_rows, chunk_bytes // max(src.row_bytes, 1)))
                need = min(step, src.rows) * src.row_bytes
                if not direct(src, dst.tensor, dst.fp8) and (
                    staging is None or staging.numel() < need
                ):
                    staging = _staging(need, dst.tensor.device)
                for a in range(0, src.rows, step):
                    b = min(a + step, src.rows)
                    _load_rows(fd, src, dst, a, b, staging)
                    bar.update((b - a) * src.row_bytes)
    finally:
        os.close(fd)
    return LoadStats(total, time.perf_counter() - start)


def _staging(nbytes: int, device: torch.device) -> torch.Tensor:
    pin = device.type == "cuda"  # pinned: the copy to the device runs at the link's rate
    return torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=pin)


def _read(fd: int, src: TableSource, info: TensorInfo, a: int, b: int, into: torch.Tensor):
    per_row = info.nbytes // max(src.rows, 1)
    off, n = info.start + a * per_row, (b - a) * per_row
    pread_into(fd, byte_view(into)[:n], off, f"{info.name}, rows {a}..{b - 1}")
    drop_cache(fd, off, n)


def _load_rows(fd: int, src: TableSource, dst, a: int, b: int, staging) -> None:
    out = dst.tensor[a:b]
    if direct(src, dst.tensor, dst.fp8):
        _read(fd, src, src.values, a, b, out)
        return
    n = b - a
    vbytes = src.values.nbytes // max(src.rows, 1)
    vals = staging[: n * vbytes]
    _read(fd, src, src.values, a, b, vals)
    if src.fmt.name == "fp8":
        if src.scales is None:
            packed = vals.view(n, vbytes)
            out.copy_(packed if dst.fp8 else dequantize_fp8(packed, out.dtype))
            return
        sbytes = src.scales.nbytes // max(src.rows, 1)
        scales = staging[n * vbytes : n * (vbytes + sbytes)]
        _read(fd, src, src.scales, a, b, scales)
        v, s = vals.view(n, vbytes), scales.view(n, sbytes)
        if dst.fp8:  # our packed row: the value bytes, then the scale bytes
            out[:, :vbytes].copy_(v)
            out[:, vbytes:].copy_(s)
        else:
            out.copy_(dequantize_fp8(v, out.dtype, scales=s))
        return
    raw = vals.view(PLAIN_DTYPES[src.fmt.name]).view(n, src.fmt.values)
    if not dst.fp8:
        out.copy_(raw)
        return
    try:
        out.copy_(quantize_fp8(raw.to(torch.float32)))
    except ValueError as e:
        raise ValueError(f"{src.key}, rows {a}..{b - 1}: {e}") from None
