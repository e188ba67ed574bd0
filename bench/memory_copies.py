"""Engram memories made from a base checkpoint, as a fine-tune that leaves the backbone alone
would: every Engram tensor (tables, gate, projections, conv, norms) redrawn, the rest the
base's bytes. Works on this project's format and TinyEngram's alike."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from models.tinyengram import our_key


def make_memory(base: Path, out: Path, seed: int, backbone_change: str | None = None) -> Path:
    """``out``: a copy of ``base`` with new Engram tensors drawn from ``seed``;
    ``backbone_change``: a backbone tensor to perturb too (a checkpoint that is no memory)."""
    shutil.copytree(base, out)
    gen = torch.Generator().manual_seed(seed)
    for f in sorted(out.glob("*.safetensors")):
        tensors = load_file(str(f))
        for k, v in tensors.items():
            ours = our_key(k)
            if ".engram." in ours and not ours.endswith(".offsets") and v.is_floating_point():
                scale = 1.0 if "multi_head_embedding" in ours else 0.2
                tensors[k] = (torch.randn(v.shape, generator=gen) * scale).to(v.dtype)
            elif ours == backbone_change:
                tensors[k] = v + 0.01
        f.unlink()  # the copy may be a hard link: never write through to the base
        save_file(tensors, str(f), metadata={"format": "pt"})
    return out
