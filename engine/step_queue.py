"""The device side of overlapped steps: one worker thread runs the steps in order.

The engine thread submits step N+1 and goes on (reading step N's tokens, streaming,
finishing, scheduling) while the worker runs it: on a CPU the worker is the device's stand-in
(the forward pass runs there, so CI exercises the pipeline); on CUDA it is the thread that
fills in step N+1's placeholders from step N's tokens and issues its kernels. Jobs run one at
a time in submission order, so a job always finds the one before it finished.

The worker's busy time is summed (wall clock), and each job's own is kept on its
:class:`Pending`, so engram-bench can tell how much of a step the device spent waiting for
the host.
"""

from __future__ import annotations

import queue
import threading
import time
import weakref
from collections.abc import Callable

import torch

from offload.thread_names import name_os_thread


class Pending:
    """A job's result once the worker has run it (a lighter Future: one lock, no condition
    variable; this is waited on every step)."""

    __slots__ = ("_done", "_value", "_error", "busy_s")

    def __init__(self) -> None:
        self._done = threading.Lock()
        self._done.acquire()  # released by the worker when the job has run
        self._value, self._error = None, None
        self.busy_s = 0.0  # the job's wall time on the worker, set before it is released

    def result(self):
        if self._done.locked():
            self._done.acquire()
            self._done.release()
        if self._error is not None:
            raise self._error
        return self._value


class StepQueue:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.busy_s = 0.0  # summed wall time of the jobs run so far (written by the worker)
        self._thread: threading.Thread | None = None  # started by the first job
        # a queue dropped without close() still stops its worker (it holds no reference to
        # the queue object, only to its jobs)
        self._stop = weakref.finalize(self, self._jobs.put, None)

    def submit(self, fn: Callable, *args) -> Pending:
        if not self._stop.alive:
            raise RuntimeError("the step queue is closed")
        if self._thread is None:
            self._thread = threading.Thread(
                target=_work,
                args=(self._jobs, self.device, weakref.ref(self)),
                name="engram-device",
                daemon=True,
            )
            self._thread.start()
        pending = Pending()
        self._jobs.put((fn, args, pending))
        return pending

    def close(self) -> None:
        """Runs the jobs already submitted, then stops the worker."""
        self._stop()
        if self._thread is not None:
            self._thread.join()


def _work(jobs: queue.SimpleQueue, device: torch.device, owner: weakref.ref) -> None:
    name_os_thread()
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    while (item := jobs.get()) is not None:
        fn, args, pending = item
        t = time.perf_counter()
        try:
            pending._value = fn(*args)
        except BaseException as e:  # handed to whoever reads the result
            pending._error = e
        finally:
            pending.busy_s = time.perf_counter() - t
            if (q := owner()) is not None:
                q.busy_s += pending.busy_s
            del q
            pending._done.release()
        del item, fn, args, pending  # nothing of a finished job is kept alive here
