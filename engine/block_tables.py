"""Each KV slot's block table, kept on the device side from the blocks reserved since the
step before, so a step's block tables are one gather there.

The host's per-slot tables (``KVCache.tables``) are written as blocks are reserved; every
write since the step before (``KVCache.take_written``: the latest block per slot and column)
goes up in the step's one upload, eager and CUDA-graph steps alike, and the device side
applies them in step order before it gathers the step's rows (a graph step into its bucket's
fixed block tables, outside the graphs). The host's work per step is then O(blocks
reserved), not a copy as wide as the longest context (or, for a graph step, as wide as the
model's). Columns past a sequence's reserved blocks may hold an
earlier owner's block ids: attention never reads past a context, and they are valid blocks.
"""

from __future__ import annotations

import numpy as np
import torch


class DeviceTables:
    def __init__(self, rows: int, block_size: int, device: torch.device) -> None:
        self.block_size = block_size
        self.tables = torch.zeros((rows, 64), dtype=torch.int32, device=device)

    def widths(self, context_lens: np.ndarray, cols: np.ndarray) -> tuple[int, int]:
        """(the step's width: as wide as its longest context needs, the width the writes
        need), from the step's host arrays."""
        width = int(context_lens.max() - 1) // self.block_size + 1
        return width, max(width, int(cols.max()) + 1 if cols.size else 0)

    def step_tables(
        self,
        slots: torch.Tensor,
        cols: torch.Tensor,
        blocks: torch.Tensor,
        seq_slots: torch.Tensor,
        width: int,
        need: int,
    ) -> torch.Tensor:
        """Apply the writes (device tensors, at most one per slot and column), then the
        ``[S, width]`` int32 block tables of the step's slots."""
        self.write(slots, cols, blocks, need)
        return self.gather(seq_slots, width)

    def gather(
        self, seq_slots: torch.Tensor, width: int, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``[S, width]`` int32 block tables of ``seq_slots`` (into ``out`` when given: a CUDA
        graph bucket's fixed tables)."""
        src = self.tables.narrow(1, 0, width)
        if out is None:
            return src.index_select(0, seq_slots)
        return torch.index_select(src, 0, seq_slots, out=out)

    def apply(self, slots: np.ndarray, cols: np.ndarray, blocks: np.ndarray) -> None:
        """Apply a step's writes from its host arrays (``KVCache.take_written``'s), outside a
        step: those of an overlapped step that failed on the device's side, which may never
        have reached here, before the step submitted after it runs (engine/overlap.py)."""
        if not slots.size:
            return
        dev = self.tables.device
        at = [torch.from_numpy(np.ascontiguousarray(a)).to(dev) for a in (slots, cols, blocks)]
        self.write(*at, int(cols.max()) + 1)

    def widen(self, need: int) -> None:
        """At least ``need`` columns (``need``: from host arrays, never read back from the
        device)."""
        have = self.tables.shape[1]
        if need > have:
            wider = self.tables.new_zeros((self.tables.shape[0], max(need, 2 * have)))
            wider[:, :have] = self.tables
            self.tables = wider

    def write(self, slots: torch.Tensor, cols: torch.Tensor, blocks, need: int) -> None:
        """Apply writes (device tensors, at most one per slot and column); ``need``: the
        columns they reach."""
        self.widen(need)
        if slots.numel():
            self.tables.index_put_((slots, cols), blocks.to(self.tables.dtype))
