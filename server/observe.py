"""Many observations of one Prometheus histogram in one call (a step's inter-token times).

``Histogram.observe`` takes a lock and walks the buckets once per value; a step of B
sequences would make B such calls. Here the values are bucketed with one ``searchsorted``
and each touched bucket (and the sum) is incremented once, which leaves the histogram exactly
as B ``observe`` calls would. prometheus_client keeps the buckets in ``_buckets`` and the
bounds in ``_upper_bounds``; a version without them falls back to ``observe`` per value.
"""

from __future__ import annotations

import numpy as np
from prometheus_client import Histogram


def observe_many(hist: Histogram, values: list[float]) -> None:
    bounds = getattr(hist, "_upper_bounds", None)
    buckets = getattr(hist, "_buckets", None)
    total = getattr(hist, "_sum", None)
    if bounds is None or buckets is None or total is None or len(buckets) != len(bounds):
        for v in values:
            hist.observe(v)
        return
    # a value v lands in the first bucket whose bound is >= v (the last bound is +Inf)
    at = np.searchsorted(np.asarray(bounds, np.float64), np.asarray(values, np.float64))
    counts = np.bincount(at, minlength=len(bounds))
    for i in np.flatnonzero(counts):
        buckets[i].inc(int(counts[i]))
    total.inc(float(sum(values)))
