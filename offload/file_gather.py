"""The file tier as a gather path: plans over DRAM cache slots, pins held until gathers end.

``FileTierGather`` wraps the gather path the DRAM cache is read by (worker, staged, UVA, auto):
``plan`` translates table rows to cache slots (reading the misses from the file, see
``file_tier``) and builds the inner path's plan over the slots; ``start`` issues it and books
the layer's file traffic in the step's stats (tier 'file'); once the step is closed and its
gathers have finished (CUDA: the step's end event), its pins are released.
"""

from __future__ import annotations

from collections import deque

from .file_cache import CapacityError
from .file_tier import FileTier, Ticket
from .prefetch import Prefetcher


class FileTierGather(Prefetcher):
    """A gather path over a DRAM cache: ``plan`` translates rows to slots (reading misses),
    ``start`` hands the slot plan to the inner path, closing the step releases its pins."""

    def __init__(self, inner: Prefetcher, tier: FileTier) -> None:
        self.inner, self.tier = inner, tier
        self.store, self.device, self.dedup = inner.store, inner.device, inner.dedup
        self.accountant, self.timeout_s = inner.accountant, inner.timeout_s
        self.name, self.places_rows = inner.name, inner.places_rows
        self.host_threads, self.uva_programs = inner.host_threads, inner.uva_programs
        # rows of the tables in the file (the inner path's tables there are the DRAM caches'
        # slots); layers not in the tier (mixed placement) as their tables hold
        self.table_rows = dict(inner.table_rows) | {lid: fl.rows for lid, fl in tier.layers.items()}
        self._planned: deque = deque()  # (plan, ticket) built, not yet started
        self._held: deque[Ticket] = deque()  # started, gathers maybe still running

    def plan(self, row_ids):
        self._release_done(wait=False)
        try:
            translated, ticket = self.tier.translate(row_ids)
        except CapacityError:
            if not self._held:
                raise
            self._release_done(wait=True)  # steps still in flight hold slots: wait, retry once
            translated, ticket = self.tier.translate(row_ids)
        try:
            plan = self.inner.plan(translated)
        except BaseException:
            self.tier.release(ticket)
            raise
        for lid, lp in plan.layers.items():  # the gather of a layer waits for its reads only
            if lid in self.tier.layers:
                lp.source_ready = lambda lid=lid: ticket.wait(lid)
        self._planned.append((plan, ticket))
        return plan

    def start(self, plan, index=None, uploaded=None):
        ticket = self._take(plan)
        try:
            pending = self.inner.start(plan, index, uploaded)
        except BaseException:
            if ticket is not None:
                self.tier.release(ticket)
            raise
        if ticket is not None:
            for lid in ticket.slots:
                pending.stats.layers[lid].tier = "file"
            _on_close(
                pending, lambda: self._book(ticket, pending), lambda: self._hold(ticket, pending)
            )
        return pending

    def _book(self, ticket: Ticket, pending) -> None:
        """The step's file traffic into its stats, before they are booked (its gathers have
        waited for their reads by now; a layer never read is waited for here)."""
        ticket.settle()
        for lid, r in ticket.reads.items():
            st = pending.stats.layers[lid]
            st.file_hits, st.file_misses = r.hits, r.misses
            st.file_bytes, st.file_read_s, st.file_wait_s = r.bytes, r.read_s, r.wait_s

    def _take(self, plan):
        """The ticket of ``plan``; plans built before it and never started release theirs."""
        if not any(p is plan for p, _ in self._planned):
            return None
        while True:
            p, t = self._planned.popleft()
            if p is plan:
                return t
            self.tier.release(t)

    def _hold(self, ticket: Ticket, pending) -> None:
        ticket.done = pending
        self._held.append(ticket)
        self._release_done(wait=False)

    def _release_done(self, wait: bool) -> None:
        while self._held:
            if not _gathers_done(self._held[0].done, wait):
                return
            self.tier.release(self._held.popleft())

    def plan_index(self, plan):
        return self.inner.plan_index(plan)

    def book(self, pending) -> None:
        self.inner.book(pending)

    def flush(self) -> None:
        self.inner.flush()
        self._release_done(wait=True)

    def close(self) -> None:
        self.inner.close()
        self._release_done(wait=True)
        for _, t in self._planned:
            self.tier.release(t)
        self._planned.clear()
        self.tier.close()


def _gathers_done(pending, wait: bool) -> bool:
    """Whether every gather of a step has stopped reading the cache (CUDA: the step's end
    event; the CPU worker: its per-layer events; inline gathers: done once closed)."""
    end = getattr(pending, "end", None)
    if end is not None:
        if wait:
            end.synchronize()
        return bool(end.query())
    ready = getattr(pending, "ready", None)
    if isinstance(ready, dict):
        if wait:
            for ev in ready.values():
                ev.wait()
        return all(ev.is_set() for ev in ready.values())
    return True


def _on_close(pending, before, after) -> None:
    """Run ``before`` right before ``pending.close()`` books the step, ``after`` right after
    (once)."""
    close = pending.close

    def closed():
        first = not pending.closed
        if first:
            before()
        out = close()
        if first:
            after()
        return out

    pending.close = closed
