"""The benchmark's step loop: prompts prefilled in chunks under a token budget, then greedy
decode with every sequence in each step.

Unlike :func:`models.generate.generate`, prefill and decode are separate calls, so each phase
can be timed on its own, and a step never exceeds the token budget (as in the server).
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm

from models.cache import KVCache
from models.generate import RowSourceFactory, StepRunner
from models.llama import EngramForCausalLM

BLOCK_SIZE = 16


def make_prompts(rng: np.random.Generator, n: int, lo: int, hi: int, vocab: int) -> list[list[int]]:
    """``n`` prompts of random token ids, lengths Uniform(lo, hi)."""
    lengths = rng.integers(lo, hi + 1, size=n)
    return [rng.integers(0, vocab, size=int(k)).tolist() for k in lengths]


class Batch:
    def __init__(
        self,
        model: EngramForCausalLM,
        rows: RowSourceFactory,
        prompts: list[list[int]],
        decode_tokens: int,
        device: torch.device,
    ) -> None:
        self.prompts = prompts
        blocks = sum(-(-(len(p) + decode_tokens + 1) // BLOCK_SIZE) for p in prompts)
        dtype = model.model.embed_tokens.weight.dtype
        cache = KVCache(model.config, blocks, BLOCK_SIZE, len(prompts), dtype, device)
        self.runner = StepRunner(model, cache, rows)
        self.seqs = [self.runner.new_sequence() for _ in prompts]
        self.out: list[list[int]] = [[] for _ in prompts]

    def prefill(self, budget: int, progress: bool = False) -> int:
        """Prompts in order, chunked so a step never exceeds ``budget`` tokens; each finished
        prompt's last logits give its first token. Returns the number of steps."""
        done = [0] * len(self.prompts)
        queue = list(range(len(self.prompts)))
        steps = 0
        total = sum(len(p) for p in self.prompts)
        with tqdm(
            total=total, desc="prefill", unit="tok", leave=False, disable=not progress
        ) as bar:
            while queue:
                picked, chunks, left = [], [], budget
                for i in queue:
                    if left == 0:
                        break
                    n = min(left, len(self.prompts[i]) - done[i])
                    picked.append(i)
                    chunks.append(self.prompts[i][done[i] : done[i] + n])
                    left -= n
                logits = self.runner.step([self.seqs[i] for i in picked], chunks)
                finished = []
                for row, (i, c) in enumerate(zip(picked, chunks)):
                    done[i] += len(c)
                    if done[i] == len(self.prompts[i]):
                        finished.append((row, i))
                if finished:
                    toks = logits[[r for r, _ in finished]].argmax(-1).tolist()
                    for (_, i), t in zip(finished, toks):
                        self.out[i].append(t)
                queue = [i for i in queue if done[i] < len(self.prompts[i])]
                steps += 1
                bar.update(budget - left)
        return steps

    def decode(self, steps: int, progress: bool = False) -> None:
        for _ in tqdm(range(steps), desc="decode", leave=False, disable=not progress):
            logits = self.runner.step(self.seqs, [[o[-1]] for o in self.out])
            for o, t in zip(self.out, logits.argmax(-1).tolist()):
                o.append(t)
