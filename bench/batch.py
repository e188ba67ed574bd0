"""One job on the serving engine: its prompts added, prefilled in chunks under the token budget
(prefill-first: no decode while a prompt is pending, so the phases time apart), then greedy
decode with every sequence in each step. Same engine, scheduler, runner and sampler as the
server; the engine is the path's, reused by every run.
"""

from __future__ import annotations

from collections.abc import Callable

from tqdm import tqdm

from engine.config import EngineConfig
from engine.engine import Engine
from engine.sampling import SamplingParams
from engine.sequence import Sequence

from .workload import BLOCK_SIZE, BenchError, Job


def engine_config(
    jobs: list[Job], budget: int, deterministic: bool, overlap: bool = True
) -> EngineConfig:
    """One configuration for every path's engine: room for the largest job."""
    return EngineConfig(
        max_num_seqs=max(len(j.prompts) for j in jobs),
        max_num_batched_tokens=budget,
        kv_blocks=max(j.kv_blocks for j in jobs),
        block_size=BLOCK_SIZE,
        prefill_first=True,
        deterministic=deterministic,
        no_overlap=not overlap,
    )


def _step(engine: Engine) -> None:
    errors = [o.error for o in engine.step() if o.error]
    if errors:
        raise RuntimeError(errors[0])


def prefill(engine: Engine, seqs: list[Sequence], progress: bool = False) -> int:
    """Steps until every prompt is in the cache and has its first token."""
    steps = 0
    total = sum(len(s.prompt_ids) for s in seqs)
    with tqdm(total=total, desc="prefill", unit="tok", leave=False, disable=not progress) as bar:
        while any(not s.output_ids for s in seqs):
            before = sum(min(s.num_computed, len(s.prompt_ids)) for s in seqs)
            _step(engine)
            steps += 1
            bar.update(sum(min(s.num_computed, len(s.prompt_ids)) for s in seqs) - before)
    return steps


def decode(engine: Engine, steps: int, progress: bool = False) -> None:
    for _ in tqdm(range(steps), desc="decode", leave=False, disable=not progress):
        _step(engine)


def run_job(
    engine: Engine, job: Job, clock: Callable[[str | None], None], progress: bool = False
) -> list[list[int]]:
    """The job once; ``clock(phase)`` is called as each timed phase starts and ``clock(None)``
    when the last ends. Returns every sequence's generated tokens."""
    params = SamplingParams(max_tokens=job.decode_steps + 1, temperature=0.0, ignore_eos=True)
    seqs = [engine.add(f"{job.name}-{i}", p, params)[0] for i, p in enumerate(job.prompts)]
    clock("prefill" if job.time_prefill else None)
    prefill(engine, seqs, progress)
    decode(engine, job.untimed_decode)
    clock("decode")
    decode(engine, job.timed_decode, progress)
    while engine.has_work:  # overlapped: the last step's tokens are read one call late
        _step(engine)
    clock(None)
    if engine.has_work:  # the next run reuses this engine and its KV cache
        raise BenchError(f"job {job.name} left sequences unfinished")
    return [s.output_ids for s in seqs]
