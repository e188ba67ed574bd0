"""One step of the model: scheduled sequences and their new tokens in, logits out.

rows = issue every Engram layer's gather (the lookup plan is known from token ids alone)
inputs = the step's metadata, one upload
logits = the forward pass, reading rows layer by layer as they arrive
then each sequence's cached length and n-gram history advance.
"""

from __future__ import annotations

import numpy as np
import torch

from models.llama import EngramForCausalLM
from offload.paths import make_prefetcher
from offload.plan import LookupPlan
from offload.prefetch import PendingRows, Prefetcher
from offload.store import TableStore

from .attention import PagedAttention, ReferenceAttention, pick_backend
from .cuda_graph import DecodeGraphs
from .fused import fuse_model
from .host_time import NO_TIMER, HostTimer, NoTimer
from .inputs import StepInputs, Uploader, build_inputs
from .kv_cache import KVCache
from .sequence import Sequence
from .step_rows import NgramState


class _Step:
    """The :class:`models.llama.StepContext` of one step."""

    def __init__(self, cache: KVCache, inp: StepInputs, rows: PendingRows, attention: str) -> None:
        self.cache, self.inp, self.pending = cache, inp, rows
        self.positions, self.conv_step = inp.positions, inp.conv_step
        kind = PagedAttention if attention == "triton" else ReferenceAttention
        self.attend = kind(cache, inp)

    def engram_rows(self, layer: int) -> torch.Tensor:
        return self.pending.rows(layer)

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
    ) -> None:
        self.model, self.cache = model, cache
        # default: the model's own (loaded) tables, gathered in place
        self.rows = rows or make_prefetcher(TableStore.from_model(model), "resident", cache.device)
        self.uploader = Uploader(cache.device)
        self.ngram = NgramState(model, cache.max_seqs + 1)
        self.attention = pick_backend(attention, cache.device)
        if self.attention == "triton":  # the device path: fewer, fused kernels per layer
            fuse_model(model)
        self.graphs = None
        if decode_graphs and self.attention == "triton":
            self.graphs = DecodeGraphs(model, cache, self.uploader, cache.max_seqs, capture)

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
    ) -> torch.Tensor:
        """Logits ``[S, V]`` of each sequence's last new token (``[N, V]``: every new token)."""
        if len(seqs) != len(new_ids) or not seqs:
            raise ValueError("a step needs one list of new ids per sequence (at least one)")
        limit = self.model.config.max_position_embeddings
        with timer("reserve"):
            for seq, ids in zip(seqs, new_ids):
                if not ids:
                    raise ValueError("every sequence in a step needs at least one new token")
                if seq.num_computed + len(ids) > limit:
                    raise ValueError(
                        f"sequence would reach {seq.num_computed + len(ids)} tokens, over "
                        f"max_position_embeddings {limit}"
                    )
            for seq, ids in zip(seqs, new_ids):
                self.cache.reserve(seq, len(ids))
        with timer("hash"):
            fresh = self.cache.take_fresh()
            self.ngram.reset(fresh)
            slots = np.fromiter((s.slot for s in seqs), np.int64, len(seqs))
            rows = self.ngram.step(slots, new_ids, [True] * len(seqs))
            row_ids = rows.finish(np.empty(0, np.int64))
        self.cache.zero_conv(fresh)
        with timer("plan"):
            plan = self.rows.plan(row_ids)
        if self.graphs is not None and self.graphs.fits(new_ids, all_logits):
            logits = self.graphs.step(seqs, new_ids, plan, self.rows)
        else:
            logits = self._eager(seqs, new_ids, plan, all_logits, timer)
        with timer("advance"):
            for seq, ids in zip(seqs, new_ids):
                seq.num_computed += len(ids)
        return logits

    def _eager(self, seqs, new_ids, plan: LookupPlan, all_logits: bool, timer=NO_TIMER):
        with timer("pack"):
            index = plan.host_arrays()
            inp = build_inputs(seqs, new_ids, self.cache, self.uploader, all_logits, index)
        with timer("prefetch"):  # every layer's gather is issued now, before the forward pass
            pending = self.rows.start(plan, inp.row_index, self.uploader.last_copy)
        try:
            with timer("forward"), torch.inference_mode():
                step = _Step(self.cache, inp, pending, self.attention)
                return self.model.forward_step(inp.input_ids, step, inp.logits_index)
        finally:
            with timer("prefetch"):
                pending.close()
