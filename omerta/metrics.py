"""
One metrics object per node, fed by every component.

Counters are keyed by a name and a sorted tuple of label pairs, so the same
object can be read by tests, written into the node's status file and, later,
exposed in Prometheus text format and in the manhole.
"""

from __future__ import annotations

from collections import defaultdict


class Metrics:
    """
    Named counters and gauges with optional labels.
    """

    BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

    def __init__(self) -> None:
        self._counters: defaultdict[tuple, int] = defaultdict(int)
        self._gauges: dict[tuple, float] = {}
        self._histograms: dict[tuple, list] = {}

    def observe(self, name: str, value: float, **labels: str) -> None:
        """
        Add one observation (seconds) to a histogram with L{BUCKETS}.
        """
        key = (name, tuple(sorted(labels.items())))
        histogram = self._histograms.get(key)
        if histogram is None:
            histogram = self._histograms[key] = [[0] * len(self.BUCKETS), 0, 0.0]
        counts = histogram[0]
        for i, bound in enumerate(self.BUCKETS):
            if value <= bound:
                counts[i] += 1
        histogram[1] += 1
        histogram[2] += value

    def histograms(self):
        """
        C{(name, labels dict, cumulative bucket counts, count, sum)} for each
        histogram series.
        """
        for (name, labels), (counts, count, total) in sorted(self._histograms.items()):
            yield name, dict(labels), list(counts), count, total

    def series(self):
        """
        C{(kind, name, labels dict, value)} for every counter and gauge.
        """
        for (name, labels), value in sorted(self._counters.items()):
            yield "counter", name, dict(labels), value
        for (name, labels), value in sorted(self._gauges.items()):
            yield "gauge", name, dict(labels), value

    def inc(self, name: str, amount: int = 1, **labels: str) -> None:
        self._counters[(name, tuple(sorted(labels.items())))] += amount

    def set(self, name: str, value: float, **labels: str) -> None:
        self._gauges[(name, tuple(sorted(labels.items())))] = value

    def get(self, name: str, **labels: str) -> float:
        """
        The value of one counter or gauge (0 if never touched).
        """
        key = (name, tuple(sorted(labels.items())))
        if key in self._gauges:
            return self._gauges[key]
        return self._counters.get(key, 0)

    def total(self, name: str) -> int:
        """
        The sum of a counter over all its label values.
        """
        return sum(v for (n, _), v in self._counters.items() if n == name)

    def by_label(self, name: str, label: str) -> dict[str, int]:
        """
        A counter broken down by one label, e.g. drops by reason.
        """
        out: dict[str, int] = {}
        for (n, labels), value in self._counters.items():
            if n == name:
                key = dict(labels).get(label, "")
                out[key] = out.get(key, 0) + value
        return out

    def snapshot(self) -> dict[str, object]:
        """
        Everything as plain JSON-ready data: C{{name: value}} for unlabelled
        series, C{{name: [{"labels": ..., "value": ...}]}} otherwise.
        """
        out: dict[str, object] = {}
        for (name, labels), value in sorted(
            list(self._counters.items()) + list(self._gauges.items())
        ):
            if labels:
                out.setdefault(name, []).append({"labels": dict(labels), "value": value})
            else:
                out[name] = value
        for name, labels, _buckets, count, total in self.histograms():
            out.setdefault(name, []).append(
                {"labels": labels, "count": count, "sum": round(total, 6)})
        return out
