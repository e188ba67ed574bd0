"""One step of the model: scheduled sequences and their new tokens in, logits out.

rows = issue every Engram layer's gather (the lookup plan is known from token ids alone)
inputs = the step's metadata, one upload
logits = the forward pass, reading rows layer by layer as they arrive
then each sequence's cached length and n-gram history advance.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from models.llama import EngramForCausalLM

from .attention import ReferenceAttention
from .inputs import StepInputs, Uploader, build_inputs
from .kv_cache import KVCache
from .sequence import Sequence


class PendingRows(Protocol):
    """A step's Engram rows in flight (what a prefetcher's ``start`` returns)."""

    def rows(self, layer_id: int) -> torch.Tensor: ...

    def close(self) -> object: ...


# ({layer: [N, heads] global row ids}) -> the step's rows, gathers issued at once
RowSource = Callable[[dict[int, np.ndarray]], PendingRows]


class ModelRows:
    """Rows read from the model's own tables (a model whose tables were loaded with it)."""

    def __init__(self, model: EngramForCausalLM, row_ids: dict[int, np.ndarray]) -> None:
        self.model, self.row_ids = model, row_ids

    def rows(self, layer_id: int) -> torch.Tensor:
        table = self.model.engram_table(layer_id)
        return F.embedding(torch.from_numpy(self.row_ids[layer_id]).to(table.device), table)

    def close(self) -> None:
        pass


class _Step:
    """The :class:`models.llama.StepContext` of one step."""

    def __init__(self, cache: KVCache, inp: StepInputs, rows: PendingRows) -> None:
        self.cache, self.inp, self.pending = cache, inp, rows
        self.positions, self.conv_step = inp.positions, inp.conv_step
        self.attend = ReferenceAttention(cache, inp)

    def engram_rows(self, layer: int) -> torch.Tensor:
        return self.pending.rows(layer)

    def conv_history(self, layer: int) -> torch.Tensor:
        return self.cache.conv[layer][self.inp.conv_slots]

    def set_conv_history(self, layer: int, history: torch.Tensor) -> None:
        conv = self.cache.conv[layer]
        conv[self.inp.conv_slots] = history.to(conv.dtype)


class ModelRunner:
    def __init__(
        self, model: EngramForCausalLM, cache: KVCache, rows: RowSource | None = None
    ) -> None:
        self.model, self.cache = model, cache
        self.rows = rows or (lambda ids: ModelRows(model, ids))
        self.uploader = Uploader(cache.device)

    def step(
        self, seqs: list[Sequence], new_ids: list[list[int]], all_logits: bool = False
    ) -> torch.Tensor:
        """Logits ``[S, V]`` of each sequence's last new token (``[N, V]``: every new token)."""
        if len(seqs) != len(new_ids) or not seqs:
            raise ValueError("a step needs one list of new ids per sequence (at least one)")
        limit = self.model.config.max_position_embeddings
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
        hasher = self.model.hasher
        histories = np.stack(
            [
                s.ngram_history if s.ngram_history is not None else hasher.initial_history(1)[0]
                for s in seqs
            ]
        )
        row_ids, next_hist = self.model.row_ids(
            histories,
            np.fromiter((t for x in new_ids for t in x), dtype=np.int64),
            np.array([len(x) for x in new_ids]),
        )
        pending = self.rows(row_ids)  # every layer's gather issued before the forward starts
        try:
            inp = build_inputs(seqs, new_ids, self.cache, self.uploader, all_logits)
            with torch.inference_mode():
                step = _Step(self.cache, inp, pending)
                logits = self.model.forward_step(inp.input_ids, step, inp.logits_index)
        finally:
            pending.close()
        for i, (seq, ids) in enumerate(zip(seqs, new_ids)):
            seq.num_computed += len(ids)
            seq.ngram_history = next_hist[i]
        return logits
