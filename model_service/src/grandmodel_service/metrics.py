"""Prometheus metrics, one registry per app, and the ASGI middleware that records requests."""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.platform_collector import PlatformCollector
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
KNOWN_METHODS = frozenset({"GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH"})


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

    def observe_batch(self, model: str, size: int, seconds: float) -> None:
        self.batch_size.labels(model).observe(size)
        self.inference_duration.labels(model).observe(seconds)
        self.samples.labels(model).inc(size)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Pure ASGI (no BaseHTTPMiddleware overhead): counts and times every HTTP request.

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
            key = (path, method, status)
            counter = self._children.get(key)
            if counter is None:
                counter = self._children[key] = self.metrics.requests.labels(
                    path, method, str(status)
                )
            counter.inc()
            timer = self._timers.get((path, method))
            if timer is None:
                timer = self._timers[(path, method)] = self.metrics.request_duration.labels(
                    path, method
                )
            timer.observe(time.perf_counter() - started)
