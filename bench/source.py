"""The benchmarked model: its backbone loaded once, its Engram tables placed per row.

Tables are built lazily per placement (streamed from the checkpoint, or filled with seeded
random rows for a synthetic model), so every row sees the same weights and a tier's tables
can be dropped once no later row needs them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from models.checkpoint import default_model_dir, load_checkpoint
from models.llama import EngramForCausalLM
from offload.store import TableStore

from .synthetic import build_synthetic_model, random_store, synthetic_config


@dataclass
class ModelSource:
    """A model with unloaded (meta) tables, and a way to put its tables in any placement."""

    model: EngramForCausalLM
    description: str
    make_store: Callable[[str], TableStore]
    info: dict = field(default_factory=dict)
    _stores: dict[str, TableStore] = field(default_factory=dict)

    def store(self, placement: str) -> TableStore:
        if placement not in self._stores:
            self._stores[placement] = self.make_store(placement)
        return self._stores[placement]

    def drop(self, placement: str) -> None:
        if self._stores.pop(placement, None) is not None and torch.cuda.is_available():
            torch.cuda.empty_cache()

    def drop_all(self) -> None:
        for placement in list(self._stores):
            self.drop(placement)


def checkpoint_source(
    directory: Path, dtype: str, device: torch.device, progress: bool
) -> ModelSource:
    model, _ = load_checkpoint(directory, dtype=dtype, device=device, load_tables=False)

    def make(placement: str) -> TableStore:
        return TableStore.from_checkpoint(
            directory, model.config.engram_layer_ids, placement, device, progress
        )

    # Reports name the built-in model as such, not by where this install put it.
    builtin = Path(directory).resolve() == default_model_dir()
    name = "built-in model (models/default)" if builtin else str(directory)
    return ModelSource(model, f"checkpoint {name}", make, {"model_dir": name})


def synthetic_source(
    name: str,
    engram_params: float,
    layers: int | None,
    dtype: str,
    device: torch.device,
    seed: int,
    progress: bool,
) -> ModelSource:
    config = synthetic_config(name, engram_params, layers)
    model = build_synthetic_model(config, device, getattr(torch, dtype), seed)

    def make(placement: str) -> TableStore:
        return random_store(model, placement, device, torch.bfloat16, seed, progress)

    return ModelSource(model, f"synthetic {name}", make, {"synthetic": name})
