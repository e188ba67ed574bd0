"""A model whose Engram tables live in a :class:`TableStore` tier, fed each step by a
prefetcher, with every step booked by an :class:`Accountant`.

    om = OffloadedModel.load("path/to/checkpoint", placement="host", gather="uva")
    engine = Engine(om.model, EngineConfig(), rows=om.prefetcher, tokenizer=om.tokenizer)

Row formats: tables load as stored (bf16, or fp8 from ``engram-quantize``) or are quantised
while loading (``row_format="fp8"``); fp8 rows come back dequantised to the model's dtype.
"""

from __future__ import annotations

import logging
import resource
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from models.checkpoint import default_model_dir, load_checkpoint, table_files
from models.dtype import Dtype, resolve_dtype, stored_dtype
from models.llama import EngramForCausalLM
from models.tokenizer import EngramTokenizer

from .accounting import Accountant
from .file_gather import FileTierGather
from .file_tier import FileTier, choose_tier, open_file_tier, table_bytes
from .hot_rows import HotRows, HotSettings, warm_file_tier, with_hot_cache
from .paths import make_prefetcher, resolve
from .prefetch import Prefetcher
from .rowformat import quantize_fp8
from .shared_tables import SharedTables
from .store import ROW_FORMATS, Placement, TableStore

log = logging.getLogger("engram.offload")


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def merged(stores: list[TableStore]) -> TableStore:
    """One store over the tables of several of one placement (mixed placement: DRAM caches
    of file-tier layers beside host-resident tables)."""
    tables = {lid: t for s in stores for lid, t in s.tables.items()}
    out = TableStore(dict(sorted(tables.items())), stores[0].placement, stores[0].huge_pages)
    out.load_stats = next((s.load_stats for s in stores if s.load_stats is not None), None)
    return out


@dataclass
class OffloadedModel:
    model: EngramForCausalLM
    tokenizer: EngramTokenizer | None
    store: TableStore
    prefetcher: Prefetcher
    device: torch.device
    dtype: Dtype | None = None  # the backbone's dtype and why (None: built from a model)
    owns_store: bool = False  # close() releases the tables (not a store shared with others)
    file_tier: FileTier | None = None  # set when the tables are served from their file

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

    def tier_bytes(self) -> dict[str, int]:
        """Table bytes per tier; with the file tier, 'file' is the tables in the file and the
        host tier holds their DRAM caches."""
        out = self.store.bytes_by_tier()
        if self.file_tier is not None:
            out["file"] = self.file_tier.file_bytes
        return out

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
        shared: SharedTables | None = None,
        host_memory_bytes: int = 0,
        file_threads: int = 8,
        hot: HotSettings | None = None,
        loaded: tuple[EngramForCausalLM, EngramTokenizer | None] | None = None,
        file_layers: list[int] | None = None,
        file_io: str = "auto",
    ) -> OffloadedModel:
        """``dtype``: 'auto' (see models/dtype.py) or a dtype name;
        ``row_format``: 'auto' (as stored), 'fp8' (quantise at load), 'bf16'/'f16'/'f32';
        ``huge_pages``: back host tables with 2 MiB pages where the OS allows;
        ``host_threads``: the staged path's host gather threads (None: from the core count);
        ``hot``: a hot-row cache per layer on the compute device (offload/hot_rows.py);
        ``phase(name)``: a context manager around each stage (the server times its start-up
        and stops between stages on shutdown); ``shared``: host tables shared on the node;
        ``host_memory_bytes``: the host budget for tables; larger tables (or
        ``placement='file'``) stay in the file behind a DRAM cache of that size, read by
        ``file_threads`` threads or io_uring (``file_io``: offload/row_reader.py's FILE_IO; see
        offload/file_tier.py); ``file_layers``: mixed placement,
        only these layers' tables stay in the file (behind a DRAM cache of
        ``host_memory_bytes``), the others are loaded whole into ``placement``; ``loaded``:
        the checkpoint's model (tables unloaded) and tokenizer, already read (an Engram
        memory's, engine/memories.py): only its tables are placed here."""
        phase = phase or (lambda name: nullcontext())
        asked = placement
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
            model, tok = loaded or load_checkpoint(
                model_dir, dtype=chosen.dtype, device=device, load_tables=False
            )
        weights = sum(p.numel() * p.element_size() for p in model.parameters() if not p.is_meta)
        log.info(
            "weights: %.2f GiB (%s); peak RSS so far %.2f GiB",
            weights / 2**30,
            chosen.name,
            peak_rss_bytes() / 2**30,
        )
        lids = model.config.engram_layer_ids
        files = table_files(model_dir, lids)
        sizes = {
            lid: n for path, keys in files.items() for lid, n in table_bytes(path, keys).items()
        }
        if file_layers:
            file_lids = sorted(set(file_layers))
            if not set(file_lids) <= set(lids) or host_memory_bytes < 1:
                raise ValueError(
                    f"file layers {file_lids}: each must be an Engram layer ({lids}), and their "
                    "DRAM cache needs --host-memory-bytes"
                )
            why = f"layers {file_lids} stay in the file, DRAM cache {host_memory_bytes} bytes"
        else:
            use_file, why = choose_tier(asked, sizes, host_memory_bytes)
            file_lids = lids if use_file else []
        log.info("Engram tables: %s", why)
        host_lids = [lid for lid in lids if lid not in file_lids]
        tier = None
        if file_lids and row_format != "auto":
            raise ValueError("the file tier serves rows as stored: use --row-format auto")
        in_file = table_files(model_dir, file_lids) if file_lids else {}
        if len(in_file) > 1:
            raise ValueError(
                "the file tier reads the tables from one file; this checkpoint keeps them in "
                f"{len(in_file)} (TinyEngram shards): raise --host-memory-bytes to hold them"
            )
        kind = "file tier" if file_lids else "read + place"
        with phase(f"tables ({kind} in {placement.value})"):
            stores = []
            if file_lids:
                ((tables_file, keys),) = in_file.items()
                cache, tier = open_file_tier(
                    tables_file,
                    keys,
                    host_memory_bytes,
                    placement,
                    device,
                    chosen.dtype,
                    file_threads,
                    huge_pages,
                    file_io=file_io,
                )
                stores.append(cache)
            if host_lids or not file_lids:  # (a backbone without Engram layers: no tables)
                stores.append(
                    TableStore.from_checkpoint(
                        model_dir,
                        host_lids,
                        placement,
                        device,
                        progress,
                        row_format=row_format,
                        row_dtype=chosen.dtype,
                        huge_pages=huge_pages,
                        shared=shared,
                    )
                )
            store = stores[0] if len(stores) == 1 else merged(stores)
        with phase(f"gather setup ({gather})"):
            om = cls.from_parts(model, tok, store, gather, device, dedup, timeout_s, host_threads)
            if tier is not None:
                om.prefetcher = FileTierGather(om.prefetcher, tier)
                om.file_tier = tier
        if tier is not None and hot is not None:
            with phase("DRAM cache warm start"):
                try:
                    placed = warm_file_tier(tier, hot.with_default_file(model_dir))
                except BaseException:
                    om.close()
                    raise
                if placed:
                    log.info("DRAM cache warmed from the profile: %s rows per layer", placed)
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
