"""Answering producers: building results and putting them on reply queues."""

from __future__ import annotations

import time

from modelyard.batching import Batcher, Encoded, encoded_size
from modelyard.broker import Broker
from schemas.codec import encode, encode_result_batch
from schemas.errors import ErrorKind, JobError
from schemas.jobs import CompletionJob
from schemas.results import JobResult, Reply, ResultBatch, Timings


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
        warnings=route_notes(job),
    )


def route_notes(job: CompletionJob) -> list[str]:
    """What the router said about its choices, for the result's warnings."""
    notes = list(job.notes)
    if job.route is not None and job.route.note and job.route.note not in notes:
        notes.append(job.route.note)  # routed by a router older than `notes`
    return notes


async def send_reply(broker: Broker, reply_to: str | None, reply: Reply) -> None:
    """Publish to the producer's queue and wait for the broker's confirm.

    A reply nobody can receive (no `reply_to`, not an ordinary queue, or its
    queue is gone) goes to the dead queue with the reason, so the answer,
    already paid for, is kept.
    """
    correlation_id = reply.results[0].job_id if isinstance(reply, ResultBatch) else reply.job_id
    await broker.reply(reply_to, encode(reply), correlation_id=correlation_id)


def reply_batcher(
    broker: Broker, *, max_items: int, linger_s: float
) -> Batcher[str | None, Encoded]:
    """Results grouped per reply queue into `ResultBatch` messages (batch
    lane); put `(job_id, encode(result))`."""

    async def send(reply_to: str | None, results: list[Encoded]) -> None:
        job_id, body = results[0]
        if len(results) > 1:
            body = encode_result_batch([body for _, body in results])
        await broker.reply(reply_to, body, correlation_id=job_id)

    return Batcher(send, max_items=max_items, linger_s=linger_s, size=encoded_size)


def kept_for_replay(job: CompletionJob, error: JobError) -> bool:
    """Whether a job that failed for good is parked on the dead queue too,
    for an operator to replay once the cause is fixed: a batch-lane job
    (its answer goes to a results queue that outlives the call; a caller
    waiting on an interactive one has had its error) that reached a
    provider, unless a replay would be refused (its deadline passed, or
    modelyard found the job itself invalid) or it is a line of a batch file
    (its error file reports it, and the file is run again instead)."""
    return (
        job.priority == "batch"
        and bool(job.attempts)
        and error.kind not in (ErrorKind.DEADLINE_EXCEEDED, ErrorKind.INVALID_JOB)
        and not job.deadline_passed(time.time())
        and job.metadata.batch_id is None
    )


def final_failure(error: JobError) -> str:
    """The dead queue's reason for a job parked by `kept_for_replay`."""
    return f"final failure: {error.kind.value}: {error.message}"
