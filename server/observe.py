"""Many observations of one Prometheus histogram in one call (a step's inter-token times).

``Histogram.observe`` takes a lock and walks the buckets once per value; a step of B
sequences would make B such calls. Here each value's bucket is found by bisection and each
touched bucket (and the sum) is incremented once, which leaves the histogram exactly as B
``observe`` calls would. prometheus_client keeps the buckets in ``_buckets`` and the bounds
in ``_upper_bounds``; a version without them falls back to ``observe`` per value.

Plain Python on purpose: this runs on the engine thread every step, and numpy's
``searchsorted`` lets go of the GIL, so the thread would wait to get it back from the event
loop or the device worker in the middle of its step.
"""

from __future__ import annotations

from bisect import bisect_left

from prometheus_client import Histogram


def observe_many(hist: Histogram, values: list[float]) -> None:
    bounds = getattr(hist, "_upper_bounds", None)
    buckets = getattr(hist, "_buckets", None)
    total = getattr(hist, "_sum", None)
    if bounds is None or buckets is None or total is None or len(buckets) != len(bounds):
        for v in values:
            hist.observe(v)
        return
    counts: dict[int, int] = {}
    for v in values:  # the first bucket whose bound is >= v (the last bound is +Inf)
        at = bisect_left(bounds, v)
        counts[at] = counts.get(at, 0) + 1
    for at, n in counts.items():
        buckets[at].inc(n)
    total.inc(sum(values))
