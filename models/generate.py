"""Offline generation: a small step loop over the packed forward, and ``engram-generate``.

The server has its own scheduler; this loop is for tests, tools and quick checks of a
checkpoint. It runs the same step the server runs: plan rows, forward, commit.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import numpy as np
import torch

from .cache import KVCache, SeqState
from .llama import EngramForCausalLM, ResidentRows, RowSource

# (row ids {layer: [N, heads]}) -> RowSource: how a step gets its Engram rows.
RowSourceFactory = Callable[[dict[int, np.ndarray]], RowSource]


def resident_rows(model: EngramForCausalLM) -> RowSourceFactory:
    return lambda ids: ResidentRows(model, {k: torch.from_numpy(v) for k, v in ids.items()})


class StepRunner:
    """Runs packed steps of a model against one KV cache."""

    def __init__(
        self,
        model: EngramForCausalLM,
        cache: KVCache,
        rows: RowSourceFactory | None = None,
    ) -> None:
        self.model, self.cache = model, cache
        self.rows = rows or resident_rows(model)

    def new_sequence(self) -> SeqState:
        return self.cache.new_sequence(self.model.hasher.initial_history(1)[0])

    def step(
        self, seqs: list[SeqState], new_ids: list[list[int]], all_logits: bool = False
    ) -> torch.Tensor:
        batch = self.cache.prepare(seqs, new_ids)
        row_ids, next_hist = self.model.row_ids(
            np.stack([s.ngram_history for s in seqs]),
            np.fromiter((t for x in new_ids for t in x), dtype=np.int64),
            np.array(batch.lengths),
        )
        source = self.rows(row_ids)  # issued now, before the embedding lookup
        try:
            with torch.inference_mode():
                logits = self.model.forward_step(batch, self.cache, source, all_logits)
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                close()
        self.cache.commit(seqs, batch, next_hist)
        return logits


def sample(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> int:
    """One token from ``[V]`` logits: argmax at temperature 0, else softmax sampling."""
    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def generate(
    model: EngramForCausalLM,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    seed: int = 0,
    eos_token_id: int | None = None,
    rows: RowSourceFactory | None = None,
    block_size: int = 16,
) -> list[list[int]]:
    """Generate for a batch of prompts together (ragged prefill, then batched decode)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    device = next(model.parameters()).device
    longest = max(len(p) for p in prompts) + max_new_tokens
    blocks = len(prompts) * -(-longest // block_size)
    cache = KVCache(
        model.config,
        num_blocks=blocks,
        block_size=block_size,
        max_seqs=len(prompts),
        dtype=model.model.embed_tokens.weight.dtype,
        device=device,
    )
    runner = StepRunner(model, cache, rows)
    gens = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
    seqs = [runner.new_sequence() for _ in prompts]
    outs: list[list[int]] = [[] for _ in prompts]
    active = list(range(len(prompts)))
    feed = [list(p) for p in prompts]
    while active and max_new_tokens > 0:
        logits = runner.step([seqs[i] for i in active], [feed[i] for i in active])
        still = []
        for row, i in enumerate(active):
            tok = sample(logits[row], temperature, gens[i])
            outs[i].append(tok)
            feed[i] = [tok]
            if len(outs[i]) < max_new_tokens and tok != eos_token_id:
                still.append(i)
            else:
                cache.free(seqs[i])
        active = still
    return outs


def main(argv: list[str] | None = None) -> int:
    from .checkpoint import load_checkpoint

    ap = argparse.ArgumentParser(
        prog="engram-generate", description="Generate text offline from an Engram checkpoint."
    )
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default=None, help="checkpoint directory (default: built-in)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args(argv)
    if args.max_tokens < 1:
        ap.error("--max-tokens must be at least 1")
    try:
        model, tok = load_checkpoint(args.model, dtype=args.dtype)
    except (OSError, ValueError) as e:
        print(f"engram-generate: error: {e}", file=sys.stderr)
        return 2
    if tok is None:
        print("engram-generate: error: the checkpoint has no tokenizer.json", file=sys.stderr)
        return 2
    ids = tok.encode(args.prompt)
    if not ids:
        print("engram-generate: error: the prompt encodes to no tokens", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    out = generate(
        model,
        [ids],
        min(args.max_tokens, model.config.max_position_embeddings - len(ids)),
        args.temperature,
        args.seed,
        model.config.eos_token_id,
    )[0]
    dt = time.perf_counter() - t0
    print(args.prompt + tok.decode(out))
    print(f"[{len(out)} tokens in {dt:.2f}s, {len(out) / dt:.1f} tok/s]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
