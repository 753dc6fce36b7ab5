"""Answering producers: building results and putting them on reply queues."""

from __future__ import annotations

import time

import aio_pika
import structlog
from aio_pika.abc import AbstractChannel

from modelyard import broker
from modelyard.batching import Batcher
from schemas.codec import encode
from schemas.errors import JobError
from schemas.jobs import CompletionJob
from schemas.results import JobResult, Reply, ResultBatch, Timings

log = structlog.get_logger("modelyard.replies")


def timings_for(job: CompletionJob, started_at: float | None = None) -> Timings:
    """The job's stage timestamps, finished now."""
    return Timings(
        submitted_at=job.submitted_at,
        routed_at=job.route.routed_at if job.route else None,
        started_at=started_at,
        finished_at=time.time(),
    )


def error_result(job: CompletionJob, error: JobError, *, redelivered: bool = False) -> JobResult:
    """The final result for a job that failed with `error`."""
    return JobResult(
        job_id=job.id,
        status="error",
        error=error,
        model=job.request.model,
        deployment=job.route.deployment if job.route else None,
        metadata=job.metadata,
        attempts=job.attempts,
        timings=timings_for(job),
        redelivered=redelivered or job.redelivered,
    )


async def send_reply(channel: AbstractChannel, reply_to: str | None, reply: Reply) -> None:
    """Publish to the producer's queue and wait for the broker's confirm.

    A reply nobody can receive (no `reply_to`, or its queue is gone) goes to
    the dead queue with the reason, so the answer, already paid for, is kept.
    """
    body = encode(reply)
    if not reply_to:
        await broker.dead_letter(channel, body, "no reply_to on the job")
        return
    try:
        await channel.default_exchange.publish(
            broker.message(body, correlation_id=_first_job_id(reply)),
            routing_key=reply_to,
            mandatory=True,
        )
    except aio_pika.exceptions.DeliveryError:
        log.warning("reply queue missing, result dead-lettered", reply_to=reply_to)
        await broker.dead_letter(channel, body, f"reply queue {reply_to!r} does not exist")


def _first_job_id(reply: Reply) -> str:
    return reply.results[0].job_id if isinstance(reply, ResultBatch) else reply.job_id


def reply_batcher(
    channel: AbstractChannel, *, max_items: int, linger_s: float
) -> Batcher[str | None, JobResult]:
    """Results grouped per reply queue into `ResultBatch` messages (batch lane)."""

    async def send(reply_to: str | None, results: list[JobResult]) -> None:
        reply = results[0] if len(results) == 1 else ResultBatch(results=results)
        await send_reply(channel, reply_to, reply)

    return Batcher(send, max_items=max_items, linger_s=linger_s)
