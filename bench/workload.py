"""What ``engram-bench`` runs: the paths it compares and the jobs every path runs.

A job is one batch of prompts, prefilled (prefill-first scheduling, so the phases time apart),
then decoded greedily with every sequence in each step:
- ``paper``: N prompts of Uniform(MIN, MAX) random tokens; prefill and decode both timed;
- ``sweepB``: B short prompts, prefill and a few decode steps untimed, then steady decode timed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.kv_cache import blocks_for

BLOCK_SIZE = 16


class BenchError(Exception):
    """Bad input or a failed check: one line for the user, non-zero exit."""


@dataclass(frozen=True)
class PathSpec:
    placement: str
    gather: str
    dedup: bool = False

    @property
    def name(self) -> str:
        return f"{self.placement}/{self.gather}" + ("+dedup" if self.dedup else "")


@dataclass
class Workload:
    num_seqs: int
    prompt_len: tuple[int, int]
    decode_tokens: int
    max_batched_tokens: int
    batch_sizes: list[int]
    sweep_prompt_len: int
    sweep_steps: int
    sweep_warmup: int
    micro_rows: list[int]
    micro_repeats: int
    ceiling_bytes: int  # the link ceiling's copy
    memory_bytes: int  # the memory-bandwidth copy (roofline)
    seed: int
    repeats: int  # interleaved timed rounds
    micro_values: tuple[int, ...] = (64, 128, 256)  # bf16 values per row of the micro tables
    check_steps: int = 3  # steps per job whose rows and logits are checked
    overlap: bool = True  # the engine's overlapped steps (--no-overlap: in series)


@dataclass(frozen=True)
class Job:
    name: str
    prompts: list[list[int]]
    untimed_decode: int  # decode steps after prefill, before the decode clock starts
    timed_decode: int
    time_prefill: bool

    @property
    def phases(self) -> tuple[str, ...]:
        return ("prefill", "decode") if self.time_prefill else ("decode",)

    @property
    def decode_steps(self) -> int:
        return self.untimed_decode + self.timed_decode

    @property
    def kv_blocks(self) -> int:
        """KV blocks the whole job holds at its end."""
        return sum(blocks_for(len(p) + self.decode_steps + 1, BLOCK_SIZE) for p in self.prompts)

    def phase_tokens(self, phase: str) -> int:
        """Tokens the phase feeds through the model."""
        if phase == "prefill":
            return sum(len(p) for p in self.prompts)
        return len(self.prompts) * self.timed_decode

    def kv_tokens_read(self, phase: str) -> int:
        """Cached tokens the phase's attention must read at least once. Decode step j of a
        sequence with an L-token prompt attends to L + j tokens; a prompt's own tokens are
        read once (a lower bound for chunked prefill, which re-reads earlier chunks)."""
        lengths = np.array([len(p) for p in self.prompts], dtype=np.int64)
        if phase == "prefill":
            return int(lengths.sum())
        a, b = self.untimed_decode + 1, self.decode_steps  # timed decode steps j = a..b
        per_seq = self.timed_decode * lengths + (a + b) * self.timed_decode // 2
        return int(per_seq.sum())


def make_prompts(rng: np.random.Generator, n: int, lo: int, hi: int, vocab: int) -> list[list[int]]:
    """``n`` prompts of random token ids, lengths Uniform(lo, hi)."""
    lengths = rng.integers(lo, hi + 1, size=n)
    return [rng.integers(0, vocab, size=int(k)).tolist() for k in lengths]


def make_jobs(wl: Workload, vocab: int) -> list[Job]:
    """The paper workload, then one sweep point per batch size (fixed seeds)."""
    rng = np.random.default_rng(wl.seed)
    jobs = [
        Job(
            "paper",
            make_prompts(rng, wl.num_seqs, *wl.prompt_len, vocab),
            0,
            wl.decode_tokens,
            True,
        )
    ]
    for bs in wl.batch_sizes:
        rng = np.random.default_rng([wl.seed, bs])
        n = wl.sweep_prompt_len
        prompts = make_prompts(rng, bs, n, n, vocab)
        jobs.append(Job(f"sweep{bs}", prompts, wl.sweep_warmup, wl.sweep_steps, False))
    return jobs


def rotation(num_paths: int, round_index: int) -> list[int]:
    """The order paths run in a timed round: round r starts at path r (mod n), so over n
    rounds every path runs in every position once and drift does not favour one path."""
    start = round_index % num_paths
    return [(start + k) % num_paths for k in range(num_paths)]
