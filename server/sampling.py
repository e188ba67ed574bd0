"""Per-request sampling: penalties, temperature, top-k, top-p, seeded generators, logprobs.

Each sequence owns a torch.Generator seeded from its request's seed and choice index, so a
seeded request gives the same tokens whatever else shares its batch.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None  # top-k alternatives per token (0: only the chosen token)
    echo: bool = False
    n: int = 1

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    def generator(self, choice: int) -> torch.Generator:
        seed = self.seed if self.seed is not None else random.randrange(1 << 62)
        return torch.Generator().manual_seed((seed * 1_000_003 + choice) % (1 << 63))


@dataclass
class TokenLogprobs:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), best first


def apply_penalties(
    logits: torch.Tensor, output_ids: list[int], presence: float, frequency: float
) -> torch.Tensor:
    """OpenAI's rule: logit -= presence * [count > 0] + frequency * count."""
    if not output_ids or (presence == 0 and frequency == 0):
        return logits
    ids, counts = torch.unique(torch.tensor(output_ids), return_counts=True)
    logits = logits.clone()
    logits[ids] -= presence + frequency * counts.to(logits.dtype)
    return logits


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the mass before it already reaches top_p (the first always stays)
        drop = (torch.cumsum(probs, dim=-1) - probs) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(0, order, sorted_logits)
    return logits


def sample_token(
    logits: torch.Tensor, params: SamplingParams, output_ids: list[int], gen: torch.Generator
) -> int:
    """One token from raw ``[V]`` logits under the request's sampling rules."""
    logits = apply_penalties(
        logits.float(), output_ids, params.presence_penalty, params.frequency_penalty
    )
    if params.greedy:
        return int(torch.argmax(logits))
    logits = filter_top_k_top_p(logits / params.temperature, params.top_k, params.top_p)
    return int(torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=gen))


def token_logprobs(logits: torch.Tensor, token_id: int, k: int) -> TokenLogprobs:
    """Logprob of token_id and the top-k alternatives under the model's raw distribution."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    top: list[tuple[int, float]] = []
    if k > 0:
        vals, idx = torch.topk(lp, min(k, lp.shape[-1]))
        top = [(int(i), float(v)) for i, v in zip(idx, vals)]
    return TokenLogprobs(token_id, float(lp[token_id]), top)
