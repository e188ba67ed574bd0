"""The overlap worker's queue: jobs run in order, one at a time, results and errors come back,
a closed queue refuses work, and a queue dropped without close() stops its thread."""

import gc
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from engine.step_queue import StepQueue


def test_jobs_run_in_order_and_results_and_errors_come_back():
    q = StepQueue(torch.device("cpu"))
    seen: list[int] = []

    def job(k: int) -> int:
        time.sleep(0.002 * (3 - k))  # an earlier job that takes longer still ends first
        seen.append(k)
        return k * 10

    def fail():
        raise KeyError("row")

    got = [q.submit(job, k) for k in range(3)]
    bad = q.submit(fail)
    assert [p.result() for p in got] == [0, 10, 20] and seen == [0, 1, 2]
    assert got[0].result() == 0  # read twice
    with pytest.raises(KeyError):
        bad.result()
    assert q.busy_s > 0
    q.close()
    with pytest.raises(RuntimeError, match="closed"):
        q.submit(job, 0)


def test_each_job_keeps_its_own_time_on_the_worker():
    q = StepQueue(torch.device("cpu"))
    slow, quick = q.submit(time.sleep, 0.03), q.submit(int, 1)
    quick.result()
    # read once the result is there, whenever the reader looks (engram-bench --host-cost's
    # device part: the job a step read, not the busy time that ended inside the step)
    assert slow.busy_s >= 0.03 and 0 < quick.busy_s < slow.busy_s
    assert q.busy_s == pytest.approx(slow.busy_s + quick.busy_s)
    q.close()


def test_a_dropped_queue_stops_its_worker():
    q = StepQueue(torch.device("cpu"))
    q.submit(int, 1).result()
    worker = q._thread
    del q
    gc.collect()
    worker.join(5)
    assert not worker.is_alive()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="OS thread names from /proc")
def test_the_worker_has_its_name_at_os_level():
    """``top -H`` and engram-bench --http-cost tell the device worker apart by its OS name."""
    q = StepQueue(torch.device("cpu"))
    tid = q.submit(threading.get_native_id).result()
    assert Path(f"/proc/self/task/{tid}/comm").read_text().strip() == "engram-device"
    q.close()
