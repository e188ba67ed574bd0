"""The backbone dtype of a run: ``--dtype auto`` resolved from the device and the checkpoint.

``auto`` (the default everywhere) is what vLLM does with a checkpoint's dtype, for this
project's kernels: on CUDA the checkpoint's half precision, bfloat16 for a float32 or bfloat16
checkpoint and float16 for a float16 one (float16 also where the GPU has no bfloat16, before
compute capability 8.0); float32 on a CPU, where half-precision matmuls are slow and the
reference tests run. Any other value is taken as asked.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from .checkpoint import DTYPES, CheckpointError, parse_dtype, weight_files

AUTO = "auto"
CHOICES = (AUTO, *DTYPES)
_SAFETENSORS = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
_NAMES = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class Dtype:
    """The dtype a run uses and why (for the start-up log)."""

    dtype: torch.dtype
    why: str

    @property
    def name(self) -> str:
        return _NAMES[self.dtype]

    def __str__(self) -> str:
        return f"{self.name} ({self.why})"


def stored_dtype(directory: str | Path) -> torch.dtype | None:
    """The checkpoint's floating-point dtype: config.json's ``torch_dtype`` (Hugging Face;
    ``dtype`` since transformers 5) when it names one, else the most common dtype among the
    weight files' floating tensors (read from the headers; no tensor is loaded). None when
    neither says."""
    directory = Path(directory)
    try:
        data = json.loads((directory / "config.json").read_text())
        named = data.get("torch_dtype") or data.get("dtype")
    except (OSError, ValueError, AttributeError):
        named = None
    if isinstance(named, str) and named in DTYPES:
        return DTYPES[named]
    try:
        files = weight_files(directory)
    except CheckpointError:
        return None
    found = Counter()
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            found.update(_SAFETENSORS.get(f.get_slice(k).get_dtype()) for k in f.keys())
    found.pop(None, None)
    return found.most_common(1)[0][0] if found else None


def _has_bf16(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device)[0] >= 8


def resolve_dtype(
    requested: str | torch.dtype,
    device: torch.device | str,
    stored: torch.dtype | None,
    has_bf16: bool | None = None,
) -> Dtype:
    """The dtype to run: ``requested`` as given, or for ``auto`` from the device and the
    checkpoint's ``stored`` dtype (None: unknown, e.g. a synthetic model). ``has_bf16``:
    whether the GPU computes in bfloat16 (None: ask the device)."""
    device = torch.device(device)
    if requested != AUTO:
        dtype = parse_dtype(requested)
        return Dtype(dtype, f"--dtype {_NAMES[dtype]}")
    if device.type != "cuda":
        return Dtype(torch.float32, f"--dtype auto on {device.type}")
    what = f"checkpoint {_NAMES[stored]}" if stored in _NAMES else "checkpoint dtype unknown"
    if has_bf16 is None:
        has_bf16 = _has_bf16(device)
    if stored == torch.float16 or not has_bf16:
        return Dtype(torch.float16, f"--dtype auto on CUDA, {what}")
    return Dtype(torch.bfloat16, f"--dtype auto on CUDA, {what}")
