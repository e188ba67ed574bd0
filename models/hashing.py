"""Multi-head N-gram hashing, bit-exact with the public Engram reference.

Per layer, odd multipliers come from numpy's PCG64 seeded with ``seed + 10007 * layer_id``.
The n-gram ending at position t mixes ``t0*m0 ^ t1*m1 ^ ...`` (t_k = compressed id k positions
back, pad before the start) in wrapping int64; head j of order n takes ``mix % prime_j``.
"""

from __future__ import annotations

import numpy as np

from .ragged import ragged_layout

_PRIME_LAYER_STRIDE = 10007
_MR_BASES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)


def is_prime(n: int) -> bool:
    """Deterministic Miller-Rabin for every n < 3.3e24 (far beyond any table size)."""
    if n < 2:
        return False
    for p in _MR_BASES:
        if n % p == 0:
            return n == p
    d, s = n - 1, 0
    while d % 2 == 0:
        d //= 2
        s += 1
    for a in _MR_BASES:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


class NgramHasher:
    """Hashes compressed token ids into head-local row indices for every Engram layer."""

    def __init__(
        self,
        engram_vocab_size: list[int],
        max_ngram_size: int,
        n_head_per_ngram: int,
        layer_ids: list[int],
        compressed_vocab_size: int,
        pad_id: int,
        seed: int,
    ) -> None:
        if len(engram_vocab_size) != max_ngram_size - 1:
            raise ValueError(
                f"engram_vocab_size needs {max_ngram_size - 1} entries "
                f"(orders 2..{max_ngram_size}), got {len(engram_vocab_size)}"
            )
        self.max_ngram_size = int(max_ngram_size)
        self.n_head_per_ngram = int(n_head_per_ngram)
        self.layer_ids = [int(x) for x in layer_ids]
        self.pad_id = int(pad_id)
        self.compressed_vocab_size = int(compressed_vocab_size)

        half_bound = max(1, (int(np.iinfo(np.int64).max) // self.compressed_vocab_size) // 2)
        self.multipliers: dict[int, np.ndarray] = {}
        for lid in self.layer_ids:
            rng = np.random.default_rng(int(seed + _PRIME_LAYER_STRIDE * lid))
            r = rng.integers(low=0, high=half_bound, size=(self.max_ngram_size,), dtype=np.int64)
            self.multipliers[lid] = r * 2 + 1

        # Successive primes above each order's size; a prime is never reused across orders or
        # layers (one set shared by all layers, in layer order).
        seen: set[int] = set()
        self._head_sizes: dict[int, list[list[int]]] = {}
        for lid in self.layer_ids:
            per_order = []
            for n in range(2, self.max_ngram_size + 1):
                cand, heads = int(engram_vocab_size[n - 2]) - 1, []
                for _ in range(self.n_head_per_ngram):
                    cand += 1
                    while not is_prime(cand) or cand in seen:
                        cand += 1
                    seen.add(cand)
                    heads.append(cand)
                per_order.append(heads)
            self._head_sizes[lid] = per_order
        self._moduli = {
            lid: np.array(sizes, dtype=np.int64) for lid, sizes in self._head_sizes.items()
        }

    # --- layout ----------------------------------------------------------------
    def head_sizes(self, layer_id: int) -> list[list[int]]:
        """Table size of every head, ``[order][head]``, for one layer."""
        return [list(h) for h in self._head_sizes[layer_id]]

    def moduli(self, layer_id: int) -> np.ndarray:
        """``[orders, heads]`` int64 table sizes of one layer (what each head's mix is taken
        modulo)."""
        return self._moduli[layer_id].copy()

    def flat_head_sizes(self, layer_id: int) -> list[int]:
        return [s for order in self._head_sizes[layer_id] for s in order]

    def head_offsets(self, layer_id: int) -> np.ndarray:
        """Row offset of each head in the layer's concatenated table."""
        sizes = self.flat_head_sizes(layer_id)
        return np.concatenate([[0], np.cumsum(sizes[:-1], dtype=np.int64)]).astype(np.int64)

    def table_rows(self, layer_id: int) -> int:
        return int(sum(self.flat_head_sizes(layer_id)))

    @property
    def heads_per_layer(self) -> int:
        return (self.max_ngram_size - 1) * self.n_head_per_ngram

    # --- hashing ---------------------------------------------------------------
    def _mix_heads(self, taps: list[np.ndarray], layer_id: int) -> np.ndarray:
        """taps[k] = ids k positions back, any shape S; returns S + [orders*heads]."""
        mult = self.multipliers[layer_id]
        moduli = self._moduli[layer_id]
        out = []
        with np.errstate(over="ignore"):
            mix = taps[0] * mult[0]
            for k in range(1, self.max_ngram_size):
                mix = np.bitwise_xor(mix, taps[k] * mult[k])
                out.append(mix[..., None] % moduli[k - 1])
        return np.concatenate(out, axis=-1)

    def hash(self, compressed_ids: np.ndarray) -> dict[int, np.ndarray]:
        """Full-sequence hashing: ``[B, T]`` compressed ids -> ``{layer: [B, T, orders*heads]}``."""
        x = np.asarray(compressed_ids, dtype=np.int64)
        if x.ndim != 2:
            raise ValueError(f"hash expects [B, T] ids, got shape {x.shape}")
        n1 = self.max_ngram_size - 1
        padded = np.concatenate([np.full((x.shape[0], n1), self.pad_id, np.int64), x], axis=1)
        T = x.shape[1]
        taps = [padded[:, n1 - k : n1 - k + T] for k in range(self.max_ngram_size)]
        return {lid: self._mix_heads(taps, lid) for lid in self.layer_ids}

    def initial_history(self, num_seqs: int = 1) -> np.ndarray:
        """History of a sequence with no tokens yet: pad ids, as the full hash sees them."""
        return np.full((num_seqs, self.max_ngram_size - 1), self.pad_id, dtype=np.int64)

    def hash_packed(
        self, history: np.ndarray, new_ids: np.ndarray, lengths: np.ndarray
    ) -> tuple[dict[int, np.ndarray], np.ndarray]:
        """Incremental hashing for a packed step of ragged sequences.

        history: ``[S, max_ngram_size - 1]`` last compressed ids of each sequence (oldest
        first; pad where the sequence is shorter). new_ids: ``[N]`` the step's new compressed
        ids, sequence after sequence; lengths: ``[S]`` new ids per sequence (sum N).
        Returns ``({layer: [N, orders*heads]}, next_history)``; O(1) work per new token.
        """
        history = np.asarray(history, dtype=np.int64)
        new_ids = np.asarray(new_ids, dtype=np.int64).reshape(-1)
        lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
        n1 = self.max_ngram_size - 1
        S = lengths.shape[0]
        if history.shape != (S, n1):
            raise ValueError(f"history must be [{S}, {n1}], got {list(history.shape)}")
        if int(lengths.sum()) != new_ids.shape[0]:
            raise ValueError(f"lengths sum to {int(lengths.sum())}, but {new_ids.shape[0]} ids")
        lay = ragged_layout(lengths, n1)
        ext = np.empty(lay.total, dtype=np.int64)
        ext[lay.hist_pos] = history.reshape(-1)
        ext[lay.tok_pos] = new_ids
        taps = [ext[lay.tok_pos - k] for k in range(self.max_ngram_size)]
        out = {lid: self._mix_heads(taps, lid) for lid in self.layer_ids}
        return out, ext[lay.tail_pos]

    def hash_incremental(
        self, history: np.ndarray, new_ids: np.ndarray
    ) -> tuple[dict[int, np.ndarray], np.ndarray]:
        """Equal-length form: history ``[B, n-1]``, new ids ``[B, T]`` -> ``{layer: [B, T, H]}``."""
        new_ids = np.asarray(new_ids, dtype=np.int64)
        B, T = new_ids.shape
        flat, nxt = self.hash_packed(history, new_ids.reshape(-1), np.full(B, T, np.int64))
        return {lid: h.reshape(B, T, -1) for lid, h in flat.items()}, nxt
