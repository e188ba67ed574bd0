"""A model whose Engram tables live in a :class:`TableStore` tier, fed each step by a
prefetcher, with every step booked by an :class:`Accountant`.

    om = OffloadedModel.load("path/to/checkpoint", placement="host", gather="uva")
    engine = Engine(om.model, EngineConfig(), rows=om.prefetcher, tokenizer=om.tokenizer)

Row formats: tables load as stored (bf16, or fp8 from ``engram-quantize``) or are quantised
while loading (``row_format="fp8"``); fp8 rows come back dequantised to the model's dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from models.checkpoint import default_model_dir, load_checkpoint
from models.dtype import Dtype, resolve_dtype, stored_dtype
from models.llama import EngramForCausalLM
from models.tokenizer import EngramTokenizer

from .accounting import Accountant
from .hot_rows import HotRows, HotSettings, with_hot_cache
from .paths import make_prefetcher, resolve
from .prefetch import Prefetcher
from .rowformat import quantize_fp8
from .store import ROW_FORMATS, Placement, TableStore


@dataclass
class OffloadedModel:
    model: EngramForCausalLM
    tokenizer: EngramTokenizer | None
    store: TableStore
    prefetcher: Prefetcher
    device: torch.device
    dtype: Dtype | None = None  # the backbone's dtype and why (None: built from a model)
    owns_store: bool = False  # close() releases the tables (not a store shared with others)

    @property
    def accountant(self) -> Accountant:
        return self.prefetcher.accountant

    @property
    def placement(self) -> Placement:
        return self.store.placement

    @property
    def hot(self) -> HotRows | None:
        """The hot-row caches in front of the tier, if any."""
        return self.prefetcher if isinstance(self.prefetcher, HotRows) else None

    @property
    def gather(self) -> str:
        return self.prefetcher.name

    def close(self) -> None:
        """Stop the prefetcher, then release the tables' host memory (pinned: unregistered)."""
        self.prefetcher.close()
        if self.owns_store:
            self.store.close()

    @classmethod
    def load(
        cls,
        model_dir: str | Path | None = None,
        placement: str | Placement | None = None,
        gather: str = "auto",
        device: str | torch.device | None = None,
        dtype: str = "auto",
        dedup: bool = False,
        timeout_s: float = 60.0,
        progress: bool = True,
        row_format: str = "auto",
        huge_pages: bool = True,
        host_threads: int | None = None,
        phase: Callable[[str], AbstractContextManager] | None = None,
        hot: HotSettings | None = None,
    ) -> OffloadedModel:
        """``dtype``: 'auto' (see models/dtype.py) or a dtype name;
        ``row_format``: 'auto' (as stored), 'fp8' (quantise at load), 'bf16'/'f16'/'f32';
        ``huge_pages``: back host tables with 2 MiB pages where the OS allows;
        ``host_threads``: the staged path's host gather threads (None: from the core count);
        ``hot``: a hot-row cache per layer on the compute device (offload/hot_rows.py);
        ``phase(name)``: a context manager around each stage (the server times its start-up
        and stops between stages on shutdown)."""
        phase = phase or (lambda name: nullcontext())
        path = resolve(device, placement, gather)  # refuse before loading anything
        device, placement, gather = path.device, path.placement, path.gather
        if row_format not in ROW_FORMATS:
            raise ValueError(
                f"unknown row format {row_format!r}; use one of {', '.join(ROW_FORMATS)}"
            )
        model_dir = Path(model_dir) if model_dir else default_model_dir()
        chosen = resolve_dtype(dtype, device, stored_dtype(model_dir))
        with phase("device init"):
            if device.type == "cuda":
                if device.index is not None:  # this (loading) thread's kernels and events
                    torch.cuda.set_device(device)
                torch.empty(1, device=device)  # the CUDA context
        with phase("weights"):
            model, tok = load_checkpoint(
                model_dir, dtype=chosen.dtype, device=device, load_tables=False
            )
        with phase(f"tables (read + place in {placement.value})"):
            store = TableStore.from_checkpoint(
                model_dir,
                model.config.engram_layer_ids,
                placement,
                device,
                progress,
                row_format=row_format,
                row_dtype=chosen.dtype,
                huge_pages=huge_pages,
            )
        with phase(f"gather setup ({gather})"):
            om = cls.from_parts(model, tok, store, gather, device, dedup, timeout_s, host_threads)
        om.dtype, om.owns_store = chosen, True
        if hot is not None and hot.rows not in (0, "0"):
            with phase("hot-row cache"):
                try:
                    om.prefetcher = with_hot_cache(om.prefetcher, hot.with_default_file(model_dir))
                except BaseException:
                    om.close()
                    raise
        return om

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
        host_threads: int | None = None,
    ) -> OffloadedModel:
        device = torch.device(device)
        prefetcher = make_prefetcher(
            store, gather, device, dedup, Accountant(), timeout_s, host_threads=host_threads
        )
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
        row_format: str = "auto",
        huge_pages: bool = True,
        host_threads: int | None = None,
    ) -> OffloadedModel:
        """Move an in-memory model's tables into a store (tests, synthetic benchmarks).
        ``row_format='fp8'`` quantises them (dequantised to ``dtype``, default the tables')."""
        device = torch.device(device)
        if row_format not in ("auto", "fp8"):
            raise ValueError(f"from_model takes row_format 'auto' or 'fp8', got {row_format!r}")
        shapes = {
            lid: tuple(model.engram_table(lid).shape) for lid in model.config.engram_layer_ids
        }
        first = model.engram_table(model.config.engram_layer_ids[0])
        fp8 = row_format == "fp8"
        store = TableStore.allocate(
            shapes, dtype or first.dtype, placement, device, fp8=fp8, huge_pages=huge_pages
        )
        for lid in shapes:
            rows = model.engram_table(lid).detach()
            store[lid].tensor.copy_(quantize_fp8(rows.float().cpu()) if fp8 else rows)
        om = cls.from_parts(model, None, store, gather, device, dedup, timeout_s, host_threads)
        om.owns_store = True
        return om
