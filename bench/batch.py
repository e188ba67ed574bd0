"""The benchmark's workloads on the serving engine: prompts prefilled in chunks under a token
budget (no decode while a prompt is pending, so the phases time apart), then greedy decode with
every sequence in each step. Same engine, scheduler, runner and sampler as the server.
"""

from __future__ import annotations

import numpy as np
from tqdm import tqdm

from engine.config import EngineConfig
from engine.engine import Engine
from engine.kv_cache import blocks_for
from engine.sampling import SamplingParams
from models.llama import EngramForCausalLM
from offload.prefetch import Prefetcher

BLOCK_SIZE = 16


def make_prompts(rng: np.random.Generator, n: int, lo: int, hi: int, vocab: int) -> list[list[int]]:
    """``n`` prompts of random token ids, lengths Uniform(lo, hi)."""
    lengths = rng.integers(lo, hi + 1, size=n)
    return [rng.integers(0, vocab, size=int(k)).tolist() for k in lengths]


class Batch:
    def __init__(
        self,
        model: EngramForCausalLM,
        rows: Prefetcher,
        prompts: list[list[int]],
        decode_tokens: int,
        budget: int,
    ) -> None:
        blocks = sum(blocks_for(len(p) + decode_tokens + 1, BLOCK_SIZE) for p in prompts)
        config = EngineConfig(
            max_num_seqs=len(prompts),
            max_num_batched_tokens=budget,
            kv_blocks=blocks,
            block_size=BLOCK_SIZE,
            prefill_first=True,
        )
        self.engine = Engine(model, config, rows)
        params = SamplingParams(max_tokens=decode_tokens + 1, temperature=0.0, ignore_eos=True)
        self.seqs = [self.engine.add(f"bench-{i}", p, params)[0] for i, p in enumerate(prompts)]

    @property
    def out(self) -> list[list[int]]:
        return [s.output_ids for s in self.seqs]

    def _step(self) -> None:
        outputs = self.engine.step()
        errors = [o.error for o in outputs if o.error]
        if errors:
            raise RuntimeError(errors[0])

    def prefill(self, progress: bool = False) -> int:
        """Steps until every prompt is in the cache and has its first token."""
        steps = 0
        total = sum(len(s.prompt_ids) for s in self.seqs)
        with tqdm(
            total=total, desc="prefill", unit="tok", leave=False, disable=not progress
        ) as bar:
            while any(not s.output_ids for s in self.seqs):
                before = sum(min(s.num_computed, len(s.prompt_ids)) for s in self.seqs)
                self._step()
                steps += 1
                bar.update(sum(min(s.num_computed, len(s.prompt_ids)) for s in self.seqs) - before)
        return steps

    def decode(self, steps: int, progress: bool = False) -> None:
        for _ in tqdm(range(steps), desc="decode", leave=False, disable=not progress):
            self._step()
