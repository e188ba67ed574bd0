"""Offline generation on the engine, and ``engram-generate``."""

from __future__ import annotations

import argparse
import sys
import time

from models.dtype import CHOICES as DTYPES
from models.llama import EngramForCausalLM
from offload.offloaded_model import OffloadedModel
from offload.prefetch import Prefetcher

from .config import EngineConfig
from .engine import Engine
from .kv_cache import blocks_for
from .sampling import SamplingParams


def generate(
    model: EngramForCausalLM,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    seed: int = 0,
    eos_token_id: int | None = None,
    rows: Prefetcher | None = None,
    block_size: int = 16,
    overlap: bool = True,
) -> list[list[int]]:
    """Generate for a batch of prompts together on the engine (one prefill step for all, then
    batched decode). Stops at ``eos_token_id`` when given, else only at max_new_tokens."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if max_new_tokens < 1:
        return [[] for _ in prompts]
    if eos_token_id is not None and eos_token_id != model.config.eos_token_id:
        raise ValueError(
            f"eos_token_id {eos_token_id} is not the model's ({model.config.eos_token_id})"
        )
    longest = max(len(p) for p in prompts) + max_new_tokens
    config = EngineConfig(
        max_num_seqs=len(prompts),
        max_num_batched_tokens=sum(len(p) for p in prompts),
        kv_blocks=len(prompts) * blocks_for(longest, block_size),
        block_size=block_size,
        no_overlap=not overlap,
    )
    engine = Engine(model, config, rows)
    seqs = []
    for i, p in enumerate(prompts):
        params = SamplingParams(
            max_tokens=max_new_tokens,
            temperature=temperature,
            seed=seed + i,
            ignore_eos=eos_token_id is None,
        )
        seqs += engine.add(f"gen-{i}", p, params)
    engine.run_until_done()
    engine.close()
    if engine.fault is not None:
        raise engine.fault
    return [s.output_ids for s in seqs]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="engram-generate", description="Generate text offline from an Engram checkpoint."
    )
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default=None, help="checkpoint directory (default: built-in)")
    ap.add_argument("--dtype", default="auto", choices=list(DTYPES))
    ap.add_argument(
        "--no-overlap",
        action="store_true",
        help="run each step's host work in series with the device (default: overlapped)",
    )
    args = ap.parse_args(argv)
    if args.max_tokens < 1:
        ap.error("--max-tokens must be at least 1")
    try:  # the server's path: tables in their default tier, gathered by its prefetcher
        om = OffloadedModel.load(args.model, dtype=args.dtype, progress=False)
    except (OSError, ValueError) as e:
        print(f"engram-generate: error: {e}", file=sys.stderr)
        return 2
    model, tok = om.model, om.tokenizer
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
        rows=om.prefetcher,
        overlap=not args.no_overlap,
    )[0]
    om.close()
    dt = time.perf_counter() - t0
    print(args.prompt + tok.decode(out))
    print(f"[{len(out)} tokens in {dt:.2f}s, {len(out) / dt:.1f} tok/s]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
