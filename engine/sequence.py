"""One object per sequence: its tokens, sampling rules, cache bookkeeping and timings.

The scheduler moves it between waiting, running and finished; the KV cache writes its block
table and slot; the model runner advances ``num_computed`` and the n-gram history; the engine
appends sampled tokens. Nothing else about a sequence lives anywhere else.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from .detokenize import Detokenizer
from .sampling import SamplingParams, TokenLogprobs

PLACEHOLDER = -1  # a new token's id while it is still on the device (overlap)
# a step's new ids for a sequence fed its in-flight token: one shared list, never mutated
# (the scheduler hands out this object; ``ids is PLACEHOLDER_IDS`` tells it apart)
PLACEHOLDER_IDS = [PLACEHOLDER]


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False, slots=True)
class Sequence:
    request_id: str
    choice: int
    prompt_ids: list[int]
    params: SamplingParams
    generator: torch.Generator
    detok: Detokenizer | None = None
    arrival: float = field(default_factory=time.monotonic)
    status: Status = Status.WAITING
    output_ids: list[int] = field(default_factory=list)
    output_logprobs: list[TokenLogprobs] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprobs | None] = field(default_factory=list)
    finish_reason: str | None = None
    # cache bookkeeping (reset on preemption)
    num_computed: int = 0  # tokens of prompt + output already in the KV cache
    block_table: list[int] = field(default_factory=list)
    slot: int = -1  # row of the per-sequence Engram conv state; -1 when not running
    # overlap: tokens sampled on the device that the host has not read yet (0 or 1), and the
    # row of the in-flight step that holds it
    inflight: int = 0
    inflight_row: int = -1
    sample_row: object | None = None  # its sampler row, kept while nothing in it changes
    memory: object | None = None  # the Engram memory version it reads (engine/memories.py)
    # output tokens at which it ends by length (max_tokens or the context limit), set when
    # the engine queues it; 0: not known, every token takes the engine's full path
    end_at: int = 0
    # worked out once when the engine queues it, so the per-step loops test one attribute:
    # ``plain``: no logprobs asked for and its detokenizer (if any) on its plain path (no
    # stop strings, byte-level): a token that ends nothing is a lookup for its text;
    # ``same_row``: no penalties, no min_tokens: its sampler row never changes
    plain: bool = False
    same_row: bool = False
    # timings (monotonic seconds)
    scheduled_at: float | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def pending_ids(self) -> list[int]:
        """Tokens not yet in the cache (prompt remainder, or the last sampled token), without
        copying the whole context (this runs for every sequence every step)."""
        done, prompt = self.num_computed, self.prompt_ids
        if self.inflight:  # the token is still on the device: a placeholder in its place
            return PLACEHOLDER_IDS
        if done >= len(prompt):
            return self.output_ids[done - len(prompt) :]
        return prompt[done:] + self.output_ids

    def ends_with_inflight(self, max_tokens_per_seq: int) -> bool:
        """Its token on the device is its last one by length (max_tokens or the context):
        the next step need not run it."""
        made = len(self.output_ids) + self.inflight
        return made >= self.params.max_tokens or self.num_tokens + self.inflight >= (
            max_tokens_per_seq
        )

    @property
    def prefilling(self) -> bool:
        return self.num_computed < len(self.prompt_ids)

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.params.prompt_logprobs_k is not None

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED
