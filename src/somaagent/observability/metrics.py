"""Prometheus metrics: HTTP requests and latency, model latency and tokens, queue depth.

With several worker processes (`soma serve --workers N`) prometheus_client's multiprocess mode
is used (PROMETHEUS_MULTIPROC_DIR is set by `soma serve`), so `/metrics` sums every worker.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

# `_created` series double the exposition size and no dashboard we ship reads them.
disable_created_metrics()  # type: ignore[no-untyped-call]

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


def multiprocess_dir() -> str | None:
    """The shared metrics directory when several workers run, else None."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR")


class Metrics:
    """The process's metrics, registered on `registry` (or on files shared by the workers)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        shared = multiprocess_dir() is not None
        target = None if shared else self.registry
        self.http_requests = Counter(
            "soma_http_requests",
            "HTTP requests by route, method and status.",
            ["route", "method", "status"],
            registry=target,
        )
        self.http_latency = Histogram(
            "soma_http_request_duration_seconds",
            "HTTP request latency (to the last byte).",
            ["route", "method"],
            buckets=LATENCY_BUCKETS,
            registry=target,
        )
        self.model_latency = Histogram(
            "soma_model_latency_seconds",
            "Model call latency by model and outcome (each fallback attempt).",
            ["model", "outcome"],
            buckets=LATENCY_BUCKETS,
            registry=target,
        )
        self.model_tokens = Counter(
            "soma_model_tokens",
            "Tokens processed, by model and kind (prompt|completion).",
            ["model", "kind"],
            registry=target,
        )
        self.events_emitted = Counter(
            "soma_events_emitted",
            "Events written to the outbox, by topic.",
            ["topic"],
            registry=target,
        )
        self._gauges: list[Callable[[], Iterable[tuple[str, float]]]] = []
        if shared:
            from prometheus_client import multiprocess

            multiprocess.MultiProcessCollector(self.registry)  # type: ignore[no-untyped-call]
        self.registry.register(_QueueCollector(self._gauges))

    def observe_model(self, model: str, seconds: float, outcome: str) -> None:
        """Record one model attempt."""
        self.model_latency.labels(model, outcome).observe(seconds)

    def count_tokens(self, model: str, prompt: int, completion: int) -> None:
        """Add a call's token counts."""
        if prompt:
            self.model_tokens.labels(model, "prompt").inc(prompt)
        if completion:
            self.model_tokens.labels(model, "completion").inc(completion)

    def add_queue_source(self, source: Callable[[], Iterable[tuple[str, float]]]) -> None:
        """Register a callable giving (model, waiting) pairs, read at scrape time."""
        self._gauges.append(source)

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)


class _QueueCollector(Collector):
    def __init__(self, sources: list[Callable[[], Iterable[tuple[str, float]]]]) -> None:
        self._sources = sources

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "soma_model_queue_depth", "Requests waiting for a model slot (this process).", labels=["model"]
        )
        for source in self._sources:
            for model, waiting in source():
                family.add_metric([model], waiting)
        yield family
