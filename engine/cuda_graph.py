"""Decode steps replayed from CUDA graphs, captured per batch-size bucket and split at the
Engram layers.

A decode step (one new token per sequence) is padded to the next bucket (1, 2, 4, ... up to
max_num_seqs). Its inputs land, with one copy, in the bucket's fixed device buffer; the
graphs read them there (with overlap, step N's tokens are written in after that copy, on the
device: :mod:`engine.graph_inputs`). Its block tables are not in that copy: the step carries
the table writes since the step before, applied to the device-side per-slot tables
(:mod:`engine.block_tables`, shared with eager steps), and one gather by slot fills the
bucket's fixed ``[bucket, max_blocks]`` tables, outside the graphs; the host's work stays
O(batch), not O(batch x the model's context). The forward pass is cut into pieces at the
Engram layers:

    piece 0:  embedding, layers [0, e1)
    piece k:  layers [e_k, e_k+1)        (layer e_k starts with its Engram module)
    last:     layers [e_n, L), final norm, lm_head -> the bucket's logits

Before piece k, outside any graph, the compute stream waits for layer e_k's rows (the
prefetcher's event: the step's only synchronisation point, so the stall stays measured per
layer) and they are copied into the layer's fixed row buffer. Padding rows write nothing
(slot -1), read the KV cache's spare conv slot, and attend over nothing (context 0).

Without CUDA the same buffers and pieces run eagerly (``capture=False``): the CPU tests
check this path against the plain forward pass.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from models.engram import ConvStep
from models.llama import EngramForCausalLM
from offload.plan import LookupPlan
from offload.prefetch import PendingRows, Prefetcher

from . import paged_attention
from .attention import write_kv
from .block_tables import DeviceTables
from .fused import store_rows
from .inputs import Uploader, aligned, check_slots
from .kv_cache import KVCache, blocks_for
from .sequence import Sequence

log = logging.getLogger("engram.graphs")


def bucket_sizes(max_batch: int) -> list[int]:
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    return sizes + [max_batch]


@dataclass
class _Bucket:
    size: int
    buffer: torch.Tensor  # uint8: the step's upload lands here
    views: dict[str, torch.Tensor]  # the static inputs, fixed addresses inside ``buffer``
    conv_step: ConvStep | None
    graphs: list = field(default_factory=list)  # one CUDAGraph per piece (empty: eager)


class _GraphStep:
    """The :class:`models.llama.StepContext` of a padded decode step (static tensors only)."""

    def __init__(self, owner: DecodeGraphs, bucket: _Bucket) -> None:
        self.owner, self.v = owner, bucket.views
        self.positions, self.conv_step = self.v["positions"], bucket.conv_step
        self.size = bucket.size

    def attend(self, layer: int, q, k, v):
        o, cache = self.owner, self.owner.cache
        write_kv(cache, layer, self.v["slot_mapping"], k, v, kernel=True)
        return paged_attention.paged_attention_decode(
            q,
            cache.k[layer],
            cache.v[layer],
            self.v["block_tables"],
            self.v["context_lens"],
            cache.block_size,
            o.scale,
        )

    def engram_rows(self, layer: int) -> torch.Tensor:
        return self.owner.rows[layer][: self.size]

    def engram_groups(self, layer: int) -> None:
        return None  # a graph replays the served model's own memory only

    def conv_history(self, layer: int) -> torch.Tensor:
        return self.owner.cache.conv[layer][self.v["conv_slots"]]

    def set_conv_history(self, layer: int, history: torch.Tensor) -> None:
        store_rows(self.owner.cache.conv[layer], self.v["conv_write"], history)


class DecodeGraphs:
    def __init__(
        self,
        model: EngramForCausalLM,
        cache: KVCache,
        uploader: Uploader,
        tables: DeviceTables,
        max_batch: int,
        capture: bool,
    ) -> None:
        self.model, self.cache, self.uploader, self.tables = model, cache, uploader, tables
        self.capture = capture and cache.device.type == "cuda"
        mc, dev = model.config, cache.device
        self.scale = mc.head_dim**-0.5
        self.max_blocks = blocks_for(mc.max_position_embeddings, cache.block_size)
        tables.widen(self.max_blocks)  # every bucket's gather reads this wide
        self.engram = sorted(mc.engram_layer_ids)
        edges = [0, *[e for e in self.engram if e > 0], mc.num_hidden_layers]
        self.pieces = list(zip(edges[:-1], edges[1:]))  # layer ranges
        if self.engram and self.engram[0] == 0:
            self.pieces.insert(0, (0, 0))  # embedding alone, then layer 0 with its rows
        self.buckets_sizes = bucket_sizes(max_batch)
        top = self.buckets_sizes[-1]
        dtype = model.lm_head.weight.dtype
        self.hidden = torch.zeros(top, mc.hidden_size, dtype=dtype, device=dev)
        self.logits = torch.zeros(top, mc.vocab_size, dtype=dtype, device=dev)
        # rows in the model's dtype: the Engram module casts them to it anyway (exactly)
        shape = (top, mc.engram_total_heads, mc.engram_head_dim)
        self.rows = {lid: torch.zeros(shape, dtype=dtype, device=dev) for lid in self.engram}
        # room for the dynamic tail of an upload: per layer up to four int64 index arrays of at
        # most one entry per (token, head), each 16-byte aligned (fetch, and inverse or
        # positions; behind a hot-row cache also hot_slots and hot_order, offload/hot_rows.py);
        # with step N's tokens on the device, per layer the host-known rows and partials, and
        # the placeholders' positions (engine/graph_inputs.py); the step's table writes (at
        # most ``top``, :meth:`fits`)
        per_layer = 4 * aligned(8 * top * mc.engram_total_heads)
        self.index_bytes = len(self.engram) * per_layer + 4 * aligned(8 * top)
        self.buckets = {b: self._bucket(b) for b in self.buckets_sizes}
        self.pool = None
        self.steps = 0  # decode steps served from the static buffers
        if self.capture:
            self._capture_all()

    # --- buffers -------------------------------------------------------------------------------
    def _padded(
        self,
        size: int,
        seqs: list[Sequence],
        new_ids: list[list[int]],
        pos: np.ndarray | None = None,
        slots: np.ndarray | None = None,
    ) -> dict:
        """The static inputs of a step, padded to ``size`` rows (no sequences: all padding).
        ``pos``, ``slots``: the sequences' cached tokens before the step and KV slots, when
        the caller has them."""
        bs, n = self.cache.block_size, len(seqs)
        if pos is None:
            pos = np.fromiter((s.num_computed for s in seqs), np.int64, n)
        if slots is None:
            slots = np.fromiter((s.slot for s in seqs), np.int64, n)
        check_slots(slots)
        pad = lambda a, fill, dtype=np.int64: np.concatenate(
            [a.astype(dtype), np.full(size - n, fill, dtype=dtype)]
        )
        # the new token's block, read from the host's tables (reserved before packing)
        block = self.cache.tables[slots, pos // bs].astype(np.int64)
        return {
            "input_ids": pad(np.fromiter((x[0] for x in new_ids), np.int64, n), 0),
            "positions": pad(pos, 0),
            # padding writes nothing (slot -1), reads the spare conv slot (its block table
            # too: never written, all block 0), attends over nothing
            "slot_mapping": pad(block * bs + pos % bs, -1),
            "context_lens": pad(pos + 1, 0, np.int32),
            "conv_slots": pad(slots, self.cache.pad_conv_slot),
            "conv_write": pad(slots, -1),
        }

    def _bucket(self, size: int) -> _Bucket:
        parts = self._padded(size, [], [])
        static = sum(aligned(a.nbytes) for a in parts.values())
        buffer = torch.zeros(static + self.index_bytes, dtype=torch.uint8, device=self.cache.device)
        views = self.uploader.upload(parts, into=buffer)  # all padding: a valid no-op step
        views["block_tables"] = torch.zeros(
            (size, self.max_blocks), dtype=torch.int32, device=self.cache.device
        )
        conv = None
        if self.cache.conv:
            cfg = self.model.config
            conv = ConvStep.build(
                [1] * size, cfg.engram_kernel_size, cfg.engram_max_ngram_size, self.cache.device
            )
        return _Bucket(size, buffer, views, conv)

    def bucket_for(self, batch: int) -> int | None:
        return next((b for b in self.buckets_sizes if b >= batch), None)

    def fits(self, new_ids: list[list[int]], all_logits: bool, writes: int = 0) -> bool:
        """A decode step that a bucket takes; ``writes``: the table writes it carries (a
        decode step starts at most one block per sequence; a step after a failed one resends
        every table, which an eager step carries)."""
        return (
            not all_logits
            and self.bucket_for(len(new_ids)) is not None
            and writes <= self.buckets_sizes[-1]
            and all(len(x) == 1 for x in new_ids)
        )

    # --- the pieces ----------------------------------------------------------------------------
    def _run_piece(self, k: int, bucket: _Bucket) -> None:
        model, ctx, n = self.model, _GraphStep(self, bucket), bucket.size
        start, end = self.pieces[k]
        if k == 0:
            h = model.model.embed_tokens(bucket.views["input_ids"])
        else:
            h = self.hidden[:n]
        cos, sin = model.rope(ctx.positions)
        for i in range(start, end):
            h = model.layer_step(i, h, cos, sin, ctx)
        if k == len(self.pieces) - 1:
            self.logits[:n].copy_(model.logits(h))
        else:
            self.hidden[:n].copy_(h)

    def _capture_all(self) -> None:
        t0 = time.perf_counter()
        free0 = torch.cuda.mem_get_info(self.cache.device)[0]
        stream = torch.cuda.Stream(self.cache.device)
        sizes = sorted(self.buckets, reverse=True)  # largest first: smaller ones reuse its pool
        with torch.inference_mode():
            for size in tqdm(sizes, desc="capturing CUDA graphs", disable=not log.isEnabledFor(20)):
                bucket = self.buckets[size]
                stream.wait_stream(torch.cuda.current_stream(self.cache.device))
                with torch.cuda.stream(stream):  # warm-up: compiles the kernels, sizes workspaces
                    for _ in range(2):
                        for k in range(len(self.pieces)):
                            self._run_piece(k, bucket)
                torch.cuda.current_stream(self.cache.device).wait_stream(stream)
                for k in range(len(self.pieces)):
                    g = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(g, pool=self.pool):
                        self._run_piece(k, bucket)
                    self.pool = self.pool or g.pool()
                    bucket.graphs.append(g)
        torch.cuda.synchronize(self.cache.device)
        used = free0 - torch.cuda.mem_get_info(self.cache.device)[0]
        log.info(
            "captured decode CUDA graphs for batch sizes %s (%d pieces each) in %.1f s, %.0f MiB",
            ",".join(map(str, self.buckets_sizes)),
            len(self.pieces),
            time.perf_counter() - t0,
            used / 2**20,
        )

    def run_bucket(self, size: int, parts: dict[str, np.ndarray], replay: bool) -> torch.Tensor:
        """Logits of bucket ``size`` on static inputs ``parts`` (``padding_inputs`` edited),
        its graphs replayed or its pieces run eagerly on the same buffers, rows as they lie
        (the start-up check compares the two). Nothing is written where padding writes
        nothing."""
        bucket = self.buckets[size]
        self._land(bucket, parts)
        with torch.inference_mode():
            for k in range(len(self.pieces)):
                if replay:
                    bucket.graphs[k].replay()
                else:
                    self._run_piece(k, bucket)
        return self.logits[:size].clone()

    def padding_inputs(self, size: int) -> dict[str, np.ndarray]:
        """Bucket ``size``'s static inputs for a step of padding rows only."""
        return self._padded(size, [], [])

    # --- one decode step -----------------------------------------------------------------------
    def pack(
        self,
        seqs: list[Sequence],
        new_ids: list[list[int]],
        starts: np.ndarray | None = None,
        slots: np.ndarray | None = None,
        written: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    ) -> dict[str, np.ndarray]:
        """The host side of a decode step: its static inputs, padded to its bucket
        (``starts``, ``slots``, ``written``: as :func:`engine.inputs.pack_inputs` takes them;
        the writes go up in the upload's tail and reach the bucket's tables on the device;
        most decode steps start no block and upload none)."""
        parts = self._padded(self.bucket_for(len(seqs)), seqs, new_ids, starts, slots)
        if written is not None and written[0].size:
            parts.update(zip(("table_slots", "table_cols", "table_blocks"), written))
        return parts

    def run(
        self, n: int, parts: dict[str, np.ndarray], plan: LookupPlan, prefetcher: Prefetcher
    ) -> torch.Tensor:
        """The device side: one upload into the bucket's buffer, the gathers, the graphs."""
        row_index = plan.host_arrays()
        bucket, views = self.upload(n, {**parts, **{f"row_{k}": v for k, v in row_index.items()}})
        index = {k: views[f"row_{k}"] for k in row_index}
        return self.replay(bucket, n, prefetcher.start(plan, index, self.uploader.last_copy))

    def upload(self, n: int, arrays: dict[str, np.ndarray]) -> tuple[_Bucket, dict]:
        """A step's arrays (its static inputs first) in one upload into its bucket's buffer;
        the bucket and the arrays' device views."""
        bucket = self.buckets[self.bucket_for(n)]
        return bucket, self._land(bucket, arrays)

    def _land(self, bucket: _Bucket, arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """The one upload into the bucket's buffer, then the step's table writes applied on
        the device side and its block tables gathered by slot into the bucket's (the spare
        conv slot of padding rows reads a row never written: block 0)."""
        views = self.uploader.upload(arrays, into=bucket.buffer)
        # the last static part: every one before it landed where the graphs read it too
        if views["conv_write"].data_ptr() != bucket.views["conv_write"].data_ptr():
            raise RuntimeError("decode inputs did not land at the graphs' addresses")
        cols = arrays.get("table_cols")
        if cols is not None:  # ``need`` from the host's array: no device read
            at = [views.pop(k) for k in ("table_slots", "table_cols", "table_blocks")]
            self.tables.write(*at, int(cols.max()) + 1)
        out = bucket.views["block_tables"]
        self.tables.gather(views["conv_slots"], self.max_blocks, out=out)
        views["block_tables"] = out
        return views

    def replay(self, bucket: _Bucket, n: int, pending: PendingRows) -> torch.Tensor:
        """The pieces on the bucket's inputs as they lie, each layer's rows from ``pending``
        (closed here)."""
        try:
            with torch.inference_mode():
                for k, (start, _) in enumerate(self.pieces):
                    if k > 0 and start in self.rows:
                        # outside any graph: wait for this layer's rows, into the fixed buffer
                        self.rows[start][:n].copy_(pending.rows(start))
                    if bucket.graphs:
                        bucket.graphs[k].replay()
                    else:
                        self._run_piece(k, bucket)
        finally:
            pending.close()
        self.steps += 1
        return self.logits[:n]
