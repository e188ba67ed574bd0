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
