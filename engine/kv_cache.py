"""Paged KV cache plus the small per-sequence state Engram decoding carries.

KV memory is a pool of fixed-size blocks; each sequence holds a block table, so sequences of
any length share one bounded pool and admission control can count free blocks. Each Engram
layer also keeps, per sequence slot, the last ``(kernel - 1) * max_ngram_size`` normed gated
values for its causal ShortConv.

Layout per layer: ``k[l]``, ``v[l]`` are ``[num_blocks * block_size, kv_heads, head_dim]``;
the token at position p of a sequence lives at ``block_table[p // block_size] * block_size +
p % block_size``. Attention (reference or paged kernels) reads the blocks in place. One extra
conv slot is never handed out: the padding rows of a CUDA-graph batch bucket read it
(``pad_conv_slot``) and write nothing.
"""

from __future__ import annotations

import numpy as np
import torch

from models.config import ModelConfig

from .sequence import Sequence

# take_written's answer when nothing was written (shared: an empty array holds nothing to change)
_NONE_WRITTEN = (np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.int32))


class CacheFull(RuntimeError):
    """No free KV blocks or sequence slots; the caller should wait or preempt."""


def blocks_for(num_tokens: int, block_size: int) -> int:
    """KV blocks that hold ``num_tokens`` tokens (the one place this is computed)."""
    return -(-num_tokens // block_size)


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
        if num_blocks < 1 or block_size < 1 or max_seqs < 1:
            raise ValueError("the KV cache needs at least one block, one slot and block_size >= 1")
        self.config = config
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.max_seqs = max_seqs
        self.device = torch.device(device)
        shape = (num_blocks * block_size, config.num_key_value_heads, config.head_dim)
        self.pad_conv_slot = max_seqs
        n = config.num_hidden_layers
        self.k = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(n)]
        self.v = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(n)]
        self.conv_len = (config.engram_kernel_size - 1) * config.engram_max_ngram_size
        conv_shape = (max_seqs + 1, self.conv_len, config.hidden_size * config.hc_mult)
        self.conv = {
            lid: torch.zeros(conv_shape, dtype=dtype, device=self.device)
            for lid in config.engram_layer_ids
        }
        self._free_blocks = list(range(num_blocks - 1, -1, -1))
        self._free_slots = list(range(max_seqs - 1, -1, -1))
        # each slot's block table, written as blocks are reserved (steps index it, not rebuild
        # it); widened as contexts grow; the spare row (pad_conv_slot) stays zeros
        self.tables = np.zeros((max_seqs + 1, 64), dtype=np.int32)
        # (slot, column) -> block written since the runner last took them (its device-side
        # copy of the tables applies them: engine/block_tables.py); the latest write wins
        self.written: dict[tuple[int, int], int] = {}
        self.fresh: list[int] = []  # slots admitted since the runner last reset their state

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

    @property
    def max_tokens(self) -> int:
        """Tokens the whole pool holds."""
        return self.num_blocks * self.block_size

    def blocks_for(self, num_tokens: int) -> int:
        return blocks_for(num_tokens, self.block_size)

    def nbytes(self) -> int:
        t = self.k + self.v + list(self.conv.values())
        return sum(x.numel() * x.element_size() for x in t)

    # --- sequence lifecycle ------------------------------------------------------------
    def admit(self, seq: Sequence) -> None:
        """Give a sequence a conv-state slot (zeroed): it starts from an empty cache."""
        if not self._free_slots:
            raise CacheFull(f"all {self.max_seqs} sequence slots are in use")
        seq.slot = self._free_slots.pop()
        self.tables[seq.slot] = 0
        self.fresh.append(seq.slot)

    def take_fresh(self) -> list[int]:
        """Slots admitted since the last call: their conv state and n-gram history start over
        (the runner resets them as part of the next step, in the device's order)."""
        fresh, self.fresh = self.fresh, []
        return fresh

    def zero_conv(self, slots: list[int]) -> None:
        if slots:
            at = torch.tensor(slots, dtype=torch.long).to(self.device, non_blocking=True)
            for t in self.conv.values():
                t.index_fill_(0, at, 0)

    def free(self, seq: Sequence) -> None:
        """Return a sequence's blocks and slot to the pools."""
        self._free_blocks.extend(reversed(seq.block_table))
        seq.block_table = []
        if seq.slot >= 0:
            self._free_slots.append(seq.slot)
            seq.slot = -1

    def reserve(self, seq: Sequence, num_new: int) -> None:
        """Make room for ``num_new`` more tokens after the cached ones, all or nothing."""
        need = self.blocks_for(seq.num_computed + num_new) - len(seq.block_table)
        if need > len(self._free_blocks):
            raise CacheFull(f"need {need} KV blocks, {len(self._free_blocks)} free")
        if need <= 0:
            return
        end = len(seq.block_table) + need
        if end > self.tables.shape[1]:
            wider = np.zeros((self.tables.shape[0], max(end, 2 * self.tables.shape[1])), np.int32)
            wider[:, : self.tables.shape[1]] = self.tables
            self.tables = wider
        for _ in range(need):
            seq.block_table.append(self._free_blocks.pop())
        if seq.slot >= 0:
            slot, table, written = seq.slot, seq.block_table, self.written
            self.tables[slot, end - need : end] = table[end - need :]
            for col in range(end - need, end):
                written[slot, col] = table[col]

    def take_written(self, everything: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(slots, columns, blocks) of the table entries written since the last call, one
        per slot and column (the latest), in writing order; ``everything``: every entry of
        every slot's table instead (a device-side copy that may have missed writes)."""
        written, self.written = self.written, {}
        if everything:
            rows, width = self.tables.shape
            cols = np.tile(np.arange(width, dtype=np.int64), rows)
            return np.repeat(np.arange(rows, dtype=np.int64), width), cols, self.tables.ravel()
        n = len(written)
        if not n:  # most decode steps start no block
            return _NONE_WRITTEN
        slots = np.fromiter((k[0] for k in written), np.int64, n)
        cols = np.fromiter((k[1] for k in written), np.int64, n)
        return slots, cols, np.fromiter(written.values(), np.int32, n)
