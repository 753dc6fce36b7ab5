"""OpenTelemetry spans for the steps a job goes through.

Each job carries a W3C `traceparent`; the router and the worker continue that
trace with a span named by the messaging semantic conventions, so a job shows
up as one trace from the producer to the provider call. Spans are recorded
only when tracing is switched on (`MODELYARD_TRACING=console` prints them);
otherwise the OpenTelemetry API's no-op tracer costs next to nothing.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from schemas.jobs import CompletionJob

_propagator = TraceContextTextMapPropagator()
tracer = trace.get_tracer("modelyard")


def configure_tracing() -> None:
    """Install the SDK with a console exporter when `MODELYARD_TRACING=console`."""
    if os.environ.get("MODELYARD_TRACING") != "console":
        return
    from opentelemetry.sdk.trace import TracerProvider  # noqa: PLC0415
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter  # noqa: PLC0415

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    trace.set_tracer_provider(provider)


@contextmanager
def job_span(job: CompletionJob, queue: str, operation: str = "process") -> Iterator[Span]:
    """A consumer span for `job`, child of the producer's trace when it sent one."""
    if isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        # Tracing is off: skip building a context and attributes that the
        # no-op tracer would throw away (a tenth of a worker's time per job).
        yield trace.INVALID_SPAN
        return
    carrier = {}
    if job.trace is not None:
        carrier["traceparent"] = job.trace.traceparent
        if job.trace.tracestate:
            carrier["tracestate"] = job.trace.tracestate
    with tracer.start_as_current_span(
        f"{operation} {queue}",
        context=_propagator.extract(carrier),
        kind=SpanKind.CONSUMER,
        attributes={
            "messaging.system": "rabbitmq",
            "messaging.operation.type": operation,
            "messaging.destination.name": queue,
            "messaging.message.id": job.id,
            "gen_ai.request.model": job.request.model,
        },
    ) as span:
        yield span
