"""Prometheus metrics, in a registry per app (so several apps in one process do not collide)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

# Seconds; HTTP and storage calls are fast, generations take seconds to minutes.
FAST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
GENERATION_BUCKETS = (0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300, 600)


class Metrics:
    """Every metric the backend exports; `render()` is the /metrics reply."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.http_requests = Counter(
            "mv_http_requests",
            "HTTP requests by route and status",
            ["method", "route", "status"],
            registry=r,
        )
        self.http_latency = Histogram(
            "mv_http_request_duration_seconds",
            "HTTP request latency by route",
            ["method", "route"],
            buckets=FAST_BUCKETS,
            registry=r,
        )
        self.generation_seconds = Histogram(
            "mv_generation_duration_seconds",
            "Time to generate and store a request's images",
            ["backend"],
            buckets=GENERATION_BUCKETS,
            registry=r,
        )
        self.generations = Counter(
            "mv_generations", "Finished generations by outcome", ["status"], registry=r
        )
        self.generations_rejected = Counter(
            "mv_generations_rejected", "Generations refused with 429 (queue full)", registry=r
        )
        self.fallbacks = Counter(
            "mv_generation_fallbacks",
            "Generations served by a fallback generator",
            ["backend"],
            registry=r,
        )
        self.queue_depth = Gauge(
            "mv_generation_queue_depth", "Generations waiting in the queue", registry=r
        )
        self.generations_running = Gauge(
            "mv_generations_running", "Generations running now", registry=r
        )
        self.storage_latency = Histogram(
            "mv_storage_operation_duration_seconds",
            "Storage operation latency",
            ["backend", "operation"],
            buckets=FAST_BUCKETS,
            registry=r,
        )
        self.storage_errors = Counter(
            "mv_storage_operation_errors",
            "Storage operations that failed",
            ["backend", "operation"],
            registry=r,
        )
        self.pending_uploads = Gauge(
            "mv_pending_uploads", "Objects stored locally, waiting for an S3 upload", registry=r
        )
        self.webhooks = Counter(
            "mv_webhook_deliveries", "Webhook deliveries by outcome", ["outcome"], registry=r
        )
        self.manifest_conflicts = Counter(
            "mv_job_manifest_conflicts",
            "Job manifest merges retried because another writer changed the manifest first",
            registry=r,
        )

        # The labelled series of each (method, route, status), looked up once: `labels()` takes
        # a lock and builds a key on every call, which the per-request path need not pay.
        self._request_series: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        """Record one HTTP request: its count by status and its latency by route."""
        key = (method, route, status)
        series = self._request_series.get(key)
        if series is None:
            series = (
                self.http_requests.labels(method, route, str(status)),
                self.http_latency.labels(method, route),
            )
            self._request_series[key] = series
        count, latency = series
        count.inc()
        latency.observe(seconds)

    def watch(self, gauge: Gauge, read: Callable[[], float]) -> None:
        """Make `gauge` report `read()` at every scrape."""
        gauge.set_function(read)

    def observe_storage(self, backend: str, operation: str, seconds: float, ok: bool) -> None:
        """Record one storage operation."""
        self.storage_latency.labels(backend, operation).observe(seconds)
        if not ok:
            self.storage_errors.labels(backend, operation).inc()

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)


def sample(metrics: Metrics, name: str, labels: dict[str, Any] | None = None) -> float | None:
    """The current value of one sample (tests, benchmarks)."""
    return metrics.registry.get_sample_value(name, labels or {})
