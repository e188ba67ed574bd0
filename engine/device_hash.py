"""The token's part of a step's n-gram rows in torch, on whatever device the tokens are.

:class:`engine.step_rows.NgramState` splits a row's hash in two: ``partial`` from the slot's
history (known on the host when the step is prepared) and the new token's own part. With
overlap the new token is step N's sample, still on the device; :class:`DeviceRows` finishes
the rows there (compression lookup, ``own * m_0 ^ partial``, ``% prime``, head offsets), so
step N+1's gathers can be issued before the host has read step N's tokens.

Bit for bit equal to the numpy hasher: in int64, a compressed id c < V times a multiplier
m < int64 max // V (how :class:`models.hashing.NgramHasher` draws them) is below 2**63, and an
XOR of non-negative int64 stays non-negative, so no product wraps and every ``mix`` is exact;
``torch.remainder`` (the divisor's sign, like numpy's ``%``) of a non-negative mix by a
positive prime is the numpy result. Ids outside the compressed vocabulary (nothing the engine
feeds) wrap the same way in both on every platform torch and numpy build for (two's
complement multiplication), which the tests check at the int64 edges.
"""

from __future__ import annotations

import numpy as np
import torch

from offload.cuda_gather import UvaGather
from offload.plan import LayerPlan, LookupPlan
from offload.prefetch import Prefetcher, ResidentGather

from .step_rows import NgramState, Rows


def reads_device_ids(rows: Prefetcher) -> bool:
    """Whether a path's gather needs the step's row ids on the device only: resident tables
    and the UVA kernel, without de-duplication (its np.unique runs on the host). Hot caches
    and the file tier (other classes, wrapping these) plan on the host."""
    return type(rows) in (ResidentGather, UvaGather) and not rows.dedup


class DeviceLayerPlan(LayerPlan):
    """A layer whose row ids exist on the device only: ``fetch`` (and ``positions``) are
    stand-ins of the right length for the host's counts; the values are in the index."""

    @property
    def unique_rows(self) -> int:  # unknown without reading the ids back: every row counts
        return int(self.fetch.size)


def device_plan(
    rows: dict[int, torch.Tensor], sort: bool
) -> tuple[LookupPlan, dict[str, torch.Tensor]]:
    """The lookup plan of rows ``{layer: [N, heads]}`` on the device and its index tensors
    (``fetch{layer}``; sorted with ``positions{layer}`` for the UVA kernel, as
    :meth:`LayerPlan.sorted` sorts on the host). No bounds check: hashed rows are in range
    by construction (a remainder by the head's size plus the head's offset)."""
    layers, index = {}, {}
    for lid in sorted(rows):
        n, heads = rows[lid].shape
        flat = rows[lid].reshape(-1)
        stand = np.broadcast_to(np.int64(0), (flat.numel(),))
        if sort:
            index[f"fetch{lid}"], index[f"positions{lid}"] = torch.sort(flat, stable=True)
            layers[lid] = DeviceLayerPlan(lid, stand, None, n, heads, stand)
        else:
            index[f"fetch{lid}"] = flat
            layers[lid] = DeviceLayerPlan(lid, stand, None, n, heads)
    return LookupPlan(layers), index


def device_arrays(rows: Rows) -> dict[str, np.ndarray]:
    """What a step whose placeholders' tokens are on the device sends in its one upload,
    besides its inputs: the host-known rows (``rows{layer}``), the placeholders' token
    positions (``wait``) and their partials (``partial``)."""
    arrays = {f"rows{lid}": a for lid, a in rows.rows.items()}
    arrays["wait"], arrays["partial"] = rows.wait, rows.partial
    return arrays


def fill_in(
    dev: DeviceRows,
    uploaded: dict[str, torch.Tensor],
    input_ids: torch.Tensor,
    tokens: torch.Tensor,
    sort: bool,
) -> tuple[LookupPlan, dict[str, torch.Tensor], torch.cuda.Event | None]:
    """The device side of such a step, on the current stream: ``tokens`` (the placeholders'
    raw ids, on the device) written into ``input_ids`` (the uploaded view) at ``wait``, their
    rows finished into the uploaded ``rows{layer}`` in place, and the lookup plan and index
    over them (sorted for the UVA kernel); the event the gathers wait for (None off CUDA)."""
    wait = uploaded["wait"]
    input_ids[wait] = tokens
    rows = {lid: uploaded[f"rows{lid}"] for lid in dev.layers}
    plan, index = device_plan(dev.fill(rows, wait, tokens, uploaded["partial"]), sort)
    ready = None  # the side stream's gathers wait for the index made here
    if tokens.is_cuda:
        ready = torch.cuda.Event()
        ready.record()
    return plan, index, ready


class DeviceRows:
    """One model's hashing constants on ``device``; finishes rows from token tensors there."""

    def __init__(self, state: NgramState, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.layers = list(state.layers)
        self.pad_id = state.hasher.pad_id
        lookup = state.model.compression
        self.lookup = None if lookup is None else self._put(lookup)
        if not self.layers:
            return
        self.mult = self._put(state.mult)  # [L, n]
        self.moduli = self._put(state.moduli)  # [L, orders, heads]
        self.offsets = self._put(state.offsets)  # [L, orders * heads]

    def _put(self, a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)).to(self.device)

    def compress(self, tokens: torch.Tensor) -> torch.Tensor:
        """Raw -> compressed ids, as :func:`models.tokenizer.compress_ids` (negative ids pass
        through)."""
        tokens = tokens.to(torch.int64)
        if self.lookup is None:
            return tokens
        return torch.where(tokens >= 0, self.lookup[tokens.clamp(min=0)], tokens)

    def partial(self, history: torch.Tensor) -> torch.Tensor:
        """``[D, L, orders]``, as :meth:`NgramState.partial` (tests; the engine's partials
        come from the host, where the histories are)."""
        prod = history.flip(-1)[:, None, :] * self.mult[None, :, 1:]
        out = prod.clone()
        for k in range(1, out.shape[2]):
            out[:, :, k] = out[:, :, k - 1] ^ prod[:, :, k]
        return out

    def finish(self, own: torch.Tensor, partial: torch.Tensor) -> torch.Tensor:
        """``[D, L, orders * heads]`` global rows from compressed own ids ``[D]`` and partials
        ``[D, L, orders]``, as :meth:`NgramState.finish`."""
        mix = (own[:, None, None] * self.mult[None, :, :1]) ^ partial
        rows = torch.remainder(mix[..., None], self.moduli[None])
        return rows.reshape(own.shape[0], len(self.layers), -1) + self.offsets[None]

    def rows(self, tokens: torch.Tensor, partial: torch.Tensor) -> torch.Tensor:
        """Rows of raw token ids ``[D]`` (on this device) given their partials."""
        return self.finish(self.compress(tokens), partial.to(self.device))

    def fill(
        self, rows: dict[int, torch.Tensor], wait: torch.Tensor, tokens: torch.Tensor, partial
    ) -> dict[int, torch.Tensor]:
        """``rows`` ({layer: [N, heads]} on this device, the host-known rows) with the rows at
        token positions ``wait`` finished from ``tokens``; in place, also returned."""
        if wait.numel() and self.layers:
            done = self.rows(tokens, partial)
            for k, lid in enumerate(self.layers):
                rows[lid][wait] = done[:, k]
        return rows
