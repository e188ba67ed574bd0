"""One sampler for every caller: a whole step's rows at once, on the logits' device.

Per-row rules (OpenAI's and vLLM's), in vLLM's order: logit bias, the repetition penalty
(prompt and output tokens), presence/frequency penalties, temperature, top-k, top-p, min-p.
Sampling is an exponential race (``argmax(log p - log q)``, q ~ Exp(1) drawn from the
sequence's own generator), so a seeded sequence gets the same tokens whatever
else shares its batch. Sequences without a seed share the engine's generator: their noise is
one draw for all of them. Every value the API accepts is numerically safe: temperatures below
``GREEDY_BELOW`` are greedy, logits are shifted by their row maximum before scaling, and the
most likely token always stays eligible. One device-to-host copy brings back the step's tokens
together with any logprobs asked for.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass, field

import torch

from .inputs import to_device

GREEDY_BELOW = 1e-5  # temperatures under this sample greedily (as vLLM does)


class BadParams(ValueError):
    """Sampling parameters no sampler can honour; ``param`` names the offending one."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # vLLM's: > 1 discourages tokens seen in prompt or output
    logit_bias: dict[int, float] = field(default_factory=dict)
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None  # top-k alternatives per token (0: only the chosen token)
    echo: bool = False
    n: int = 1
    ignore_eos: bool = False
    min_tokens: int = 0  # no EOS and no stop string before this many tokens are generated
    prompt_logprobs: int | None = None  # top-k alternatives per prompt token (vLLM's extension)
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def penalised(self) -> bool:
        """Any penalty that reads the output ids."""
        return bool(
            self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
        )

    def check(self, vocab_size: int) -> None:
        """BadParams naming the first value that cannot work (non-finite, out of range, a
        token id outside the vocab); the HTTP schema is stricter, this guards every caller."""
        names = ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty")
        for name in (*names, "repetition_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise BadParams(f"{name} must be a finite number", name)
        if self.temperature < 0:
            raise BadParams("temperature must be 0 (greedy) or more", "temperature")
        if not 0 < self.top_p <= 1:
            raise BadParams("top_p must be in (0, 1]", "top_p")
        if self.repetition_penalty <= 0:
            raise BadParams("repetition_penalty must be greater than 0", "repetition_penalty")
        if not 0 <= self.min_p <= 1:
            raise BadParams("min_p must be in [0, 1]", "min_p")
        if self.top_k < -1:
            raise BadParams("top_k must be -1 or 0 (off) or a positive count", "top_k")
        if self.max_tokens < 0 or self.n < 1:
            raise BadParams("max_tokens must be 0 or more and n at least 1", "max_tokens")
        for name in ("logprobs", "prompt_logprobs"):
            if (getattr(self, name) or 0) < 0:
                raise BadParams(f"{name} must be 0 or more", name)
        if self.min_tokens < 0:
            raise BadParams("min_tokens must be 0 or more", "min_tokens")
        for tok, bias in self.logit_bias.items():
            if not 0 <= tok < vocab_size:
                raise BadParams(
                    f"logit_bias token id {tok} is outside the vocab (0..{vocab_size - 1})",
                    "logit_bias",
                )
            if not math.isfinite(bias):
                raise BadParams(f"logit_bias for token {tok} must be a finite number", "logit_bias")

    @property
    def prompt_logprobs_k(self) -> int | None:
        """Alternatives to keep per prompt token, or None: no prompt logprobs. An echo with
        logprobs needs them too."""
        ks = [
            k for k in (self.prompt_logprobs, self.logprobs if self.echo else None) if k is not None
        ]
        return max(ks) if ks else None

    def banned_tokens(self, num_generated: int, eos_token_id) -> list[int]:
        """Token ids this sequence may not sample next: the EOS ids until min_tokens are out.
        ``eos_token_id``: an id, None, or a collection of ids."""
        if eos_token_id is None or self.ignore_eos or num_generated >= self.min_tokens:
            return []
        if isinstance(eos_token_id, int):
            return [eos_token_id]
        return sorted(eos_token_id)

    def generator(self, choice: int, device: torch.device | str = "cpu") -> torch.Generator:
        seed = self.seed if self.seed is not None else random.randrange(1 << 62)
        return torch.Generator(device).manual_seed((seed * 1_000_003 + choice) % (1 << 63))


@dataclass
class TokenLogprobs:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), best first
    rank: int | None = None  # 1 + how many tokens are likelier (prompt logprobs only)


@dataclass
class SampleRow:
    """What the sampler needs to know about one row."""

    params: SamplingParams
    output_ids: list[int]
    generator: torch.Generator
    banned: list[int] = field(default_factory=list)  # ids masked to -inf for this step
    prompt_ids: list[int] = field(default_factory=list)  # seen tokens, for repetition_penalty


# repetition penalties are applied in float32: beyond these bounds the effect is the same (seen
# tokens pushed to the bottom or top) and 1 / penalty stays finite
PENALTY_RANGE = (1e-30, 1e30)


def adjust_logits(logits: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
    """vLLM's order: logit bias; the repetition penalty (a token seen in the prompt or the
    output has its logit divided by the penalty if positive, multiplied by it otherwise);
    OpenAI's penalty rule (logit -= presence * [count > 0] + frequency * count). One scatter
    per rule for the whole step; returns a new float32 tensor."""
    x = logits.float()
    bias = [(i, tok, b) for i, row in enumerate(rows) for tok, b in row.params.logit_bias.items()]
    x = _add_at(x, bias)
    x = _repetition(x, rows)
    pen = []
    for i, row in enumerate(rows):
        p = row.params
        if row.output_ids and (p.presence_penalty or p.frequency_penalty):
            for tok, n in Counter(row.output_ids).items():
                pen.append((i, tok, -(p.presence_penalty + p.frequency_penalty * n)))
    return _add_at(x, pen)


def _add_at(x: torch.Tensor, entries: list[tuple[int, int, float]]) -> torch.Tensor:
    """x with each (row, token, value) added (a new tensor; x is left as it was)."""
    if not entries:
        return x
    r, c, v = zip(*entries)
    dev = x.device
    at = (to_device(list(r), dev), to_device(list(c), dev))
    return x.index_put(at, to_device(list(v), dev, x.dtype), accumulate=True)


def _repetition(x: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
    """vLLM's repetition penalty for the whole step: one mask of seen tokens (scattered from
    every penalised row's prompt and output ids at once), one multiply."""
    hit = [i for i, row in enumerate(rows) if row.params.repetition_penalty != 1.0]
    if not hit:
        return x
    lo, hi = PENALTY_RANGE
    ids = [rows[i].prompt_ids + rows[i].output_ids for i in hit]
    dev = x.device
    at_rows = to_device([k for k, seen in enumerate(ids) for _ in seen], dev, torch.long)
    at_ids = to_device([t for seen in ids for t in seen], dev, torch.long)
    seen = torch.zeros(len(hit), x.shape[-1], dtype=torch.bool, device=dev)
    seen[at_rows, at_ids] = True
    pen = to_device([min(max(rows[i].params.repetition_penalty, lo), hi) for i in hit], dev)
    pen = pen.to(x.dtype)[:, None]
    at = to_device(hit, dev)
    sub = x[at]
    big = torch.finfo(x.dtype).max  # a huge logit times the penalty stays a number
    scaled = (sub * torch.where(sub > 0, 1.0 / pen, pen)).clamp(-big, big)
    out = x.clone()
    out[at] = torch.where(seen, scaled, sub)
    return out


def ban_tokens(x: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
    """Each row's banned ids to -inf; a new tensor (x may be the caller's logits)."""
    at = [(i, t) for i, row in enumerate(rows) for t in row.banned]
    if not at:
        return x
    r, c = zip(*at)
    dev = x.device
    idx = (to_device(list(r), dev), to_device(list(c), dev))
    return x.index_put(idx, x.new_full((), float("-inf")))


def mass_before(probs: torch.Tensor, integer: bool | None = None) -> torch.Tensor:
    """Probability mass of the tokens ranked above each one. Under deterministic algorithms on
    CUDA, torch refuses a float cumsum; there (``integer``, by default) the sum runs on
    integers: probabilities in units of 2**-52, exact and deterministic."""
    if integer is None:
        integer = probs.is_cuda and torch.are_deterministic_algorithms_enabled()
    if integer:
        units = torch.round(probs.double() * 2.0**52).long()
        return ((units.cumsum(dim=-1) - units).double() / 2.0**52).to(probs.dtype)
    return torch.cumsum(probs, dim=-1) - probs


def filtered_logprobs(
    x: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows sorted best first: (log-probabilities after temperature and filters, -inf where
    filtered; the vocab order). The best token is never filtered."""
    x = (x - x.max(dim=-1, keepdim=True).values) / temperature[:, None]
    vals, order = x.sort(dim=-1, descending=True)
    rank = torch.arange(vals.shape[-1], device=vals.device)
    keep = rank[None, :] < top_k[:, None]
    probs = torch.softmax(vals.masked_fill(~keep, float("-inf")), dim=-1)
    # drop a token once the mass before it reaches top_p; min_p is relative to the best
    keep &= mass_before(probs) < top_p[:, None]
    keep &= probs >= min_p[:, None] * probs[:, :1]
    keep[:, 0] = True
    return torch.log_softmax(vals.masked_fill(~keep, float("-inf")), dim=-1), order


def draw(logits: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
    """Token ids ``[S]`` (on the logits' device) for raw logits ``[S, V]``."""
    x = ban_tokens(adjust_logits(logits, rows), rows)
    tokens = x.argmax(dim=-1)
    sampled = [i for i, row in enumerate(rows) if not row.params.greedy]
    if not sampled:
        return tokens
    dev, V = x.device, x.shape[-1]
    ps = [rows[i].params for i in sampled]
    vec = lambda vals: to_device(vals, dev, torch.float32)
    at = to_device(sampled, dev)  # indexing with a host list would copy synchronously
    lp, order = filtered_logprobs(
        x[at],
        vec([p.temperature for p in ps]),
        to_device([min(p.top_k, V) if p.top_k > 0 else V for p in ps], dev),
        vec([p.top_p for p in ps]),
        vec([p.min_p for p in ps]),
    )
    q = torch.empty_like(lp)
    # one draw per generator: rows that share one (requests without a seed) get a block
    groups: dict[int, list[int]] = {}
    for k, i in enumerate(sampled):
        groups.setdefault(id(rows[i].generator), []).append(k)
    for ks in groups.values():
        gen = rows[sampled[ks[0]]].generator
        if len(ks) == 1:
            q[ks[0]].exponential_(generator=gen)
        else:
            block = torch.empty((len(ks), V), dtype=q.dtype, device=dev).exponential_(generator=gen)
            q[to_device(ks, dev)] = block
    pick = (lp - q.clamp_min_(1e-20).log()).argmax(dim=-1, keepdim=True)
    tokens[at] = order.gather(-1, pick).squeeze(-1)
    return tokens


def logprobs_of(logits: torch.Tensor, token_ids: torch.Tensor, k: int) -> torch.Tensor:
    """``[S, 2 + 2k]`` float64 on the logits' device: token id, its logprob, then the top-k
    ids and logprobs, under the model's raw distribution (what OpenAI's logprobs report)."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    chosen = lp.gather(-1, token_ids[:, None])
    top_v, top_i = torch.topk(lp, min(k, lp.shape[-1]), dim=-1)
    parts = [token_ids[:, None].double(), chosen.double(), top_i.double(), top_v.double()]
    return torch.cat(parts, dim=-1)


def unpack_logprobs(packed: list[list[float]], ks: list[int]) -> list[TokenLogprobs]:
    out = []
    for row, k in zip(packed, ks):
        width = (len(row) - 2) // 2
        top = [(int(row[2 + j]), row[2 + width + j]) for j in range(min(k, width))]
        out.append(TokenLogprobs(int(row[0]), row[1], top))
    return out


def sample(
    logits: torch.Tensor, rows: list[SampleRow]
) -> tuple[list[int], list[TokenLogprobs | None]]:
    """Sample a step: token ids, and each row's logprobs where its params ask for them. The
    only device-to-host copy of the step."""
    tokens = draw(logits, rows)
    want = [i for i, row in enumerate(rows) if row.params.logprobs is not None]
    if not want:
        return tokens.tolist(), [None] * len(rows)
    ks = [rows[i].params.logprobs for i in want]
    at = to_device(want, logits.device)
    packed = logprobs_of(logits[at], tokens[at], max(ks))
    host = torch.cat([tokens.double(), packed.flatten()]).tolist()
    S = len(rows)
    toks = [int(t) for t in host[:S]]
    width = packed.shape[1]
    table = [host[S + j * width : S + (j + 1) * width] for j in range(len(want))]
    got = dict(zip(want, unpack_logprobs(table, ks)))
    return toks, [got.get(i) for i in range(S)]


def prompt_logprobs(logits: torch.Tensor, targets: list[int], k: int) -> list[TokenLogprobs]:
    """Logprob and rank of each target token under the matching row of ``logits`` (prompt
    scoring), with its top-k alternatives. One copy to the host."""
    if not targets:
        return []
    ids = to_device(targets, logits.device)
    packed = logprobs_of(logits, ids, max(k, 0))
    lp = torch.log_softmax(logits.float(), dim=-1)
    rank = (lp > lp.gather(-1, ids[:, None])).sum(dim=-1, keepdim=True) + 1
    host = torch.cat([packed, rank.double()], dim=-1).tolist()
    out = unpack_logprobs([row[:-1] for row in host], [k] * len(targets))
    for entry, row in zip(out, host):
        entry.rank = int(row[-1])
    return out
