"""A step's inputs: built on the host from the scheduled sequences, sent with one copy.

Everything the forward pass reads (token ids, positions, KV slot mapping, block tables,
context lengths, query offsets, logits rows, the Engram conv indices) is written into one
int64 host buffer and reaches the device with one non-blocking copy from pinned memory; the
tensors the model sees are views into that single device buffer. On the CPU the views point
at the host buffer itself. Block tables are the exception: the buffer carries the table
entries written since the step before, and the step's tables are gathered on the device from
each slot's table kept there (:mod:`engine.block_tables`).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain
from typing import TYPE_CHECKING

import numpy as np
import torch

from models.engram import ConvStep

if TYPE_CHECKING:  # types only: sampling imports this module for to_device
    from .block_tables import DeviceTables
    from .kv_cache import KVCache
    from .sequence import Sequence

_TORCH = {np.dtype(np.int32): torch.int32, np.dtype(np.int64): torch.int64}


def to_device(values: list, device: torch.device, dtype: torch.dtype | None = None):
    """A small host list on the device without a host sync (an async copy, not torch.tensor's
    synchronous one)."""
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)


def aligned(nbytes: int) -> int:
    """Parts start at 16-byte offsets: each views as its dtype, and Triton, which specialises
    kernels on 16-byte pointer alignment, sees the same alignment every step (no recompiles)."""
    return -(-nbytes // 16) * 16


class Uploader:
    """Packs a step's int32/int64 arrays into one host byte buffer (pinned on CUDA, two of
    them alternating, grown as steps grow) and sends it with one non-blocking copy. A buffer is
    refilled only after the copy that last read it has finished (its event)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self._host: list[torch.Tensor | None] = [None, None]
        self._done: list[torch.cuda.Event | None] = [None, None]
        self._turn = 0
        self.last_copy: torch.cuda.Event | None = None  # the latest copy (CUDA), else None

    def _buffer(self, slot: int, nbytes: int) -> torch.Tensor:
        host = self._host[slot]
        if host is None or host.numel() < nbytes:
            size = max(nbytes, 2 * (0 if host is None else host.numel()), 1 << 15)
            host = torch.empty(size, dtype=torch.uint8)
            self._host[slot] = host.pin_memory() if self.cuda else host
        return self._host[slot]

    def upload(
        self, parts: dict[str, np.ndarray], into: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Device views of ``parts`` (int32 stays int32, anything else becomes int64) after
        one copy; ``into``: a fixed device byte buffer to land in (what CUDA graphs read)."""
        if not self.cuda and into is None:  # nothing to copy: the arrays are the inputs
            return {name: torch.from_numpy(np.ascontiguousarray(a)) for name, a in parts.items()}
        arrays, total = [], 0
        for name, a in parts.items():
            a = np.ascontiguousarray(a)
            if a.dtype not in _TORCH:
                a = a.astype(np.int64)
            arrays.append((name, a, total))
            total += aligned(a.nbytes)
        slot, self._turn = self._turn, self._turn ^ 1
        if self._done[slot] is not None:
            self._done[slot].synchronize()  # the copy that last read this buffer is done
        host = self._buffer(slot, total)
        flat = host.numpy()
        for _, a, off in arrays:
            flat[off : off + a.nbytes] = a.reshape(-1).view(np.uint8)
        if into is not None:
            dev = into[:total]
            dev.copy_(host[:total], non_blocking=self.cuda)
        elif self.cuda:
            dev = host[:total].to(self.device, non_blocking=True)
        else:
            dev = host[:total]  # on the CPU the host buffer is the device buffer
        if self.cuda:
            self._done[slot] = self.last_copy = torch.cuda.Event()
            self.last_copy.record()
        return {
            name: dev[off : off + a.nbytes].view(_TORCH[a.dtype]).view(a.shape)
            for name, a, off in arrays
        }


@dataclass
class StepInputs:
    """One packed step. Host-side lists for the reference attention's grouping; every tensor
    is a view of the step's single device buffer (block tables: gathered on the device)."""

    lengths: list[int]  # new tokens per sequence
    starts: list[int]  # tokens already cached per sequence
    input_ids: torch.Tensor  # [N]
    positions: torch.Tensor  # [N]
    slot_mapping: torch.Tensor  # [N] flat KV index each new token is written to
    block_tables: torch.Tensor  # [S, max_blocks] int32
    context_lens: torch.Tensor  # [S] int32, tokens in the cache after this step
    query_start_loc: torch.Tensor  # [S + 1] int32
    logits_index: torch.Tensor  # rows of the packed step whose logits are computed
    conv_slots: torch.Tensor  # [S]
    conv_step: ConvStep | None
    row_index: dict[str, torch.Tensor]  # the lookup plan's indices (fetch{l}, inverse{l})

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])


def check_slots(slots: np.ndarray) -> None:
    """Every sequence in a step holds a KV slot (it was admitted)."""
    if slots.size and slots.min() < 0:
        raise ValueError("a sequence in the step holds no KV slot (not admitted)")


def block_tables(
    seqs: list[Sequence], rows: int, width: int, cache: KVCache, slots: np.ndarray | None = None
) -> np.ndarray:
    """``[rows, width]`` int32 block tables of ``seqs`` (rows past them, and unused blocks, 0):
    rows of the cache's per-slot tables, no walk over the blocks. ``slots``: the sequences'
    KV slots, when the caller has them."""
    n = len(seqs)
    if slots is None:
        slots = np.array([s.slot for s in seqs], np.int64)
    check_slots(slots)
    if rows == n and width <= cache.tables.shape[1]:  # a step's own: one gather, no padding
        return cache.tables[slots, :width]
    tables = np.zeros((rows, width), dtype=np.int32)
    have = min(width, cache.tables.shape[1])
    tables[:n, :have] = cache.tables[slots, :have]
    return tables


def _shape_arrays(lengths: np.ndarray, cache: KVCache, all_logits: bool) -> dict:
    """The arrays that depend on the new tokens' counts alone (a decode step's are the same
    for every step of its batch size)."""
    cfg, n, total = cache.config, len(lengths), int(lengths.sum())
    qsl = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=qsl[1:])
    out = {
        "query_start_loc": qsl.astype(np.int32),  # the attention kernels' metadata is int32
        "logits_index": np.arange(total) if all_logits else qsl[1:] - 1,
    }
    if cache.conv:
        arrays = ConvStep.host_arrays(lengths, cfg.engram_kernel_size, cfg.engram_max_ngram_size)
        out.update({f"conv_{k}": v for k, v in arrays.items()})
    return out


def pack_inputs(
    seqs: list[Sequence],
    new_ids: list[list[int]],
    cache: KVCache,
    all_logits: bool,
    decode_shapes: dict[int, dict] | None = None,
    slots: np.ndarray | None = None,
    lengths: np.ndarray | None = None,
    starts: np.ndarray | None = None,
    written: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    total: int | None = None,
) -> dict[str, np.ndarray]:
    """The step's host arrays (blocks must already be reserved); nothing is read from the
    sequences after this, so the step can run while the host moves on. ``decode_shapes``:
    a decode step's count-only arrays kept per batch size (read-only; the caller's).
    ``slots``: the sequences' KV slots, ``lengths``: their new tokens' counts, ``starts``: their
    tokens cached before the step, when the caller has them (then ``num_computed`` is not read:
    the runner advances it in the same pass that collects them), ``total``: the step's
    token count, when the caller has it. ``written``: the table
    entries written since the step before (``KVCache.take_written``): the block tables are
    then made on the device (:mod:`engine.block_tables`) and the host's part is flat in the
    context's length; without it they are a host gather as wide as the longest context."""
    bs, n = cache.block_size, len(seqs)
    if slots is None:
        slots = np.array([s.slot for s in seqs], np.int64)
    if lengths is None:
        lengths = np.fromiter(map(len, new_ids), np.int64, n)
    if starts is None:
        starts = np.array([s.num_computed for s in seqs], np.int64)
    if total is None:
        total = int(lengths.sum())
    decode = total == n
    if decode:  # one token per sequence: token i is sequence i's
        seq_of_tok, positions = None, starts
        if decode_shapes is None or all_logits:
            shapes = _shape_arrays(lengths, cache, all_logits)
        elif (shapes := decode_shapes.get(n)) is None:
            shapes = decode_shapes[n] = _shape_arrays(lengths, cache, False)
    else:
        shapes = _shape_arrays(lengths, cache, all_logits)
        qsl = shapes["query_start_loc"].astype(np.int64)
        seq_of_tok = np.repeat(np.arange(n), lengths)
        positions = np.arange(total) - np.repeat(qsl[:-1] - starts, lengths)
    ends = starts + lengths
    block, offset = np.divmod(positions, bs)
    if written is None:
        # as wide as the longest context after the step needs (blocks past a context are
        # unread)
        tables = block_tables(seqs, n, int(ends.max() - 1) // bs + 1, cache, slots)
        mapping = tables[np.arange(n) if decode else seq_of_tok, block] * bs + offset
        extra = {"block_tables": tables}
    else:  # each token's block from its slot's host table: O(tokens)
        check_slots(slots)
        rows = slots if decode else slots[seq_of_tok]
        mapping = cache.tables[rows, block].astype(np.int64) * bs + offset
        extra = dict(zip(("table_slots", "table_cols", "table_blocks"), written))
    return {
        "input_ids": np.fromiter(chain.from_iterable(new_ids), np.int64, total),
        "positions": positions,
        "slot_mapping": mapping,
        **extra,
        "context_lens": ends.astype(np.int32),
        "conv_slots": slots.copy(),
        **shapes,  # query_start_loc, logits_index and the conv arrays
    }


def upload_inputs(
    parts: dict[str, np.ndarray],
    uploader: Uploader,
    row_index: dict[str, np.ndarray],
    tables: DeviceTables | None = None,
) -> StepInputs:
    """The packed arrays and the lookup plan's index arrays on the device, in one copy;
    ``tables``: the device-side block tables, for parts packed with ``written``."""
    dev = uploader.upload({**parts, **{f"row_{k}": v for k, v in row_index.items()}})
    if "table_slots" in parts:
        if tables is None:
            raise ValueError("inputs packed with table writes need the device-side tables")
        width, need = tables.widths(parts["context_lens"], parts["table_cols"])
        at = [dev.pop(k) for k in ("table_slots", "table_cols", "table_blocks")]
        dev["block_tables"] = tables.step_tables(*at, dev["conv_slots"], width, need)
    conv = None
    if "conv_taps" in parts:
        conv = ConvStep(taps=dev["conv_taps"], tail=dev["conv_tail"])
    qsl = parts["query_start_loc"]
    lengths = np.diff(qsl)
    return StepInputs(
        lengths=lengths.tolist(),
        starts=(parts["context_lens"] - lengths).tolist(),
        conv_step=conv,
        row_index={k: dev[f"row_{k}"] for k in row_index},
        **{
            k: v for k, v in dev.items() if not k.startswith(("conv_", "row_")) or k == "conv_slots"
        },
    )


def build_inputs(
    seqs: list[Sequence],
    new_ids: list[list[int]],
    cache: KVCache,
    uploader: Uploader,
    all_logits: bool,
    row_index: dict[str, np.ndarray],
) -> StepInputs:
    """Host arrays for the step (blocks must already be reserved) and the lookup plan's index
    arrays, uploaded in one copy."""
    return upload_inputs(pack_inputs(seqs, new_ids, cache, all_logits), uploader, row_index)
