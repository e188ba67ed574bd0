"""The Engram module, with the reference implementation's parameter names.

Lookup and fusion are split: ``fuse*`` take the gathered rows as input, so the table can live
anywhere (GPU, pinned host memory through the offload engine). ``multi_head_embedding`` stays
for the simple resident path and as the place a checkpoint's table loads into.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .ragged import ragged_layout


def embedding(num: int, dim: int) -> nn.Embedding:
    """``nn.Embedding`` with torch's N(0, 1) init, except on the meta device (checkpoint
    loading), where it skips torch's init: that path imports the compiler stack (~1.5 s)."""
    weight = torch.empty(num, dim)
    if weight.device.type != "meta":
        nn.init.normal_(weight)
    return nn.Embedding(num, dim, _weight=weight)


class MultiHeadEmbedding(nn.Module):
    """One concatenated table; head j's rows start at ``offsets[j]``."""

    def __init__(self, head_sizes: list[int], dim: int) -> None:
        super().__init__()
        offsets = [0]
        for n in head_sizes[:-1]:
            offsets.append(offsets[-1] + n)
        self.register_buffer("offsets", torch.tensor(offsets, dtype=torch.long))
        self.embedding = embedding(sum(head_sizes), dim)

    def forward(self, head_ids: torch.Tensor) -> torch.Tensor:
        """``[..., H]`` head-local ids -> ``[..., H, dim]`` rows."""
        return self.embedding(head_ids + self.offsets)


@dataclass
class ConvStep:
    """Per-step index for the causal dilated conv over packed ragged sequences.

    The conv reads ``rows = [every sequence's history rows (S * L), the new rows (N)]``:
    ``taps[n, j]`` is the row kernel tap j reads for new token n, and ``tail[s]`` the rows that
    become sequence s's next history. Gathers only (no scatter): deterministic and capturable
    in a CUDA graph.
    """

    taps: torch.Tensor  # [N, kernel] long
    tail: torch.Tensor  # [S, L] long

    @staticmethod
    def host_arrays(lengths, kernel_size: int, dilation: int) -> dict[str, np.ndarray]:
        """The index arrays (int64, on the host) for sequences advancing by ``lengths`` new
        tokens each; the engine uploads them with the rest of a step."""
        lay = ragged_layout(np.asarray(lengths), (kernel_size - 1) * dilation)
        # row of ``rows`` behind each position of the per-sequence [history, new] layout
        order = np.empty(lay.total, dtype=np.int64)
        order[lay.hist_pos] = np.arange(lay.hist_pos.size)
        order[lay.tok_pos] = lay.hist_pos.size + np.arange(lay.tok_pos.size)
        lags = (kernel_size - 1 - np.arange(kernel_size)) * dilation
        return dict(taps=order[lay.tok_pos[:, None] - lags[None, :]], tail=order[lay.tail_pos])

    @classmethod
    def build(cls, lengths, kernel_size: int, dilation: int, device=None) -> ConvStep:
        """Index for sequences advancing by ``lengths`` new tokens each."""
        arrays = cls.host_arrays(lengths, kernel_size, dilation)
        t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)
        return cls(**{k: t(v) for k, v in arrays.items()})


class ShortConv(nn.Module):
    """RMSNorm per hyper-connection branch, depthwise causal dilated conv, SiLU."""

    def __init__(
        self,
        hidden_size: int,
        kernel_size: int = 4,
        dilation: int = 1,
        norm_eps: float = 1e-5,
        hc_mult: int = 1,
    ) -> None:
        super().__init__()
        self.hc_mult = hc_mult
        self.kernel_size = kernel_size
        self.dilation = dilation
        channels = hidden_size * hc_mult
        self.conv = nn.Conv1d(
            channels,
            channels,
            kernel_size=kernel_size,
            groups=channels,
            bias=False,
            padding=(kernel_size - 1) * dilation,
            dilation=dilation,
        )
        self.norms = nn.ModuleList([nn.RMSNorm(hidden_size, eps=norm_eps) for _ in range(hc_mult)])

    @property
    def history_len(self) -> int:
        """Normed rows a sequence must carry between steps: ``(kernel - 1) * dilation``."""
        return (self.kernel_size - 1) * self.dilation

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., G, C]`` -> ``[..., G * C]``."""
        return torch.cat([self.norms[g](x[..., g, :]) for g in range(self.hc_mult)], dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Full sequences: ``[B, T, G, C]`` -> ``[B, T, G, C]`` (zeros before the start)."""
        B, T, G, C = x.shape
        y = self.conv(self._norm(x).transpose(1, 2))[..., :T]
        return F.silu(y).transpose(1, 2).reshape(B, T, G, C)

    def forward_packed(
        self, x: torch.Tensor, history: torch.Tensor, step: ConvStep
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Packed ragged step: x ``[N, G, C]``, history ``[S, L, G*C]`` (normed, oldest first).

        Returns the output ``[N, G, C]`` and every sequence's next history ``[S, L, G*C]``.
        """
        N, G, C = x.shape
        normed = self._norm(x)
        rows = torch.cat([history.reshape(-1, G * C).to(normed.dtype), normed])
        w = self.conv.weight[:, 0, :]  # [G*C, kernel]
        y = (rows[step.taps] * w.t().unsqueeze(0)).sum(dim=1)
        return F.silu(y).reshape(N, G, C), rows[step.tail]


class Engram(nn.Module):
    def __init__(
        self,
        hidden_size: int,
        head_sizes: list[int],
        head_dim: int,
        max_ngram_size: int,
        kernel_size: int = 4,
        hc_mult: int = 1,
    ) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.hc_mult = hc_mult
        self.num_heads = len(head_sizes)
        self.head_dim = head_dim
        engram_hidden = self.num_heads * head_dim
        self.multi_head_embedding = MultiHeadEmbedding(head_sizes, head_dim)
        self.short_conv = ShortConv(
            hidden_size, kernel_size=kernel_size, dilation=max_ngram_size, hc_mult=hc_mult
        )
        self.value_proj = nn.Linear(engram_hidden, hidden_size)
        self.key_projs = nn.ModuleList(
            [nn.Linear(engram_hidden, hidden_size) for _ in range(hc_mult)]
        )
        # eps=None: torch's default (finfo eps), as the reference builds them.
        self.norm1 = nn.ModuleList([nn.RMSNorm(hidden_size) for _ in range(hc_mult)])
        self.norm2 = nn.ModuleList([nn.RMSNorm(hidden_size) for _ in range(hc_mult)])

    def gated_value(self, hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """hidden ``[..., G, D]``, rows ``[..., H, dim]`` -> gated value ``[..., G, D]``."""
        e = rows.flatten(start_dim=-2).to(hidden.dtype)
        gates = []
        for g in range(self.hc_mult):
            key = self.norm1[g](self.key_projs[g](e))
            query = self.norm2[g](hidden[..., g, :])
            gate = (key * query).sum(dim=-1) / math.sqrt(self.hidden_size)
            gate = gate.abs().clamp_min(1e-6).sqrt() * gate.sign()
            gates.append(gate.sigmoid().unsqueeze(-1))
        return torch.stack(gates, dim=-2) * self.value_proj(e).unsqueeze(-2)

    def fuse(self, hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Full sequences: hidden ``[B, T, G, D]``, rows ``[B, T, H, dim]``."""
        value = self.gated_value(hidden, rows)
        return value + self.short_conv(value)

    def fuse_packed(
        self, hidden: torch.Tensor, rows: torch.Tensor, history: torch.Tensor, step: ConvStep
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Packed step: hidden ``[N, G, D]``, rows ``[N, H, dim]``; returns (out, next history)."""
        value = self.gated_value(hidden, rows)
        conv, next_hist = self.short_conv.forward_packed(value, history, step)
        return value + conv, next_hist

    def forward(self, hidden: torch.Tensor, head_ids: torch.Tensor) -> torch.Tensor:
        """Resident path, full sequences: hidden ``[B, T, G, D]``, head ids ``[B, T, H]``."""
        return self.fuse(hidden, self.multi_head_embedding(head_ids))


@dataclass
class EngramGroup:
    """The tokens of one Engram memory in a packed step: its module, which rows of the step
    are its tokens (None: all of them) and their gathered rows ``[n, heads, dim]``."""

    module: Engram
    tokens: torch.Tensor | None
    rows: torch.Tensor


def fuse_groups(
    groups: list[EngramGroup], hidden: torch.Tensor, history: torch.Tensor, step: ConvStep
) -> tuple[torch.Tensor, torch.Tensor]:
    """:meth:`Engram.fuse_packed` of a step whose tokens read different memories: each group
    through its own module (gate, value, conv weights), the conv over the one packed layout.
    Every sequence's history was normed by its own memory's module, so one gather of the
    step's conv rows serves every group. Tokens no group covers (a memory without Engram
    layers) get a zero output."""
    if len(groups) == 1 and groups[0].tokens is None:
        return groups[0].module.fuse_packed(hidden, groups[0].rows, history, step)
    N, G, D = hidden.shape
    value = hidden.new_zeros(N, G, D)
    normed = hidden.new_zeros(N, G * D)
    for g in groups:
        v = g.module.gated_value(hidden[g.tokens], g.rows)
        value[g.tokens] = v
        normed[g.tokens] = g.module.short_conv._norm(v)
    rows = torch.cat([history.reshape(-1, G * D).to(normed.dtype), normed])
    y = normed.new_zeros(N, G * D)
    for g in groups:
        w = g.module.short_conv.conv.weight[:, 0, :]  # [G*D, kernel]
        y[g.tokens] = (rows[step.taps[g.tokens]] * w.t().unsqueeze(0)).sum(dim=1)
    return value + F.silu(y).reshape(N, G, D), rows[step.tail]
