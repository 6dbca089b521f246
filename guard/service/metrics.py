"""Prometheus text-format metrics for the service, written out by hand (no client library to install or configure).

Counters, gauges and histograms with fixed label sets, rendered in the text exposition format 0.0.4
(https://prometheus.io/docs/instrumenting/exposition_formats/). Updates take a lock: the event loop and the batch
worker thread both record.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Callable, Iterable, Sequence

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape(str(v))}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _num(v: float) -> str:
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if math.isnan(v):
        return "NaN"
    return repr(int(v)) if float(v).is_integer() and abs(v) < 1e15 else repr(float(v))


class _Metric:
    kind = "untyped"

    def __init__(self, name: str, help_text: str, labels: Sequence[str] = ()) -> None:
        self.name, self.help, self.label_names = name, help_text, tuple(labels)
        self._lock = threading.Lock()

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name: str, help_text: str, labels: Sequence[str] = ()) -> None:
        super().__init__(name, help_text, labels)
        self._values: dict[tuple[str, ...], float] = {} if labels else {(): 0.0}

    def inc(self, amount: float = 1.0, *labels: str) -> None:
        with self._lock:
            self._values[labels] = self._values.get(labels, 0.0) + amount

    def value(self, *labels: str) -> float:
        return self._values.get(labels, 0.0)

    def render(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        return self.header() + [f"{self.name}{_labels(self.label_names, k)} {_num(v)}" for k, v in items]


class Gauge(_Metric):
    """A gauge read at scrape time from ``fn`` (one value, or ``{label values: value}`` for a labelled gauge)."""

    kind = "gauge"

    def __init__(self, name: str, help_text: str, fn: Callable[[], float | dict[tuple[str, ...], float]],
                 labels: Sequence[str] = ()) -> None:
        super().__init__(name, help_text, labels)
        self.fn = fn

    def render(self) -> list[str]:
        v = self.fn()
        items = sorted(v.items()) if isinstance(v, dict) else [((), v)]
        return self.header() + [f"{self.name}{_labels(self.label_names, k)} {_num(float(x))}" for k, x in items]


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name: str, help_text: str, buckets: Iterable[float], labels: Sequence[str] = ()) -> None:
        super().__init__(name, help_text, labels)
        self.bounds = tuple(sorted(float(b) for b in buckets))
        self._series: dict[tuple[str, ...], list[float]] = {}  # per label set: bucket counts..., +Inf, sum

    def observe(self, value: float, *labels: str) -> None:
        i = bisect.bisect_left(self.bounds, value)  # first bound >= value: Prometheus buckets are "le"
        with self._lock:
            s = self._series.get(labels)
            if s is None:
                s = self._series[labels] = [0.0] * (len(self.bounds) + 2)
            s[i] += 1
            s[-1] += value

    def count(self, *labels: str) -> int:
        s = self._series.get(labels)
        return int(sum(s[:-1])) if s else 0

    def sum(self, *labels: str) -> float:
        s = self._series.get(labels)
        return s[-1] if s else 0.0

    def render(self) -> list[str]:
        with self._lock:
            series = sorted((k, list(v)) for k, v in self._series.items())
        out = self.header()
        for key, s in series:
            cum = 0.0
            for bound, n in zip((*self.bounds, math.inf), s[:-1]):
                cum += n
                le = 'le="' + _num(bound) + '"'
                out.append(f"{self.name}_bucket{_labels(self.label_names, key, le)} {_num(cum)}")
            out.append(f"{self.name}_sum{_labels(self.label_names, key)} {_num(s[-1])}")
            out.append(f"{self.name}_count{_labels(self.label_names, key)} {_num(cum)}")
        return out


class Registry:
    """The metrics of one service, rendered in registration order."""

    CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

    def __init__(self) -> None:
        self.metrics: list[_Metric] = []

    def add(self, metric: _Metric) -> _Metric:
        self.metrics.append(metric)
        return metric

    def render(self) -> str:
        return "\n".join(line for m in self.metrics for line in m.render()) + "\n"  # type: ignore[attr-defined]
