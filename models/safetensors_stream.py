"""Write a safetensors file tensor by tensor, chunk by chunk, so a table far larger than RAM
(engram-attach's 100B-parameter tables) is never held whole. The layout is the format's own:
an 8-byte little-endian header length, the JSON header (padded to 8 bytes), the raw data."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

_DTYPES = {
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.int64: "I64",
}


@dataclass
class StreamedTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    chunks: Callable[[], Iterator[torch.Tensor]]  # yields the rows in order, in ``dtype``

    @property
    def nbytes(self) -> int:
        n = torch.tensor([], dtype=self.dtype).element_size()
        for s in self.shape:
            n *= s
        return n


def write_streamed(path: str | Path, tensors: list[StreamedTensor], metadata=None) -> None:
    header, offset = {}, 0
    for t in tensors:
        header[t.name] = {
            "dtype": _DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    header["__metadata__"] = {"format": "pt", **(metadata or {})}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for t in tensors:
            written = 0
            for chunk in t.chunks():
                if chunk.dtype != t.dtype:
                    raise ValueError(f"{t.name}: chunk of {chunk.dtype}, declared {t.dtype}")
                data = chunk.contiguous().view(torch.uint8).numpy().tobytes()
                f.write(data)
                written += len(data)
            if written != t.nbytes:
                raise ValueError(f"{t.name}: wrote {written} bytes, declared {t.nbytes}")
