"""Prometheus metrics, one registry per process (so tests can run several
processes' worth side by side). Names follow Prometheus' conventions:
counters end in `_total`, durations are seconds."""

from __future__ import annotations

from decimal import Decimal
from typing import Any, Protocol, TypeVar

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


class _Part(Protocol):
    def __init__(self, registry: CollectorRegistry) -> None: ...


P = TypeVar("P", bound=_Part)


class ProcessMetrics:
    """One process's registry and the metrics of each role it runs, each
    made once (two worker pools in one process share the worker's)."""

    def __init__(self) -> None:
        self.registry = process_registry()
        self._parts: dict[type[Any], Any] = {}

    def part(self, kind: type[P]) -> P:
        """The metrics of one kind (`WorkerMetrics`, ...) on this registry."""
        if kind not in self._parts:
            self._parts[kind] = kind(self.registry)
        made: P = self._parts[kind]
        return made


class DispatchMetrics:
    """What admission and routing decide, in the router and the gateway."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.routed = Counter(
            "modelyard_jobs_routed",
            "Jobs sent to a deployment's pool, by deployment.",
            ["deployment"],
            registry=registry,
        )
        self.refused = Counter(
            "modelyard_jobs_refused",
            "Jobs answered by admission or routing, with no provider call, by error kind.",
            ["kind"],
            registry=registry,
        )
        self.deferred = Counter(
            "modelyard_jobs_deferred",
            "Jobs sent to wait in the broker's retry ladder before being routed again.",
            registry=registry,
        )


class WorkerMetrics:
    """What the provider calls of a worker process did."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.calls = Counter(
            "modelyard_provider_calls",
            "Provider calls, by deployment and outcome (ok, or the error kind).",
            ["deployment", "outcome"],
            registry=registry,
        )
        self.latency = Histogram(
            "modelyard_provider_call_duration_seconds",
            "Time a provider call took, streams to their last chunk, by deployment.",
            ["deployment"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.in_flight = Gauge(
            "modelyard_provider_calls_in_flight",
            "Provider-call slots in use, by pool.",
            ["pool"],
            registry=registry,
        )
        self.tokens = Counter(
            "modelyard_billed_tokens",
            "Tokens billed by providers, by deployment and direction (input, output).",
            ["deployment", "direction"],
            registry=registry,
        )
        self.cost = Counter(
            "modelyard_billed_cost_usd",
            "Cost of billed calls in US dollars, by deployment.",
            ["deployment"],
            registry=registry,
        )
        self.handed_on = Counter(
            "modelyard_attempts_handed_on",
            "Failed attempts sent on to be retried or to fall back, by deployment and error kind.",
            ["deployment", "kind"],
            registry=registry,
        )


class LedgerMetrics:
    """What the ledger wrote, and what waits to be written."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.events = Counter(
            "modelyard_ledger_events_written",
            "Cost events written to the ledger table (or found there already, for a repeat).",
            registry=registry,
        )
        self.rejected = Counter(
            "modelyard_ledger_events_rejected",
            "Cost events the database refused, parked on the dead-letter queue.",
            registry=registry,
        )
        self.cost = Counter(
            "modelyard_ledger_cost_usd",
            "Cost of the cost events written in US dollars (a redelivered event found "
            "already written counts again: the ledger table is the exact figure).",
            registry=registry,
        )
        self.buffered = Gauge(
            "modelyard_ledger_buffered_messages",
            "Cost messages received and not yet written.",
            registry=registry,
        )
        self.write_latency = Histogram(
            "modelyard_ledger_write_duration_seconds",
            "Time one ledger transaction took, retries after database errors included.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )


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
