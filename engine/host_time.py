"""Host CPU time per step component: where the host's Python work in a step goes.

A :class:`HostTimer` is passed into ``Engine.step`` (and on to the runner and sampler); each
part of the step runs inside ``with timer("name"):``. Time is this thread's CPU time
(``time.thread_time_ns``: what the host thread itself burns, not time it waits for a device,
a worker thread or the OS), charged exclusively: a nested part pauses its parent. Work that
runs on the device on a GPU (the forward pass, the sampling kernels) is charged to parts
named in :data:`DEVICE_PARTS`, so the host cost of a step is the rest.

``NO_TIMER`` is the default: entering it does nothing (one attribute lookup and a call).
"""

from __future__ import annotations

import gc
import time
from contextlib import AbstractContextManager, nullcontext

# parts that run on the device on a GPU; on a CPU they run in the host thread, or (``device``)
# on the worker that plays the device when steps overlap; ``sync``: the host waiting for a
# step's tokens on a GPU (a CUDA wait may spin on the host's CPU)
DEVICE_PARTS = frozenset({"forward", "sample_kernels", "device", "sync"})

_NULL = nullcontext()
_clock = time.thread_time_ns


class NoTimer:
    """Off: every part is a shared no-op context."""

    enabled = False

    def __call__(self, name: str) -> AbstractContextManager:
        return _NULL


NO_TIMER = NoTimer()


class _Part:
    """One named part of a :class:`HostTimer`, made once per name and reused (the parts it
    interrupts are kept on the timer's stack, so a part holds no state of its own)."""

    __slots__ = ("timer", "name")

    def __init__(self, timer: HostTimer, name: str) -> None:
        self.timer, self.name = timer, name

    def __enter__(self) -> None:
        t, now = self.timer, _clock()
        ns, prev = t.ns, t._current
        ns[prev] = ns.get(prev, 0) + now - t._t
        t._stack.append(prev)
        t._current, t._t = self.name, now

    def __exit__(self, *exc) -> None:
        t, now = self.timer, _clock()
        ns, name = t.ns, self.name
        ns[name] = ns.get(name, 0) + now - t._t
        t._current, t._t = t._stack.pop(), now


class HostTimer:
    """Exclusive thread CPU nanoseconds per part, summed until :meth:`take`. Time outside
    every part goes to ``other``; Python's garbage collector is counted apart in ``gc_ns``
    (it also stays inside the part it interrupted). A part costs two reads of the thread's
    clock (a system call each: the thread CPU clock has no vDSO fast path) and little else."""

    enabled = True

    def __init__(self) -> None:
        self.ns: dict[str, int] = {}
        self._parts: dict[str, _Part] = {}
        self._stack: list[str] = []
        self._current = "other"
        self._t = _clock()
        self.gc_ns = 0
        self._gc_t = 0

    def __call__(self, name: str) -> _Part:
        part = self._parts.get(name)
        if part is None:
            part = self._parts[name] = _Part(self, name)
        return part

    def _switch(self, name: str) -> str:
        now = _clock()
        prev = self._current
        self.ns[prev] = self.ns.get(prev, 0) + now - self._t
        self._current, self._t = name, now
        return prev

    def take(self) -> dict[str, int]:
        """The parts' totals since the last take (then reset)."""
        self._switch(self._current)
        out, self.ns = self.ns, {}
        return out

    def host_ns(self, parts: dict[str, int]) -> int:
        return sum(v for k, v in parts.items() if k not in DEVICE_PARTS)

    # garbage collection, through gc.callbacks while watching
    def _on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._gc_t = _clock()
        elif self._gc_t:
            self.gc_ns += _clock() - self._gc_t
            self._gc_t = 0

    def __enter__(self) -> HostTimer:
        gc.callbacks.append(self._on_gc)
        self._switch("other")
        return self

    def __exit__(self, *exc) -> None:
        gc.callbacks.remove(self._on_gc)
