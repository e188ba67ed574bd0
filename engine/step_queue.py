"""The device side of overlapped steps: one worker thread runs the steps in order.

The engine thread submits step N+1 and goes on (reading step N's tokens, streaming,
finishing, scheduling) while the worker runs it: on a CPU the worker is the device's stand-in
(the forward pass runs there, so CI exercises the pipeline); on CUDA it is the thread that
fills in step N+1's placeholders from step N's tokens and issues its kernels. Jobs run one at
a time in submission order, so a job always finds the one before it finished.

The worker's busy time is summed (wall clock), so engram-bench can tell how much of a window
the device spent waiting for the host.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch


class StepQueue:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="engram-device")
        self._lock = threading.Lock()
        self.busy_s = 0.0  # summed wall time of the jobs run so far

    def _run(self, fn: Callable, *args):
        if self.device.type == "cuda" and self.device.index is not None:
            torch.cuda.set_device(self.device)
        t = time.perf_counter()
        try:
            return fn(*args)
        finally:
            with self._lock:
                self.busy_s += time.perf_counter() - t

    def submit(self, fn: Callable, *args) -> Future:
        return self._pool.submit(self._run, fn, *args)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
