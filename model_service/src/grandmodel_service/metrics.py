"""Prometheus metrics, one registry per app, and the ASGI middleware that records requests."""

from __future__ import annotations

import time
from bisect import bisect_left
from typing import Any

import numpy as np
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.002,
    0.003,
    0.005,
    0.0075,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
#: Confidence is the chosen action's probability: at least 1/3 with three actions.
CONFIDENCE_BUCKETS = (0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 0.99)
CONNECTION_CLOSE_REASONS = (
    "idle_timeout",
    "header_timeout",
    "body_timeout",
    "keepalive_timeout",
    "concurrency_limit",
)
KNOWN_METHODS = frozenset({"GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH"})
#: Marks a release gate's own request (quantnova.grandmodel's modules send it; the front door
#: removes it from client requests). Probes are counted apart from client traffic, so that a
#: gate's requests do not shift the throughput, error ratio, latency or prediction mix that the
#: release analysis compares between the colours.
PROBE_HEADER = b"x-grandmodel-probe"


class Metrics:
    def __init__(self, namespace: str = "grandmodel") -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        ns = namespace
        r = self.registry
        self.requests = Counter(
            "http_requests_total",
            "HTTP requests by route, method and status",
            ["route", "method", "status"],
            namespace=ns,
            registry=r,
        )
        self.request_duration = Histogram(
            "http_request_duration_seconds",
            "HTTP request latency by route",
            ["route", "method"],
            namespace=ns,
            registry=r,
            buckets=LATENCY_BUCKETS,
        )
        self.probe_requests = Counter(
            "probe_requests_total",
            "Requests of release gates and other probes (header X-GrandModel-Probe), by route, "
            "method and status; not in http_requests_total",
            ["route", "method", "status"],
            namespace=ns,
            registry=r,
        )
        self.inflight = Gauge(
            "http_requests_in_flight",
            "Predict requests being processed",
            namespace=ns,
            registry=r,
        )
        self.batch_size = Histogram(
            "inference_batch_size",
            "Samples per forward pass",
            ["model"],
            namespace=ns,
            registry=r,
            buckets=BATCH_BUCKETS,
        )
        self.inference_duration = Histogram(
            "inference_duration_seconds",
            "Forward pass latency",
            ["model"],
            namespace=ns,
            registry=r,
            buckets=LATENCY_BUCKETS,
        )
        self.samples = Counter(
            "inference_samples_total", "Samples predicted", ["model"], namespace=ns, registry=r
        )
        self.inference_errors = Counter(
            "inference_errors_total",
            "Forward passes that raised",
            ["model"],
            namespace=ns,
            registry=r,
        )
        self.rejected = Counter(
            "rejected_requests_total",
            "Requests refused before inference, by reason",
            ["reason"],
            namespace=ns,
            registry=r,
        )
        self.model_info = Gauge(
            "model_info",
            "Loaded model artifacts (value 1)",
            ["model", "version", "sha256", "service_version", "color"],
            namespace=ns,
            registry=r,
        )
        self.ready = Gauge("ready", "1 when /ready answers 200", namespace=ns, registry=r)
        self.draining = Gauge(
            "draining", "1 while drained by an operator", namespace=ns, registry=r
        )

        self.out_of_domain = Counter(
            "input_out_of_domain_total",
            "Requests refused because a value lies outside the model's input domain",
            ["model", "color"],
            namespace=ns,
            registry=r,
        )
        self.non_finite_outputs = Counter(
            "non_finite_outputs_total",
            "Requests whose model output held NaN or Inf (refused with 422, never returned)",
            ["model", "color"],
            namespace=ns,
            registry=r,
        )
        self.connections_closed = Counter(
            "connections_closed_total",
            "Connections cut by the server: slow or idle clients, and refusals at the limit",
            ["reason"],
            namespace=ns,
            registry=r,
        )
        for reason in CONNECTION_CLOSE_REASONS:
            self.connections_closed.labels(reason)
        self.predictions = PredictionStats(ns)
        r.register(self.predictions)

    def observe_batch(self, model: str, size: int, seconds: float) -> None:
        self.batch_size.labels(model).observe(size)
        self.inference_duration.labels(model).observe(seconds)
        self.samples.labels(model).inc(size)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Pure ASGI (no BaseHTTPMiddleware overhead): counts and times every HTTP request.

    A probe (header X-GrandModel-Probe) is counted in probe_requests_total only, never in the
    client series the release analysis reads.

    The route label is the matched route's template, or ``unmatched``, so label cardinality
    stays bounded whatever paths clients send.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics
        self._children: dict[tuple[str, str, int], Any] = {}
        self._timers: dict[tuple[str, str], Any] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", "unmatched")
            method = scope["method"] if scope["method"] in KNOWN_METHODS else "OTHER"
            if any(name == PROBE_HEADER and value for name, value in scope["headers"]):
                self.metrics.probe_requests.labels(path, method, str(status)).inc()
            else:
                self._record(path, method, status, time.perf_counter() - started)

    def _record(self, path: str, method: str, status: int, seconds: float) -> None:
        key = (path, method, status)
        counter = self._children.get(key)
        if counter is None:
            counter = self._children[key] = self.metrics.requests.labels(path, method, str(status))
        counter.inc()
        timer = self._timers.get((path, method))
        if timer is None:
            timer = self._timers[(path, method)] = self.metrics.request_duration.labels(
                path, method
            )
        timer.observe(seconds)


class PredictionStats(Collector):
    """Served predictions per model and colour: action counts and a confidence histogram.

    A release gate compares the new colour's distribution with the old colour's on the same
    live traffic. Observed once per forward pass with numpy (one ``bincount`` and one
    ``searchsorted`` over the batch), not once per sample through prometheus_client.
    """

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self.bounds = np.asarray(CONFIDENCE_BUCKETS, dtype=np.float64)
        self._bounds_list = list(CONFIDENCE_BUCKETS)
        # (model, color) -> [action counts, bucket counts (len(bounds) + 1), confidence sum]
        self._series: dict[tuple[str, str], list[Any]] = {}
        self._actions: dict[str, tuple[str, ...]] = {}

    def register_model(self, model: str, color: str, actions: tuple[str, ...]) -> None:
        self._actions[model] = actions
        self._series.setdefault(
            (model, color),
            [np.zeros(len(actions), np.int64), np.zeros(len(self.bounds) + 1, np.int64), 0.0],
        )

    def observe(self, model: str, color: str, probabilities: np.ndarray) -> None:
        """Record a (B, actions) probability matrix of finite rows."""
        series = self._series[(model, color)]
        if probabilities.shape[0] <= 4:  # a few rows: plain Python beats numpy's call costs
            for row in probabilities.tolist():
                confidence = max(row)
                series[0][row.index(confidence)] += 1
                series[1][bisect_left(self._bounds_list, confidence)] += 1
                series[2] += confidence
            return
        confidence = probabilities.max(axis=1)
        series[0] += np.bincount(probabilities.argmax(axis=1), minlength=series[0].size)
        series[1] += np.bincount(
            np.searchsorted(self.bounds, confidence, side="left"), minlength=series[1].size
        )
        series[2] += float(confidence.sum())

    def collect(self) -> list[Metric]:
        ns = self.namespace
        actions = CounterMetricFamily(
            f"{ns}_predictions",
            "Predictions served, by chosen action",
            labels=["model", "color", "action"],
        )
        confidence = HistogramMetricFamily(
            f"{ns}_prediction_confidence",
            "Probability of the chosen action, per served prediction",
            labels=["model", "color"],
        )
        for (model, color), (counts, buckets, total) in self._series.items():
            for action, count in zip(self._actions[model], counts.tolist(), strict=True):
                actions.add_metric([model, color, action], count)
            cumulative = np.cumsum(buckets).tolist()
            edges = [f"{b:g}" for b in CONFIDENCE_BUCKETS] + ["+Inf"]
            confidence.add_metric([model, color], list(zip(edges, cumulative, strict=True)), total)
        return [actions, confidence]

    def describe(self) -> list[Metric]:
        return []
