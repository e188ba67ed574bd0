"""One step of the model: scheduled sequences and their new tokens in, logits out.

rows = issue every Engram layer's gather (the lookup plan is known from token ids alone)
inputs = the step's metadata, one upload
logits = the forward pass, reading rows layer by layer as they arrive
then each sequence's cached length and n-gram history advance.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from models.engram import EngramGroup
from models.llama import EngramForCausalLM
from offload.paths import make_prefetcher
from offload.prefetch import PendingRows, Prefetcher
from offload.store import TableStore

from .attention import PagedAttention, ReferenceAttention, pick_backend
from .block_tables import DeviceTables
from .cuda_graph import DecodeGraphs
from .device_hash import DeviceRows, device_arrays, fill_in
from .fused import fuse_model
from .graph_inputs import graph_step
from .host_time import NO_TIMER, HostTimer, NoTimer
from .inputs import StepInputs, Uploader, pack_inputs, upload_inputs
from .kv_cache import KVCache
from .memories import MemorySet, StepGroup, base_memory
from .sequence import Sequence
from .step_rows import NgramState, Rows


class _Step:
    """The :class:`models.llama.StepContext` of one step. ``groups``: with several memories
    in the step, each one's sequences and pending rows (``rows`` is then the first's)."""

    def __init__(
        self,
        cache: KVCache,
        inp: StepInputs,
        rows: PendingRows,
        attention: str,
        groups: list[tuple[StepGroup, PendingRows]] | None = None,
    ) -> None:
        self.cache, self.inp, self.pending, self.groups = cache, inp, rows, groups
        self.positions, self.conv_step = inp.positions, inp.conv_step
        kind = PagedAttention if attention == "triton" else ReferenceAttention
        self.attend = kind(cache, inp)

    def engram_rows(self, layer: int) -> torch.Tensor:
        return self.pending.rows(layer)

    def engram_groups(self, layer: int) -> list[EngramGroup] | None:
        if self.groups is None:
            return None
        one = len(self.groups) == 1
        return [
            EngramGroup(
                g.memory.engrams[layer],
                None if one else self.inp.row_index[f"m{k}_tokens"],
                pending.rows(layer),
            )
            for k, (g, pending) in enumerate(self.groups)
            if pending is not None  # a memory without Engram layers adds nothing
        ]

    def conv_history(self, layer: int) -> torch.Tensor:
        return self.cache.conv[layer][self.inp.conv_slots]

    def set_conv_history(self, layer: int, history: torch.Tensor) -> None:
        conv = self.cache.conv[layer]
        conv[self.inp.conv_slots] = history.to(conv.dtype)


class ModelRunner:
    """``attention``: 'auto' (Triton paged kernels on CUDA, SDPA elsewhere), 'triton' or
    'reference'. ``decode_graphs``: decode steps take the static-buffer path of
    :mod:`engine.cuda_graph` (needs the Triton kernels), captured as CUDA graphs when
    ``capture`` and CUDA, run eagerly through the same buffers otherwise."""

    def __init__(
        self,
        model: EngramForCausalLM,
        cache: KVCache,
        rows: Prefetcher | None = None,
        attention: str = "auto",
        decode_graphs: bool = False,
        capture: bool = True,
        max_memories: int = 0,
    ) -> None:
        self.model, self.cache = model, cache
        # default: the model's own (loaded) tables, gathered in place
        self.rows = rows or make_prefetcher(TableStore.from_model(model), "resident", cache.device)
        # the model's own Engram layers and any memories attached beside them
        base = base_memory("", model, self.rows)
        self.memories = MemorySet(base, cache.device, max_memories)
        self.uploader = Uploader(cache.device)
        self.ngram = NgramState(model, cache.max_seqs + 1)
        # each slot's block table on the device side, from the writes every step carries
        self.tables = DeviceTables(cache.max_seqs + 1, cache.block_size, cache.device)
        # a step failed: the writes it carried may never have reached the device side, so the
        # next step sends every slot's whole table (an eager step: DecodeGraphs.fits)
        self.resync_tables = False
        # set by overlap when placeholders' rows are finished on the device (engine/overlap.py)
        self.device_rows: DeviceRows | None = None
        self._decode_shapes: dict[int, dict] = {}  # pack_inputs' per batch size
        self._ones: dict[int, np.ndarray] = {}  # a decode step's token counts, per batch size
        self.attention = pick_backend(attention, cache.device)
        if self.attention == "triton":  # the device path: fewer, fused kernels per layer
            fuse_model(model)
        self.graphs = None
        if decode_graphs and self.attention == "triton":
            self.graphs = DecodeGraphs(
                model, cache, self.uploader, self.tables, cache.max_seqs, capture
            )

    def seat(self, seq: Sequence, history: np.ndarray) -> None:
        """Give a sequence whose tokens are cached its n-gram history (compressed ids, oldest
        first; engram-bench seats sequences as after a prefill it does not run)."""
        fresh = self.cache.take_fresh()
        self.ngram.reset(fresh)
        self.cache.zero_conv(fresh)
        self.ngram.history[seq.slot] = history

    def step(
        self,
        seqs: list[Sequence],
        new_ids: list[list[int]],
        all_logits: bool = False,
        timer: HostTimer | NoTimer = NO_TIMER,
        known: list[bool] | None = None,
        later: bool = False,
    ) -> torch.Tensor | Prepared:
        """Logits ``[S, V]`` of each sequence's last new token (``[N, V]``: every new token).

        ``known[i]`` False: sequence i feeds one token still on the device (a placeholder).
        ``later``: do the host side only and return it (:meth:`Prepared.run` does the rest,
        on the device's worker, given the placeholders' tokens)."""
        prep = self.prepare(seqs, new_ids, all_logits, timer, known)
        return prep if later else prep.run(np.empty(0, np.int64), timer)

    def prepare(
        self,
        seqs: list[Sequence],
        new_ids: list[list[int]],
        all_logits: bool = False,
        timer: HostTimer | NoTimer = NO_TIMER,
        known: list[bool] | None = None,
    ) -> Prepared:
        """The host side of a step: blocks reserved and the sequences' cached lengths advanced
        (one pass; the inputs take the starts it collects), rows hashed (but for the
        placeholders' own part), inputs packed."""
        if len(seqs) != len(new_ids) or not seqs:
            raise ValueError("a step needs one list of new ids per sequence (at least one)")
        cache = self.cache
        limit, bs = self.model.config.max_position_embeddings, cache.block_size
        # one pass: checks, blocks, the starts and slots, the advance (a step that raises here
        # fails as a whole: the engine finishes every sequence of it)
        with timer("reserve"):
            starts, at, total = [], [], 0
            for seq, ids in zip(seqs, new_ids):
                if not ids:
                    raise ValueError("every sequence in a step needs at least one new token")
                done = seq.num_computed
                end = done + len(ids)
                if end > limit:
                    raise ValueError(
                        f"sequence would reach {end} tokens, over max_position_embeddings {limit}"
                    )
                if end > len(seq.block_table) * bs:  # a new block (reserve reads num_computed)
                    cache.reserve(seq, end - done)
                starts.append(done)
                at.append(seq.slot)
                seq.num_computed = end
                total += end - done
            starts = np.array(starts, np.int64)
            slots = np.array(at, np.int64)
        with timer("hash"):
            fresh = cache.take_fresh()
            self.ngram.reset(fresh)
            if total == len(seqs):  # a decode step: the same counts every step of its size
                if (lengths := self._ones.get(total)) is None:
                    lengths = self._ones[total] = np.ones(total, np.int64)
                    lengths.flags.writeable = False
            else:
                lengths = np.fromiter(map(len, new_ids), np.int64, len(new_ids))
            rows = self.ngram.step(slots, new_ids, known or [True] * len(seqs), lengths, total)
            layers = self.model.config.engram_layer_ids
            groups = self.memories.groups(seqs, lengths) if layers else None
        with timer("pack"):
            # every step carries the table writes since the one before (engine/block_tables.py)
            written, self.resync_tables = cache.take_written(self.resync_tables), False
            graph = (
                groups is None
                and self.graphs is not None
                and self.graphs.fits(new_ids, all_logits, written[0].size)
            )
            if graph:
                parts = self.graphs.pack(seqs, new_ids, starts, slots, written)
            else:
                parts = pack_inputs(
                    seqs,
                    new_ids,
                    cache,
                    all_logits,
                    self._decode_shapes,
                    slots,
                    lengths,
                    starts,
                    written,
                    total,
                )
        return Prepared(self, len(seqs), rows, fresh, parts, graph, groups)

    def execute(self, prep: Prepared, tokens: np.ndarray, timer=NO_TIMER) -> torch.Tensor:
        """The device side of a step: placeholders filled in, the plan, one upload, every
        layer's gather issued, the forward pass."""
        if isinstance(tokens, torch.Tensor):
            return self._execute_device(prep, tokens, timer)
        self.cache.zero_conv(prep.fresh)
        with timer("plan"):
            if prep.rows.wait.size:
                prep.parts["input_ids"][prep.rows.wait] = tokens
            if prep.groups is not None:
                return self._execute_groups(prep, prep.rows.finish(tokens), timer)
            plan = self.rows.plan(prep.rows.finish(tokens))
        if prep.graph:
            return self.graphs.run(prep.n, prep.parts, plan, self.rows)
        with timer("upload"):
            inp = upload_inputs(prep.parts, self.uploader, plan.host_arrays(), self.tables)
        with timer("prefetch"):  # every layer's gather is issued now, before the forward pass
            pending = self.rows.start(plan, inp.row_index, self.uploader.last_copy)
        return self._forward(inp, pending, timer)

    def _execute_device(self, prep: Prepared, tokens: torch.Tensor, timer=NO_TIMER):
        """:meth:`execute` with the placeholders' raw ids still on the device (``tokens``, a
        tensor there): the host-known rows, the placeholders' positions and partials go up in
        the step's one upload; their input ids, rows and the plan's index are made there."""
        self.cache.zero_conv(prep.fresh)
        if prep.graph:
            return graph_step(self.graphs, prep, tokens, self.device_rows, self.rows, timer)
        with timer("upload"):
            inp = upload_inputs(prep.parts, self.uploader, device_arrays(prep.rows), self.tables)
        with timer("plan"):
            sort = self.rows.name == "uva"
            plan, index, ready = fill_in(
                self.device_rows, inp.row_index, inp.input_ids, tokens, sort
            )
        with timer("prefetch"):
            pending = self.rows.start(plan, index, ready)
        return self._forward(inp, pending, timer)

    def _forward(self, inp: StepInputs, pending: PendingRows, timer=NO_TIMER) -> torch.Tensor:
        try:
            with timer("forward"), torch.inference_mode():
                step = _Step(self.cache, inp, pending, self.attention)
                return self.model.forward_step(inp.input_ids, step, inp.logits_index)
        finally:
            with timer("prefetch"):
                pending.close()

    def _execute_groups(self, prep: Prepared, rows: dict, timer=NO_TIMER) -> torch.Tensor:
        """A step whose sequences read several memories (or one besides the base): one plan
        per memory over its tokens' rows, every index array in the step's one upload, each
        memory's gathers issued on its own path before the forward pass."""
        with timer("plan"):
            plans = [
                None
                if g.memory.plain
                else g.memory.rows.plan({lid: r[g.tokens] for lid, r in rows.items()})
                for g in prep.groups
            ]
            arrays = {}
            for k, (g, plan) in enumerate(zip(prep.groups, plans)):
                if plan is not None:
                    arrays.update({f"m{k}_{name}": a for name, a in plan.host_arrays().items()})
                    arrays[f"m{k}_tokens"] = g.tokens
        with timer("upload"):
            inp = upload_inputs(prep.parts, self.uploader, arrays, self.tables)
        started: list[tuple[StepGroup, PendingRows]] = []
        try:
            with timer("prefetch"):
                for k, (g, plan) in enumerate(zip(prep.groups, plans)):
                    if plan is None:
                        started.append((g, None))
                        continue
                    index = {name: inp.row_index[f"m{k}_{name}"] for name in plan.host_arrays()}
                    started.append((g, g.memory.rows.start(plan, index, self.uploader.last_copy)))
            with timer("forward"), torch.inference_mode():
                first = next((p for _, p in started if p is not None), None)
                step = _Step(self.cache, inp, first, self.attention, started)
                return self.model.forward_step(inp.input_ids, step, inp.logits_index)
        finally:
            with timer("prefetch"):
                for _, pending in started:
                    if pending is not None:
                        pending.close()


@dataclass
class Prepared:
    """A step whose host side is done; :meth:`run` (once) gives its logits."""

    runner: ModelRunner
    n: int
    rows: Rows
    fresh: list[int]
    parts: dict[str, np.ndarray]
    graph: bool
    groups: list[StepGroup] | None = None  # each memory's part (None: the base memory only)

    def run(self, tokens: np.ndarray | torch.Tensor, timer=NO_TIMER) -> torch.Tensor:
        """``tokens``: the raw ids of the placeholders, in the step's token order (a tensor
        on the device: their rows are finished there, :attr:`ModelRunner.device_rows`)."""
        return self.runner.execute(self, tokens, timer)
