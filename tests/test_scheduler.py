"""The scheduler's decode paths: which sequences a step takes within its budget, with which
new ids, and what it skips."""

import pytest

from engine.kv_cache import KVCache
from engine.sampling import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import PLACEHOLDER, PLACEHOLDER_IDS, Sequence, Status
from models.checkpoint import load_checkpoint

BS = 4


@pytest.fixture(scope="module")
def config():
    return load_checkpoint(load_tables=False)[0].config


def _running(config, n: int, prompt_len: int, inflight: bool, blocks: int, budget: int):
    """``n`` sequences decoding (prompt cached, one token sampled; ``inflight``: still on the
    device), ``blocks`` KV blocks in the pool."""
    cache = KVCache(config, num_blocks=blocks, block_size=BS, max_seqs=n)
    sched = Scheduler(cache, max_num_seqs=n, max_num_batched_tokens=budget)
    seqs = []
    for i in range(n):
        seq = Sequence(f"r{i}", 0, list(range(1, prompt_len + 1)), SamplingParams(), None)
        cache.admit(seq)
        cache.reserve(seq, prompt_len)
        seq.num_computed, seq.status = prompt_len, Status.RUNNING
        seq.output_ids.append(7 + i)
        seq.inflight = int(inflight)
        sched.running.append(seq)
        seqs.append(seq)
    return sched, seqs


@pytest.mark.parametrize("n,budget", [(1, 8), (32, 64), (256, 1024), (40, 16)])
def test_decodes_in_budget_come_out_in_running_order(config, n, budget):
    # prompts of 5 tokens: the sixth token stays in the second block, no new block needed
    sched, seqs = _running(config, n, 5, True, blocks=2 * n, budget=budget)
    step = sched.schedule()
    took = min(n, budget)
    assert step.seqs == seqs[:took] and not step.preempted
    assert all(ids is PLACEHOLDER_IDS for ids in step.new_ids)  # the one shared list
    assert PLACEHOLDER_IDS == [PLACEHOLDER]  # nobody wrote into it
    assert step.samples == [True] * took and step.num_tokens == took


def test_decodes_whose_token_starts_a_block_take_what_is_free(config):
    # prompts of 4 tokens fill a block: each next token needs a new one; 3 are free
    sched, seqs = _running(config, 6, 4, True, blocks=9, budget=64)
    step = sched.schedule()
    # three take the free blocks; the fourth takes the newest's (preempted), the fifth
    # finds none and waits itself
    assert step.seqs == seqs[:4] and step.preempted == [seqs[5], seqs[4]]
    assert all(s.status is Status.WAITING and s.num_computed == 0 for s in step.preempted)
    assert all(ids is PLACEHOLDER_IDS for ids in step.new_ids)


def test_known_tokens_feed_the_last_sampled_id(config):
    sched, seqs = _running(config, 4, 5, False, blocks=8, budget=64)
    step = sched.schedule()
    assert step.seqs == seqs
    assert step.new_ids == [[7 + i] for i in range(4)]
    assert all(ids is not PLACEHOLDER_IDS for ids in step.new_ids)


def test_a_sequence_whose_token_in_flight_is_its_last_is_not_scheduled(config):
    sched, seqs = _running(config, 3, 5, True, blocks=6, budget=64)
    seqs[1].end_at = 2  # its token on the device is its second and last
    seqs[2].end_at = 3
    step = sched.schedule()
    assert step.seqs == [seqs[0], seqs[2]]


def test_a_prompt_chunk_is_not_copied_again(config):
    cache = KVCache(config, num_blocks=8, block_size=BS, max_seqs=2)
    sched = Scheduler(cache, max_num_seqs=2, max_num_batched_tokens=5)
    seq = Sequence("p", 0, list(range(1, 9)), SamplingParams(), None)
    sched.add(seq)
    step = sched.schedule()  # the budget cuts the prompt: its first 5 tokens
    assert step.new_ids == [[1, 2, 3, 4, 5]] and step.samples == [False]
    assert step.new_ids[0] is not seq.prompt_ids


def test_mixed_decodes_keep_each_sequence_s_own_ids(config):
    # placeholders around a sequence whose token is known and one still prefilling
    sched, seqs = _running(config, 5, 5, True, blocks=12, budget=64)
    seqs[2].inflight = 0
    seqs[4].inflight, seqs[4].num_computed = 0, 3  # two prompt tokens and its token left
    step = sched.schedule()
    assert step.seqs == seqs
    ph = PLACEHOLDER_IDS
    assert step.new_ids == [ph, ph, [9], ph, [4, 5, 11]]
    assert [ids is ph for ids in step.new_ids] == [True, True, False, True, False]
    assert step.samples == [True] * 5
