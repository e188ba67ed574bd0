"""Layout of ragged per-sequence [history, new] buffers for packed steps.

Several stateful pieces (the N-gram hasher, the Engram ShortConv) need, for each new token,
values a few positions back that may lie in the step's own new tokens or in the sequence's
carried history. Laying every sequence out as ``[history (n_hist), new tokens]`` in one flat
buffer turns "k positions back" into "index - k", whatever the mix of sequences.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class RaggedLayout:
    total: int  # size of the flat buffer
    hist_pos: np.ndarray  # [S * n_hist] where each sequence's history goes
    tok_pos: np.ndarray  # [N] where each new token goes
    tail_pos: np.ndarray  # [S, n_hist] the last n_hist entries of each sequence (next history)


def ragged_layout(lengths: np.ndarray, n_hist: int) -> RaggedLayout:
    lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
    S = lengths.shape[0]
    ext_len = lengths + n_hist
    ext_start = np.zeros(S, dtype=np.int64)
    np.cumsum(ext_len[:-1], out=ext_start[1:])
    seq_of_tok = np.repeat(np.arange(S), lengths)
    tok_start = np.zeros(S, dtype=np.int64)
    np.cumsum(lengths[:-1], out=tok_start[1:])
    local = np.arange(int(lengths.sum()), dtype=np.int64) - tok_start[seq_of_tok]
    hist = np.arange(n_hist, dtype=np.int64)
    return RaggedLayout(
        total=int(ext_len.sum()),
        hist_pos=(ext_start[:, None] + hist[None, :]).reshape(-1),
        tok_pos=ext_start[seq_of_tok] + n_hist + local,
        tail_pos=(ext_start + ext_len)[:, None] - n_hist + hist[None, :],
    )
