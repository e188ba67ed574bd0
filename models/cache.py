"""Paged KV cache plus the small per-sequence state Engram decoding carries.

KV memory is a pool of fixed-size blocks; each sequence holds a block table, so sequences of
any length share one bounded pool and admission control can count free blocks. Each Engram
layer also keeps, per sequence slot, the last ``(kernel - 1) * max_ngram_size`` normed gated
values for its causal ShortConv, and each sequence keeps its last ``max_ngram_size - 1``
compressed ids for incremental hashing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .config import ModelConfig
from .engram import ConvStep


class CacheFull(RuntimeError):
    """No free KV blocks or sequence slots; the caller should wait or preempt."""


@dataclass
class SeqState:
    """One sequence's cache bookkeeping."""

    slot: int
    ngram_history: np.ndarray
    block_table: list[int] = field(default_factory=list)
    length: int = 0  # tokens already in the KV cache


@dataclass
class StepBatch:
    """A packed step: the new tokens of several sequences, back to back."""

    input_ids: torch.Tensor  # [N]
    positions: torch.Tensor  # [N]
    lengths: list[int]  # new tokens per sequence
    starts: list[int]  # tokens cached before this step, per sequence
    slot_mapping: torch.Tensor  # [N] flat KV index each new token is written to
    context_index: torch.Tensor  # [S, Lmax] flat KV index of every context position (padded)
    conv_slots: torch.Tensor  # [S]
    conv_step: ConvStep | None

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def last_token_index(self) -> torch.Tensor:
        return torch.tensor(np.cumsum(self.lengths) - 1, dtype=torch.long)


class KVCache:
    def __init__(
        self,
        config: ModelConfig,
        num_blocks: int,
        block_size: int = 16,
        max_seqs: int = 64,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        self.config = config
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.max_seqs = max_seqs
        self.device = torch.device(device)
        shape = (num_blocks * block_size, config.num_key_value_heads, config.head_dim)
        n = config.num_hidden_layers
        self.k = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(n)]
        self.v = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(n)]
        self.conv_len = (config.engram_kernel_size - 1) * config.engram_max_ngram_size
        conv_shape = (max_seqs, self.conv_len, config.hidden_size * config.hc_mult)
        self.conv = {
            lid: torch.zeros(conv_shape, dtype=dtype, device=self.device)
            for lid in config.engram_layer_ids
        }
        self._free_blocks = list(range(num_blocks - 1, -1, -1))
        self._free_slots = list(range(max_seqs - 1, -1, -1))

    # --- accounting ---------------------------------------------------------------
    @property
    def free_blocks(self) -> int:
        return len(self._free_blocks)

    @property
    def free_slots(self) -> int:
        return len(self._free_slots)

    @property
    def usage(self) -> float:
        return 1.0 - self.free_blocks / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def nbytes(self) -> int:
        t = self.k + self.v + list(self.conv.values())
        return sum(x.numel() * x.element_size() for x in t)

    # --- sequence lifecycle ------------------------------------------------------------
    def new_sequence(self, ngram_history: np.ndarray) -> SeqState:
        if not self._free_slots:
            raise CacheFull(f"all {self.max_seqs} sequence slots are in use")
        slot = self._free_slots.pop()
        for t in self.conv.values():
            t[slot].zero_()
        return SeqState(slot=slot, ngram_history=ngram_history)

    def free(self, seq: SeqState) -> None:
        self._free_blocks.extend(reversed(seq.block_table))
        seq.block_table = []
        if seq.slot >= 0:
            self._free_slots.append(seq.slot)
            seq.slot = -1

    def reserve(self, seq: SeqState, num_new: int) -> None:
        """Make room for num_new more tokens, all or nothing."""
        need = self.blocks_for(seq.length + num_new) - len(seq.block_table)
        if need > len(self._free_blocks):
            raise CacheFull(f"need {need} KV blocks, {len(self._free_blocks)} free")
        for _ in range(need):
            seq.block_table.append(self._free_blocks.pop())

    # --- step ------------------------------------------------------------------------------
    def prepare(self, seqs: list[SeqState], new_ids: list[list[int]]) -> StepBatch:
        """Reserve space and build the packed step for these sequences' new tokens."""
        if len(seqs) != len(new_ids) or not seqs:
            raise ValueError("prepare needs one list of new ids per sequence (at least one)")
        for seq, ids in zip(seqs, new_ids):
            if not ids:
                raise ValueError("every sequence in a step needs at least one new token")
            if seq.length + len(ids) > self.config.max_position_embeddings:
                raise ValueError(
                    f"sequence would reach {seq.length + len(ids)} tokens, over "
                    f"max_position_embeddings {self.config.max_position_embeddings}"
                )
        for seq, ids in zip(seqs, new_ids):
            self.reserve(seq, len(ids))
        bs = self.block_size
        lengths = [len(x) for x in new_ids]
        starts = [s.length for s in seqs]
        positions = np.concatenate([np.arange(s, s + n) for s, n in zip(starts, lengths)])
        max_blocks = max(len(s.block_table) for s in seqs)
        tables = np.zeros((len(seqs), max_blocks), dtype=np.int64)
        for i, s in enumerate(seqs):
            tables[i, : len(s.block_table)] = s.block_table
        seq_of_tok = np.repeat(np.arange(len(seqs)), lengths)
        slot_mapping = tables[seq_of_tok, positions // bs] * bs + positions % bs
        lmax = max(s + n for s, n in zip(starts, lengths))
        ctx = np.arange(lmax)
        context_index = tables[:, ctx // bs] * bs + ctx % bs
        conv_step = None
        if self.conv:
            conv_step = ConvStep.build(
                lengths,
                self.config.engram_kernel_size,
                self.config.engram_max_ngram_size,
                self.device,
            )
        dev = self.device
        return StepBatch(
            input_ids=torch.tensor([t for x in new_ids for t in x], dtype=torch.long, device=dev),
            positions=torch.from_numpy(positions).to(dev),
            lengths=lengths,
            starts=starts,
            slot_mapping=torch.from_numpy(slot_mapping).to(dev),
            context_index=torch.from_numpy(context_index).to(dev),
            conv_slots=torch.tensor([s.slot for s in seqs], dtype=torch.long, device=dev),
            conv_step=conv_step,
        )

    def commit(self, seqs: list[SeqState], batch: StepBatch, ngram_history: np.ndarray) -> None:
        """The step ran: its tokens join each sequence's cached context and n-gram history."""
        for i, (seq, n) in enumerate(zip(seqs, batch.lengths)):
            seq.length += n
            seq.ngram_history = ngram_history[i]
