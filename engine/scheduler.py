"""Continuous batching: which sequences run in the next step, and how many tokens each feeds.

Requests join and leave at step boundaries. One step mixes decode tokens (one per running
sequence) and prompt chunks (chunked prefill) under ``max_num_batched_tokens``; at most
``max_num_seqs`` sequences run. KV memory is a bounded block pool: a sequence is admitted
only when its next chunk fits, and when decoding runs out of blocks the newest running
sequence is preempted (its cache freed, recomputed from its tokens later), never an OOM.

With ``prefill_first`` (the benchmark's phases), no decode runs while a prompt is pending, so
prefill and decode can be timed apart.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from .kv_cache import KVCache
from .sequence import PLACEHOLDER_IDS, Sequence, Status


def short_path_entries(new_ids: list, samples: list, known: list, n: int) -> None:
    """Fill the step's lists up to ``n`` entries with short-path decodes' (the one placeholder
    list, sampled, fed their token in flight)."""
    gap = n - len(new_ids)
    new_ids += [PLACEHOLDER_IDS] * gap
    samples += [True] * gap
    known += [False] * gap


@dataclass
class ScheduledStep:
    seqs: list[Sequence]
    new_ids: list[list[int]]
    samples: list[bool]  # whether this step's last logit of the sequence is sampled
    preempted: list[Sequence]
    # False where the sequence is fed its token in flight (new ids ``PLACEHOLDER_IDS``),
    # filled in by the same pass that picks the step (overlap's submit reads it)
    known: list[bool]

    @property
    def num_tokens(self) -> int:
        return sum(len(x) for x in self.new_ids)


class Scheduler:
    def __init__(
        self,
        cache: KVCache,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        prefill_first: bool = False,
    ) -> None:
        self.cache, self.prefill_first = cache, prefill_first
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preempted = 0
        self.max_tokens_per_seq = 1 << 62  # the engine sets its limit
        # --max-memories: memories besides the base that running sequences may read at once
        self.max_memories = 0
        self.memories = None  # the engine's MemorySet

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def finish(self, seq: Sequence, reason: str | None) -> None:
        """Retire a sequence (finished or aborted) and free its slot and KV blocks."""
        seq.status, seq.finish_reason = Status.FINISHED, seq.finish_reason or reason
        self.cache.free(seq)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def _memories_live(self) -> set:
        """Memories on the device for this step: running sequences' and the last step's
        (engine/memories.py: it may still be in flight)."""
        live = {s.memory for s in self.running if s.memory is not None and not s.memory.base}
        return live | (self.memories.previous if self.memories is not None else set())

    def _preempt(self, seq: Sequence) -> None:
        self.num_preempted += 1
        self.cache.free(seq)
        seq.num_computed, seq.status = 0, Status.WAITING
        self.running.remove(seq)
        self.waiting.appendleft(seq)

    def _blocks_needed(self, seq: Sequence, n: int) -> int:
        return max(0, self.cache.blocks_for(seq.num_computed + n) - len(seq.block_table))

    def schedule(self) -> ScheduledStep | None:
        budget = self.max_num_batched_tokens
        seqs, new_ids, samples, preempted, known = [], [], [], [], []
        free_blocks = self.cache.free_blocks
        hold_decodes = self.prefill_first and (
            bool(self.waiting) or any(s.prefilling for s in self.running)
        )

        # 1. running sequences first (decodes, then unfinished prompt chunks), oldest first;
        # a short-path decode appends only its sequence: its new ids (the one placeholder
        # list), sample flag (True) and known flag (False) are filled in at once before the
        # next other entry
        bs, running, limit = self.cache.block_size, Status.RUNNING, self.max_tokens_per_seq
        for seq in list(self.running):
            if budget <= 0:
                break
            if seq.status is not running:  # preempted earlier in this loop
                continue
            done = seq.num_computed
            if hold_decodes and done >= len(seq.prompt_ids):
                continue
            if seq.inflight:  # overlap: its token is on the device, a placeholder feeds it
                made = len(seq.output_ids) + seq.inflight
                if seq.end_at:  # min(max_tokens, limit - prompt_len), worked out once
                    if made >= seq.end_at:
                        continue  # it finishes when its token is read (ends_with_inflight)
                elif made >= seq.params.max_tokens or len(seq.prompt_ids) + made >= limit:
                    continue
                new_block = done >= len(seq.block_table) * bs  # its token starts a block
                if not new_block or free_blocks:  # no preemption: the short path
                    if new_block:
                        free_blocks -= 1
                    budget -= 1
                    seqs.append(seq)
                    continue
                pending, n = PLACEHOLDER_IDS, 1
            else:
                pending = seq.pending_ids()
                n = min(len(pending), budget)
            need = -(-(done + n) // bs) - len(seq.block_table)
            need = need if need > 0 else 0
            while need > free_blocks and self.running[-1] is not seq:
                victim = self.running[-1]
                free_blocks += len(victim.block_table)
                self._preempt(victim)
                preempted.append(victim)
            if need > free_blocks:  # even alone it does not fit now: wait for memory
                self._preempt(seq)
                preempted.append(seq)
                continue
            free_blocks -= need
            budget -= n
            if len(new_ids) < len(seqs):  # the short-path decodes before it
                short_path_entries(new_ids, samples, known, len(seqs))
            seqs.append(seq)
            # pending_ids gives a new list (or PLACEHOLDER_IDS, kept as itself): not copied again
            new_ids.append(pending if n == len(pending) else pending[:n])
            samples.append(n == len(pending))
            known.append(pending is not PLACEHOLDER_IDS)
        if len(new_ids) < len(seqs):
            short_path_entries(new_ids, samples, known, len(seqs))

        # 2. admit waiting sequences while slots, budget and blocks allow (FIFO, no skipping)
        live = self._memories_live() if self.max_memories else set()
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if seq in preempted:
                break
            if self.cache.free_slots == 0:
                break
            mem = seq.memory
            if self.max_memories and mem is not None and not mem.base:
                if mem not in live and len(live) >= self.max_memories:
                    break  # its memory waits in host memory until one running ends
                live.add(mem)
            pending = seq.pending_ids()  # all of it: it holds nothing in the cache yet
            n = min(len(pending), budget)
            need = self.cache.blocks_for(n)
            if need > free_blocks:
                break
            self.waiting.popleft()
            self.cache.admit(seq)
            seq.status = Status.RUNNING
            seq.scheduled_at = seq.scheduled_at or time.monotonic()
            self.running.append(seq)
            free_blocks -= need
            budget -= n
            seqs.append(seq)
            new_ids.append(pending if n == len(pending) else pending[:n])
            samples.append(n == len(pending))
            known.append(pending is not PLACEHOLDER_IDS)

        if not seqs:
            if self.memories is not None:  # the step in flight is read before the next one
                self.memories.idle()
            return None
        return ScheduledStep(seqs, new_ids, samples, preempted, known)
