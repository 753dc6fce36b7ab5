"""Prometheus metrics, one registry per process (so tests can run several
processes' worth side by side). Names follow Prometheus' conventions:
counters end in `_total`, durations are seconds."""

from __future__ import annotations

from decimal import Decimal

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)

from schemas.results import JobResult

# Seconds: from a cached answer (a few ms) to a long generation.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


def process_registry() -> CollectorRegistry:
    """A registry with the process's own CPU, memory and file metrics."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry


class HttpMetrics:
    """What the gateway counts: requests by route, status and model, their
    latency, those in flight, errors by kind, tokens and cost by model."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "modelyard_http_requests",
            "HTTP requests answered, by route, status and model.",
            ["route", "status", "model"],
            registry=registry,
        )
        self.latency = Histogram(
            "modelyard_http_request_duration_seconds",
            "Time from request to the end of the answer, by route.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.in_flight = Gauge(
            "modelyard_http_in_flight",
            "Requests being answered, by route.",
            ["route"],
            registry=registry,
        )
        self.errors = Counter(
            "modelyard_job_errors",
            "Jobs answered with an error, by kind.",
            ["kind"],
            registry=registry,
        )
        self.tokens = Counter(
            "modelyard_tokens",
            "Tokens billed, by model and direction (input, output).",
            ["model", "direction"],
            registry=registry,
        )
        self.cost = Counter(
            "modelyard_cost_usd",
            "Cost billed in US dollars, by model.",
            ["model"],
            registry=registry,
        )

    def result(self, model: str, result: JobResult) -> None:
        """Count a job's outcome: its error kind, or its tokens and cost."""
        if result.error is not None:
            self.errors.labels(result.error.kind.value).inc()
        if result.usage is not None:
            self.tokens.labels(model, "input").inc(result.usage.input_tokens)
            self.tokens.labels(model, "output").inc(result.usage.output_tokens)
        if result.cost:
            self.cost.labels(model).inc(float(result.cost or Decimal(0)))
