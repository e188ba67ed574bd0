"""Our own reader of a safetensors file's header, checked against the file before any byte of a
tensor is read.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON (tensor name ->
dtype, shape, data_offsets [begin, end) relative to the end of the header; optional
``__metadata__`` of strings), then the tensors' bytes. Loading Engram tables reads this header
and then each table's bytes with ``pread`` straight into the memory the table will live in
(``table_load``), so nothing maps the file and nothing trusts it: every tensor's offsets must
lie inside the file, match its dtype and shape, and not overlap another tensor. A file that
fails is refused with a :class:`TableFileError` whose one line names the file and the tensor.
Checkpoint loading reads tensor names through it too, so a bad file is refused at start-up
before safetensors' own loader (whose errors name no tensor) sees it.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

# bytes per element of every safetensors dtype (F8_E8M0: DeepSeek-V4.1's ue8m0 scales)
DTYPE_SIZES = {
    **{"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1},
    **{"I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1},
}
MAX_HEADER = 100 << 20  # the limit the safetensors format itself sets on the JSON header


class TableFileError(ValueError):
    """A table file that cannot be loaded: truncated, corrupt, or not what the config says."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute file offset of the first byte
    end: int  # absolute file offset one past the last byte

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def itemsize(self) -> int:
        return DTYPE_SIZES[self.dtype]


@dataclass(frozen=True)
class SafetensorsHeader:
    path: Path
    file_size: int
    data_start: int  # 8 + header length
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def __getitem__(self, name: str) -> TensorInfo:
        return self.tensors[name]


def read_header(path: str | Path) -> SafetensorsHeader:
    """The checked header of the safetensors file at ``path`` (TableFileError if it is bad)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise TableFileError(f"{path}: {size} bytes, too short for a safetensors file")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise TableFileError(
                    f"{path}: header length {n} does not fit in the file's {size} bytes "
                    "(truncated, or not a safetensors file)"
                )
            raw = f.read(n)
    except OSError as e:
        raise TableFileError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise TableFileError(f"{path}: header is not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise TableFileError(f"{path}: header is not a JSON object")
    meta = doc.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise TableFileError(f"{path}: __metadata__ must map names to strings")
    data_start = 8 + n
    tensors = {name: _tensor(path, name, d, data_start) for name, d in doc.items()}
    _check_spans(path, tensors, size)
    return SafetensorsHeader(path, size, data_start, tensors, dict(meta))


def _tensor(path: Path, name: str, d: object, data_start: int) -> TensorInfo:
    def bad(why: str) -> TableFileError:
        return TableFileError(f"{path}: tensor {name}: {why}")

    if not isinstance(d, dict):
        raise bad("entry is not an object")
    dtype, shape, offsets = d.get("dtype"), d.get("shape"), d.get("data_offsets")
    if dtype not in DTYPE_SIZES:
        raise bad(f"unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_count(s) for s in shape):
        raise bad(f"shape {shape!r} is not a list of non-negative integers")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_count(o) for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise bad(f"data_offsets {offsets!r} are not [begin, end] with begin <= end")
    want = math.prod(shape) * DTYPE_SIZES[dtype]
    if offsets[1] - offsets[0] != want:
        raise bad(
            f"{offsets[1] - offsets[0]} bytes in data_offsets, but {dtype} {shape} needs {want}"
        )
    start, end = data_start + offsets[0], data_start + offsets[1]
    return TensorInfo(name, dtype, tuple(shape), start, end)


def _is_count(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _check_spans(path: Path, tensors: dict[str, TensorInfo], size: int) -> None:
    """Every tensor inside the file (the first one cut off is named) and none overlapping."""
    spans = sorted(tensors.values(), key=lambda t: t.start)
    for t in spans:
        if t.end > size:
            raise TableFileError(
                f"{path}: tensor {t.name}: data ends at byte {t.end} but the file has {size} "
                "bytes (truncated?)"
            )
    spans = [t for t in spans if t.nbytes]
    for prev, cur in zip(spans, spans[1:]):
        if cur.start < prev.end:
            raise TableFileError(
                f"{path}: tensor {cur.name}: bytes {cur.start}..{cur.end} overlap tensor "
                f"{prev.name} ({prev.start}..{prev.end})"
            )
