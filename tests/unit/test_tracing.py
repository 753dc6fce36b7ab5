"""A job's span continues the producer's trace."""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from modelyard.client import new_job
from modelyard.tracing import job_span
from schemas.chat import Message


def test_job_span_is_a_child_of_the_jobs_traceparent() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    job = new_job("fast", [Message(role="user", content="x")])
    assert job.trace is not None

    with job_span(job, "router.jobs"):
        pass

    [span] = exporter.get_finished_spans()
    assert format(span.context.trace_id, "032x") == job.trace.trace_id()
    assert span.parent is not None
    assert format(span.parent.span_id, "016x") == job.trace.traceparent.split("-")[2]
    assert span.name == "process router.jobs"
    assert span.attributes is not None
    assert span.attributes["messaging.message.id"] == job.id
