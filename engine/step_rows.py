"""A step's Engram row ids from per-slot n-gram state: a decode row hashes only its new token.

Each KV slot keeps the compressed ids of the last ``n - 1`` tokens its sequence fed to the
model (``history``, one preallocated array; a slot admitted afresh starts from pad ids). The
hash of the n-gram ending at a token splits in two (XOR is associative):

    mix_k = own * m_0  ^  partial_k,    partial_k = t_1 * m_1 ^ ... ^ t_k * m_k

``partial`` depends on the history alone, ``own`` on the token itself. A decode row (one new
token) costs a few array operations over the whole batch; with overlap its token may still be
on the device (a placeholder): the host computes ``partial`` and :meth:`Rows.finish` adds the
token's part once it is known, equal bit for bit to full hashing. Prompt chunks (several new
tokens, all known) go through :meth:`models.hashing.NgramHasher.hash_packed`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from models.llama import EngramForCausalLM


@dataclass
class Rows:
    """A step's rows ``{layer: [N, heads]}``; rows at ``wait`` (token positions) still need
    their token's part (``partial``: ``[W, layers, orders]``)."""

    rows: dict[int, np.ndarray]
    wait: np.ndarray
    partial: np.ndarray
    state: NgramState

    def finish(self, tokens: np.ndarray) -> dict[int, np.ndarray]:
        """The rows, given the raw token ids at ``wait``."""
        if self.wait.size and self.state.layers:
            st = self.state
            done = st.finish(st.model.compress(np.asarray(tokens, np.int64)), self.partial)
            for k, lid in enumerate(st.layers):
                self.rows[lid][self.wait] = done[:, k]
        return self.rows


class NgramState:
    def __init__(self, model: EngramForCausalLM, slots: int) -> None:
        h = model.hasher
        self.model, self.hasher, self.layers = model, h, list(h.layer_ids)
        self.n1 = h.max_ngram_size - 1
        self.history = np.full((slots, self.n1), h.pad_id, dtype=np.int64)
        if not self.layers:  # a backbone without Engram layers: no rows, no state to keep
            return
        self.mult = np.stack([h.multipliers[lid] for lid in self.layers])  # [L, n]
        self.moduli = np.stack([h.moduli(lid) for lid in self.layers])  # [L, orders, heads]
        self.offsets = np.stack([h.head_offsets(lid) for lid in self.layers])  # [L, orders*heads]

    def reset(self, slots: list[int]) -> None:
        if slots:
            self.history[slots] = self.hasher.pad_id

    def partial(self, history: np.ndarray) -> np.ndarray:
        """``[D, L, orders]``: partial_k of each row, from its history (oldest first). (Array
        products wrap silently in int64, as the reference's do.) One product, then one XOR
        per order in place (a ufunc's accumulate over the short last axis costs more)."""
        prod = history[:, None, ::-1] * self.mult[None, :, 1:]  # t_1 * m_1, t_2 * m_2, ...
        for k in range(1, self.n1):  # partial_{k+1} = partial_k ^ t_{k+1} * m_{k+1}
            np.bitwise_xor(prod[:, :, k], prod[:, :, k - 1], out=prod[:, :, k])
        return prod

    def finish(self, own: np.ndarray, partial: np.ndarray) -> np.ndarray:
        """``[D, L, orders * heads]`` global rows from the compressed own ids and partials."""
        mix = (own[:, None, None] * self.mult[None, :, :1]) ^ partial
        rows = mix[..., None] % self.moduli[None]
        return rows.reshape(own.shape[0], len(self.layers), -1) + self.offsets[None]

    def step(
        self,
        slots: np.ndarray,
        new_ids: list[list[int]],
        known: list[bool],
        lengths: np.ndarray | None = None,
        total: int | None = None,
    ) -> Rows:
        """Rows of a step: per sequence (``slots``) its new ids (``lengths``: their counts,
        ``total``: their sum, when the caller has them); ``known[i]`` False: sequence i feeds
        one token that is still on the device (its id there is ignored). Histories advance
        here; a waiting token's id enters its history in :meth:`resolved`."""
        if lengths is None:
            lengths = np.fromiter(map(len, new_ids), np.int64, len(new_ids))
        if not self.layers:  # no rows; placeholders still need their token (``wait``)
            wait = (np.cumsum(lengths) - lengths)[~np.fromiter(known, bool, len(known))]
            return Rows({}, wait, np.empty((wait.size, 0, self.n1), np.int64), self)
        n = len(new_ids)
        if total is None:
            total = int(lengths.sum())
        if total == n and not any(known):  # overlap's steady state: every token on the device
            hist = self.history[slots]
            part = self.partial(hist)
            heads = self.offsets.shape[1]  # rows filled in by Rows.finish once tokens are known
            rows = dict(zip(self.layers, np.empty((len(self.layers), n, heads), np.int64)))
            hist[:, :-1] = hist[:, 1:]  # a copy (fancy indexing): shifted in place
            hist[:, -1] = self.hasher.pad_id
            self.history[slots] = hist
            return Rows(rows, np.arange(n), part, self)
        if total == n:  # a decode step: every row from its slot's history, a few array ops
            part = self.partial(self.history[slots])
            ids = np.array([x[0] for x in new_ids], np.int64)
            all_known = all(known)
            have = None if all_known else np.fromiter(known, bool, n)
            own = self.model.compress(ids if all_known else np.where(have, ids, 0))
            done = self.finish(own, part)
            rows = {lid: done[:, k] for k, lid in enumerate(self.layers)}
            self.history[slots, :-1] = self.history[slots, 1:]
            self.history[slots, -1] = own if all_known else np.where(have, own, self.hasher.pad_id)
            if all_known:
                return Rows(rows, np.empty(0, np.int64), part[:0], self)
            return Rows(rows, np.flatnonzero(~have), part[~have], self)
        heads = self.offsets.shape[1]
        rows = {lid: np.empty((total, heads), np.int64) for lid in self.layers}
        starts = np.cumsum(lengths) - lengths
        at, chunks = np.flatnonzero(lengths == 1), np.flatnonzero(lengths != 1)
        wait, partial = np.empty(0, np.int64), np.empty((0, len(self.layers), self.n1), np.int64)
        if at.size:
            sub = self.step(
                slots[at], [new_ids[i] for i in at], [known[i] for i in at], lengths[at]
            )
            for lid in self.layers:
                rows[lid][starts[at]] = sub.rows[lid]
            wait, partial = starts[at[sub.wait]], sub.partial
        if not all(known[i] for i in chunks):
            raise ValueError("a prompt chunk's tokens must all be known")
        s = slots[chunks]
        ids = np.fromiter((t for i in chunks for t in new_ids[i]), np.int64)
        got, nxt = self.model.row_ids(self.history[s], ids, lengths[chunks])
        pos = np.concatenate([np.arange(starts[i], starts[i] + lengths[i]) for i in chunks])
        for lid in self.layers:
            rows[lid][pos] = got[lid]
        self.history[s] = nxt
        return Rows(rows, wait, partial, self)

    def resolved(self, slots: np.ndarray, tokens: np.ndarray) -> None:
        """Tokens fed as placeholders are known now: each slot's newest history entry."""
        if len(slots) and self.layers:
            lookup = self.model.compression  # sampled ids are never negative: one lookup
            self.history[slots, -1] = tokens if lookup is None else lookup[tokens]
