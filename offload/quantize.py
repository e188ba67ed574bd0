"""engram-quantize: copy a checkpoint with its Engram tables stored as FP8 rows.

The copy has the same config.json, model.safetensors and tokenizer.json; engram.safetensors
holds each table under its own name as FP8 e4m3 with ue8m0 scales (``rowformat``): packed,
one uint8 row of W + W/32 bytes per table row; split, float8_e4m3fn values under the table's
name and the scales under ``<name>.scales``. The file's metadata records every table's row
format under ``engram.row_formats`` (JSON), which ``read_row_formats`` reads back.

Tables stream through in chunks of rows and the output file is written as it goes, so memory
holds one chunk, never a whole table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from models.safetensors_header import DTYPE_SIZES, read_header

from .rowformat import ROW_FORMATS_KEY, RowFormat, quantize_fp8
from .table_load import row_formats

COPIED = ("config.json", "model.safetensors", "tokenizer.json")
ENGRAM_FILE = "engram.safetensors"
_ST_FLOAT = {"F32", "BF16", "F16"}


def read_row_formats(path: str | Path) -> dict[str, RowFormat]:
    """Row formats of the tables in a safetensors file: those recorded by engram-quantize, and
    for every other 2-D bf16/f16/f32 tensor its plain format."""
    return row_formats(read_header(path))


def quantize_table_file(
    src: str | Path,
    dst: str | Path,
    keys: list[str] | None = None,
    packed: bool = True,
    chunk_rows: int = 1 << 16,
) -> dict[str, RowFormat]:
    """Write ``dst``: ``src`` with the tables ``keys`` (default: every 2-D float tensor) as FP8
    rows; other tensors are copied byte for byte. Returns the tables' row formats."""
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be at least 1, got {chunk_rows}")
    if Path(src).resolve() == Path(dst).resolve():
        raise ValueError(f"{dst} is the file being read; write the quantised copy elsewhere")
    with safe_open(str(src), framework="pt") as f:
        names = list(f.keys())
        slices = {k: f.get_slice(k) for k in names}
        if keys is None:
            keys = [
                k
                for k in names
                if len(slices[k].get_shape()) == 2 and slices[k].get_dtype() in _ST_FLOAT
            ]
        missing = sorted(set(keys) - set(names))
        if missing:
            raise ValueError(f"{src} has no table {missing[0]}; check the config's Engram layers")
        formats, specs = {}, []
        for k in names:
            sl = slices[k]
            shape, dtype = list(sl.get_shape()), sl.get_dtype()
            if k not in keys:
                if dtype not in DTYPE_SIZES:
                    raise ValueError(f"{k} in {src} has dtype {dtype}, which this tool cannot copy")
                specs.append((k, dtype, shape, _raw_chunks(f, k, shape, chunk_rows)))
                continue
            if len(shape) != 2 or dtype not in _ST_FLOAT:
                raise ValueError(f"{k} in {src} is {dtype} {shape}, not a 2-D float table")
            try:
                fmt = RowFormat("fp8", shape[1], packed)
            except ValueError as e:
                raise ValueError(f"{k}: {e}") from None
            formats[k] = fmt
            rows = shape[0]
            if packed:
                specs.append((k, "U8", [rows, fmt.row_bytes], _fp8_chunks(k, sl, rows, chunk_rows)))
            else:  # the scales are quantised again in a second pass: memory stays one chunk
                values = _fp8_chunks(k, sl, rows, chunk_rows, part=0)
                specs.append((k, "F8_E4M3", [rows, fmt.values], values))
                scales = _fp8_chunks(k, sl, rows, chunk_rows, part=1)
                specs.append((f"{k}.scales", "U8", [rows, fmt.groups], scales))
        meta = {
            "format": "pt",
            ROW_FORMATS_KEY: json.dumps({k: v.to_dict() for k, v in formats.items()}),
        }
        write_safetensors(dst, specs, meta)
    return formats


def _raw_chunks(f, key: str, shape: list[int], chunk_rows: int) -> Iterator[bytes]:
    if not shape or shape[0] <= chunk_rows:
        yield _as_bytes(f.get_tensor(key))
        return
    sl = f.get_slice(key)
    for a in range(0, shape[0], chunk_rows):
        yield _as_bytes(sl[a : a + chunk_rows])


def _fp8_chunks(
    key: str, sl, rows: int, chunk_rows: int, part: int | None = None
) -> Iterator[bytes]:
    for a in range(0, rows, chunk_rows):
        x = sl[a : a + chunk_rows].to(torch.float32)
        try:
            q = quantize_fp8(x, packed=part is None)
        except ValueError as e:
            raise ValueError(f"{key}, rows {a}..{a + x.shape[0] - 1}: {e}") from None
        yield _as_bytes(q if part is None else q[part])


def _as_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def write_safetensors(
    path: str | Path,
    specs: list[tuple[str, str, list[int], Iterator[bytes]]],
    metadata: dict[str, str],
) -> None:
    """A safetensors file written tensor by tensor from byte chunks (name, dtype, shape,
    chunks), so no tensor needs to be whole in memory."""
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name, dtype, shape, _ in specs:
        n = DTYPE_SIZES[dtype]
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    partial = Path(f"{path}.partial")  # renamed when complete: never a truncated file
    try:
        with open(partial, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for name, _, _, chunks in specs:
                want = header[name]["data_offsets"][1] - header[name]["data_offsets"][0]
                got = 0
                for chunk in chunks:
                    f.write(chunk)
                    got += len(chunk)
                if got != want:
                    raise RuntimeError(f"{name}: wrote {got} bytes, expected {want}")
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def quantize_checkpoint(model_dir: str | Path, out_dir: str | Path, packed: bool = True) -> dict:
    """Copy a checkpoint directory with FP8 Engram tables; returns the tables' row formats."""
    from models.checkpoint import table_key

    src, dst = Path(model_dir), Path(out_dir)
    if not (src / "config.json").is_file():
        raise ValueError(f"{src} is not a checkpoint directory (no config.json); check --model")
    if not (src / ENGRAM_FILE).is_file():
        raise ValueError(f"{src} has no {ENGRAM_FILE}: nothing to quantise")
    if dst.exists() and (dst.resolve() == src.resolve() or any(dst.iterdir())):
        raise ValueError(f"output directory {dst} is not empty; choose a new --out")
    try:
        layer_ids = json.loads((src / "config.json").read_text())["engram_layer_ids"]
    except (ValueError, KeyError) as e:
        raise ValueError(f"{src}/config.json has no readable engram_layer_ids ({e})") from None
    created = not dst.exists()
    dst.mkdir(parents=True, exist_ok=True)
    try:
        keys = [table_key(lid) for lid in layer_ids]
        formats = quantize_table_file(src / ENGRAM_FILE, dst / ENGRAM_FILE, keys, packed=packed)
        for name in COPIED:
            if (src / name).is_file():
                shutil.copy2(src / name, dst / name)
    except BaseException:  # leave no half-written checkpoint behind (dst was new or empty)
        if created:
            shutil.rmtree(dst, ignore_errors=True)
        else:
            for p in dst.iterdir():
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        raise
    return formats


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="engram-quantize", description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="checkpoint directory to read")
    ap.add_argument("--out", required=True, help="new directory for the quantised copy")
    ap.add_argument(
        "--layout",
        choices=("packed", "split"),
        default="packed",
        help="packed: scales at the end of each row (one read per row); split: separate tensors",
    )
    args = ap.parse_args(argv)
    try:
        formats = quantize_checkpoint(args.model, args.out, packed=args.layout == "packed")
    except (OSError, ValueError) as e:
        ap.error(str(e))
    for key, fmt in formats.items():
        print(f"{key}: fp8, {fmt.values} values, {fmt.row_bytes} bytes per row ({args.layout})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
