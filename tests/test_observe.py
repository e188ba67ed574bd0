"""server.observe.observe_many leaves a histogram as one observe per value would."""

import random

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from server.observe import observe_many


def _exposition(reg: CollectorRegistry) -> list[str]:
    text = generate_latest(reg).decode()
    return [ln for ln in text.splitlines() if "_created" not in ln and "_sum" not in ln]


def _sum(reg: CollectorRegistry) -> float:
    return reg.get_sample_value("x_sum", {"a": "q"})


def test_observe_many_equals_observe_per_value():
    rng = random.Random(0)
    bounds = (0.01, 0.1, 1.0)
    one, many = CollectorRegistry(), CollectorRegistry()
    h1 = Histogram("x", "d", ["a"], registry=one, buckets=bounds).labels("q")
    h2 = Histogram("x", "d", ["a"], registry=many, buckets=bounds).labels("q")
    # bounds themselves land in their own bucket (le), past the last in +Inf
    for _ in range(3):
        values = [0.0, 0.01, 0.1, 1.0, 5.0, 0.0100001] + [rng.random() * 2 for _ in range(50)]
        for v in values:
            h1.observe(v)
        observe_many(h2, values)
    assert _exposition(one) == _exposition(many)
    assert abs(_sum(one) - _sum(many)) < 1e-9
    low = one.get_sample_value("x_bucket", {"a": "q", "le": "0.01"})
    assert low >= 6  # 0.0 and 0.01 of each round, and any random value below
    assert many.get_sample_value("x_count", {"a": "q"}) == 3 * 56
