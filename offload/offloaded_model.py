"""A model whose Engram tables live in a :class:`TableStore` tier, fed each step by a
prefetcher, with every step booked by an :class:`Accountant`.

    om = OffloadedModel.load("path/to/checkpoint", placement="host", gather="uva")
    engine = Engine(om.model, EngineConfig(), rows=om.prefetcher, tokenizer=om.tokenizer)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from models.checkpoint import default_model_dir, load_checkpoint
from models.llama import EngramForCausalLM
from models.tokenizer import EngramTokenizer

from .accounting import Accountant
from .paths import make_prefetcher, resolve
from .prefetch import Prefetcher
from .store import Placement, TableStore


@dataclass
class OffloadedModel:
    model: EngramForCausalLM
    tokenizer: EngramTokenizer | None
    store: TableStore
    prefetcher: Prefetcher
    device: torch.device

    @property
    def accountant(self) -> Accountant:
        return self.prefetcher.accountant

    @property
    def placement(self) -> Placement:
        return self.store.placement

    @property
    def gather(self) -> str:
        return self.prefetcher.name

    def close(self) -> None:
        self.prefetcher.close()

    @classmethod
    def load(
        cls,
        model_dir: str | Path | None = None,
        placement: str | Placement | None = None,
        gather: str = "auto",
        device: str | torch.device | None = None,
        dtype: str = "float32",
        dedup: bool = False,
        timeout_s: float = 60.0,
        progress: bool = True,
    ) -> OffloadedModel:
        path = resolve(device, placement, gather)  # refuse before loading anything
        device, placement, gather = path.device, path.placement, path.gather
        model_dir = Path(model_dir) if model_dir else default_model_dir()
        model, tok = load_checkpoint(model_dir, dtype=dtype, device=device, load_tables=False)
        store = TableStore.from_checkpoint(
            model_dir, model.config.engram_layer_ids, placement, device, progress
        )
        return cls.from_parts(model, tok, store, gather, device, dedup, timeout_s)

    @classmethod
    def from_parts(
        cls,
        model: EngramForCausalLM,
        tokenizer: EngramTokenizer | None,
        store: TableStore,
        gather: str,
        device: torch.device | str,
        dedup: bool = False,
        timeout_s: float = 60.0,
    ) -> OffloadedModel:
        device = torch.device(device)
        prefetcher = make_prefetcher(store, gather, device, dedup, Accountant(), timeout_s)
        return cls(model, tokenizer, store, prefetcher, device)

    @classmethod
    def from_model(
        cls,
        model: EngramForCausalLM,
        placement: str | Placement,
        gather: str = "auto",
        device: str | torch.device = "cpu",
        dedup: bool = False,
        dtype: torch.dtype | None = None,
        timeout_s: float = 60.0,
    ) -> OffloadedModel:
        """Move an in-memory model's tables into a store (tests, synthetic benchmarks)."""
        device = torch.device(device)
        shapes = {
            lid: tuple(model.engram_table(lid).shape) for lid in model.config.engram_layer_ids
        }
        first = model.engram_table(model.config.engram_layer_ids[0])
        store = TableStore.allocate(shapes, dtype or first.dtype, placement, device)
        for lid in shapes:
            store[lid].tensor.copy_(model.engram_table(lid).detach())
        return cls.from_parts(model, None, store, gather, device, dedup, timeout_s)
