"""A request's delta queue (engine/async_engine.py Deltas): the engine thread's per-step
hand-over wakes the one reader, nothing is lost or reordered, a cancelled read takes nothing."""

from __future__ import annotations

import asyncio
import threading

import pytest

from engine.async_engine import Delta, Deltas, RequestStream, TwoReaders, push_step
from engine.sampling import SamplingParams


def test_deltas_from_the_engine_thread_arrive_in_order_and_wake_the_reader():
    async def go() -> list[int]:
        loop = asyncio.get_running_loop()
        reqs = [RequestStream(f"r{i}", [1], SamplingParams(max_tokens=4), loop) for i in (0, 1)]
        steps = 50

        def engine_thread() -> None:  # as AsyncEngine._loop: one push_step per step
            for k in range(steps):
                push_step([(reqs[0], Delta(0, str(k))), (reqs[1], Delta(0, str(k)))])

        t = threading.Thread(target=engine_thread)
        t.start()
        got = []
        for _ in range(steps):
            got.append(int((await reqs[0].queue.get()).text))
        t.join()
        other = [int(reqs[1].queue.get_nowait().text) for _ in range(steps)]
        assert reqs[1].queue.empty()
        assert other == list(range(steps))
        return got

    assert asyncio.run(go()) == list(range(50))


def test_a_cancelled_read_takes_nothing_and_the_next_read_gets_it():
    async def go() -> None:
        q = Deltas()
        reader = asyncio.ensure_future(q.get())
        await asyncio.sleep(0)  # waiting now
        q.put_nowait(Delta(0, "a"))
        reader.cancel()  # woken but not yet run: cancelled before it took the delta
        with pytest.raises(asyncio.CancelledError):
            await reader
        assert (await asyncio.wait_for(q.get(), 1)).text == "a"
        with pytest.raises(asyncio.QueueEmpty):
            q.get_nowait()
        late = asyncio.ensure_future(q.get())  # a reader after a cancelled one still wakes
        await asyncio.sleep(0)
        q.put_nowait(Delta(0, "b"))
        assert (await asyncio.wait_for(late, 1)).text == "b"

    asyncio.run(go())


def test_a_second_waiting_reader_is_refused():
    async def go() -> None:
        q = Deltas()
        first = asyncio.ensure_future(q.get())
        await asyncio.sleep(0)
        with pytest.raises(TwoReaders):
            await q.get()
        q.put_nowait(Delta(0, "x"))
        assert (await asyncio.wait_for(first, 1)).text == "x"

    asyncio.run(go())


def test_stream_interval_groups_a_choices_tokens_and_sends_first_and_last_at_once():
    """--stream-interval 3: each choice's first token goes alone, then groups of three, and
    its finishing delta takes what is held; text, ids and logprobs join in order; choices
    are grouped apart."""
    req = RequestStream("r", [1], SamplingParams(n=2), None)
    sent: list[Delta] = []
    for k in range(8):
        for c in (0, 1):
            last = k == 7 and c == 0
            lp = [f"lp{k}"] if c == 1 else ()
            d = Delta(c, f"<{k}>", [k], lp, "length" if last else None)
            if (out := req.grouped(d, 3)) is not None:
                sent.append(out)
    zero = [d for d in sent if d.choice == 0]
    assert [d.token_ids for d in zero] == [[0], [1, 2, 3], [4, 5, 6], [7]]
    assert [d.finish_reason for d in zero] == [None, None, None, "length"]
    assert "".join(d.text for d in zero) == "".join(f"<{k}>" for k in range(8))
    one = [d for d in sent if d.choice == 1]
    assert [d.token_ids for d in one] == [[0], [1, 2, 3], [4, 5, 6]]  # 7 still held
    assert [d.logprobs for d in one] == [["lp0"], ["lp1", "lp2", "lp3"], ["lp4", "lp5", "lp6"]]
    assert req.held[1].token_ids == [7]
    assert zero[1].logprobs == ()  # no logprobs asked: nothing built for them


def test_stream_interval_sends_a_delta_without_tokens_and_waits_for_the_first_token():
    """A delta that carries no token yet (a prompt chunk) does not count as the first: the
    first token still goes at once."""
    req = RequestStream("r", [1], SamplingParams(), None)
    assert req.grouped(Delta(0), 4) is not None
    assert req.grouped(Delta(0, "a", [5]), 4).token_ids == [5]
    assert req.grouped(Delta(0, "b", [6]), 4) is None
    end = req.grouped(Delta(0, "", [], [], "stop"), 4)
    assert (end.text, end.token_ids, end.finish_reason) == ("b", [6], "stop")
    assert not req.held
