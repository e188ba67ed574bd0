"""The front's /metrics under data parallelism: each engine's own metrics with an ``engine``
label, beside the front's (HTTP errors, its process).

Engines send their Prometheus text every second (``dp_engine``); this collector parses the
latest of each and yields one family per name with every engine's samples. A family the front
has too (the serving metrics it registers but that its engines count) comes from the engines;
the front's ``process_*``/``python_*`` samples stay, labelled ``engine="front"``.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

OWN = ("process_", "python_")


class EngineMetrics:
    """A collector for a registry of its own: the front's families merged with the engines'."""

    def __init__(self, front: CollectorRegistry, texts: Callable[[], dict[int, str]]) -> None:
        self.front, self.texts = front, texts

    def collect(self):
        merged: dict[str, Metric] = {}
        for index, text in sorted(self.texts().items()):
            for fam in text_string_to_metric_families(text):
                out = merged.setdefault(fam.name, Metric(fam.name, fam.documentation, fam.type))
                for s in fam.samples:
                    labels = {**s.labels, "engine": str(index)}
                    out.add_sample(s.name, labels, s.value, s.timestamp, s.exemplar)
        for fam in self.front.collect():
            if fam.name not in merged:
                yield fam
            elif fam.name.startswith(OWN):
                for s in fam.samples:
                    labels = {**s.labels, "engine": "front"}
                    merged[fam.name].add_sample(s.name, labels, s.value, s.timestamp)
        yield from merged.values()


def merged_registry(front: CollectorRegistry, texts: Callable[[], dict[int, str]]):
    r = CollectorRegistry(auto_describe=False)
    r.register(EngineMetrics(front, texts))
    return r
