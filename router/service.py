"""The router process: admits submitted jobs and sends each to a worker pool.

It acks a submitted message (one job, or a batch of them) only after its
effect is safe: each job is confirmed on a pool's queue, or its error result
is confirmed on the reply queue, or it is parked on the dead queue. A crash
before that redelivers the message; jobs routed again are marked.

Interactive jobs go to their pool's queue one per message, at once. Batch-lane
jobs are packed per pool into `JobBatch` messages (up to `batch_lane.max_jobs`
jobs, waiting at most `batch_lane.linger_ms`), which is most of what makes a
large batch cheap to run.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable

import structlog
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection

from modelyard.batching import Batcher, Encoded, encoded_size, settle_all
from modelyard.broker import Broker, Consumer, resent, settle
from modelyard.config import Config, Deployment
from modelyard.replies import error_result, reply_batcher, send_reply
from modelyard.topology import ROUTER_QUEUE, build_topology
from modelyard.tracing import job_span
from router.routing import RouteTable, build_route_table
from schemas.codec import (
    InvalidMessage,
    decode_job,
    encode,
    encode_job_batch,
    salvage_envelope,
    split_job_batch,
)
from schemas.errors import ErrorKind, JobError, job_error
from schemas.jobs import JOB_BATCH_TYPE, CompletionJob, NextHop, Route
from schemas.results import JobResult, Timings

log = structlog.get_logger("modelyard.router")


class Router:
    """Consumes `router.jobs`; publishes to `modelyard.dispatch`."""

    def __init__(self, config: Config, connection: AbstractRobustConnection) -> None:
        self.config = config
        self.connection = connection
        self.routes: RouteTable = build_route_table(config)
        self.rng = random.Random()
        self.broker = Broker(connection)
        self._consumer = Consumer(
            connection, ROUTER_QUEUE, self.handle, prefetch=config.router.concurrency
        )

    async def start(self) -> None:
        """Declare the topology and start consuming."""
        await self.broker.declare(build_topology(self.config.pool_names()))
        lane = self.config.batch_lane
        self._batches: Batcher[str, Encoded] = Batcher(
            self._send_batch,
            max_items=lane.max_jobs,
            linger_s=lane.linger_ms / 1000,
            size=encoded_size,
        )
        self._replies = reply_batcher(
            self.broker, max_items=lane.max_jobs, linger_s=lane.linger_ms / 1000
        )
        await self._consumer.start()
        log.info("router started", queue=ROUTER_QUEUE, concurrency=self.config.router.concurrency)

    async def stop(self) -> None:
        """Stop taking jobs, let those in flight finish, close the channel."""
        await self._consumer.stop()
        await self.broker.close()

    async def handle(self, message: AbstractIncomingMessage) -> None:
        """Admit, route and forward one job or a batch of them; every path ends
        in ack, or in nack (requeue) when a publish failed."""
        if message.type == JOB_BATCH_TYPE:
            await self._handle_batch(message)
            return
        try:
            job = decode_job(message.body, self.config.router.max_job_bytes)
        except InvalidMessage as exc:
            await self._reject_invalid(message, exc)
            return
        if job.reply_to is None and message.reply_to:
            job.reply_to = message.reply_to
        await self._admit(job, redelivered=resent(message))
        await settle(message)

    async def _handle_batch(self, message: AbstractIncomingMessage) -> None:
        """Each job of a batch is judged alone: a bad one is answered (or
        parked), the others go on. The batch is acked once every job's
        dispatch or answer is confirmed."""
        try:
            raws = split_job_batch(message.body, self.config.router.max_batch_bytes)
        except InvalidMessage as exc:
            # Its jobs cannot be told apart, so none can be answered: the
            # whole message is parked on the dead queue, every job kept.
            log.warning("undecodable job batch dead-lettered", field=exc.field, reason=str(exc))
            await self.broker.dead_letter(message.body, f"undecodable job batch: {exc}")
            await settle(message)
            return
        redelivered = resent(message)
        # Jobs share the few outgoing batches they join: wait on each once.
        waits: dict[int, Awaitable[None]] = {}
        for raw in raws:
            wait = self._admit_raw(raw, message.reply_to, redelivered)
            waits[id(wait)] = wait
        # A failure is raised once all have settled; the consumer's guard then
        # requeues the message, and jobs it had sent are marked when sent again.
        await settle_all(map(_shielded, waits.values()))
        await settle(message)

    def _admit_raw(self, raw: bytes, reply_to: str | None, redelivered: bool) -> Awaitable[None]:
        """Decide one job of a batch; what to wait on before the batch is acked."""
        try:
            job = decode_job(raw, self.config.router.max_job_bytes)
        except InvalidMessage as exc:
            job_id, own_reply_to = salvage_envelope(raw)
            reply_to = own_reply_to or reply_to
            log.warning("invalid job in batch", job_id=job_id, field=exc.field, reason=str(exc))
            if job_id is None or reply_to is None:
                return self.broker.dead_letter(raw, f"invalid job, nobody to tell: {exc}")
            result = invalid_result(job_id, exc, redelivered)
            return self._replies.put(reply_to, (job_id, encode(result)))
        if job.reply_to is None:
            job.reply_to = reply_to
        return self._decide(job, redelivered=redelivered)

    async def _admit(self, job: CompletionJob, *, redelivered: bool) -> None:
        await _shielded(self._decide(job, redelivered=redelivered))

    def _decide(self, job: CompletionJob, *, redelivered: bool) -> Awaitable[None]:
        job.redelivered = job.redelivered or redelivered
        with (
            structlog.contextvars.bound_contextvars(
                job_id=job.id, trace_id=job.trace.trace_id() if job.trace else None
            ),
            job_span(job, ROUTER_QUEUE),
        ):
            return self._route(job)

    def _route(self, job: CompletionJob) -> Awaitable[None]:
        """Where the job goes, decided now; the publish to wait on is returned
        (for a batch-lane job, the future its outgoing batch shares)."""
        now = time.time()
        if job.deadline_passed(now):
            error = job_error(ErrorKind.DEADLINE_EXCEEDED, "deadline passed before routing")
            return self._answer(job, error_result(job, error))
        group = self.routes.resolve(job.request.model)
        if group is None:
            error = job_error(
                ErrorKind.UNKNOWN_MODEL,
                f"no model or alias named {job.request.model!r}",
                field="$.request.model",
            )
            return self._answer(job, error_result(job, error))
        if (refusal := self._check_fallbacks(job)) is not None:
            return self._answer(job, error_result(job, refusal))
        if job.next_hop is None:
            deployment = self.routes.choose(group, self.rng)
        elif (chosen := self._next(job, job.next_hop)) is not None:
            deployment, job.next_hop = chosen, None
        else:
            return self._answer(job, error_result(job, _exhausted(job.next_hop)))
        job.route = Route(deployment=deployment.name, pool=deployment.pool, routed_at=now)
        if not self.broker.reply_queue_known(job.reply_to):
            return self._check_reply_queue(job, deployment.pool)
        return self._dispatch(job, deployment.pool)

    def _next(self, job: CompletionJob, hop: NextHop) -> Deployment | None:
        own = job.fallbacks if self.config.allow_job_fallbacks else None
        chosen = self.routes.next_hop(job, hop, self.rng, own)
        if chosen is not None:
            kind = "retry" if not hop.fallback else "fallback"
            log.info(kind, deployment=chosen.name, reason=hop.reason, attempts=len(job.attempts))
        return chosen

    def _check_fallbacks(self, job: CompletionJob) -> JobError | None:
        """A job's own fallback list: allowed by the config, naming models."""
        if not job.fallbacks:
            return None
        if not self.config.allow_job_fallbacks:
            return job_error(
                ErrorKind.INVALID_JOB,
                "this gateway does not accept a job's own fallbacks (allow_job_fallbacks: false)",
                field="$.fallbacks",
            )
        for i, label in enumerate(job.fallbacks):
            if self.routes.resolve(label) is None:
                return job_error(
                    ErrorKind.INVALID_JOB,
                    f"no model or alias named {label!r}",
                    field=f"$.fallbacks[{i}]",
                )
        return None

    def _dispatch(self, job: CompletionJob, pool: str) -> Awaitable[None]:
        log.debug("routed", deployment=job.route.deployment if job.route else None, pool=pool)
        if job.priority == "batch" and not job.attempts:
            return self._batches.put(pool, (job.id, encode(job)))
        # A retried or fallen-back batch job has waited its turn once: it
        # goes ahead of the batch backlog, one message on the pool's queue.
        return self._send_job(job, pool)

    async def _check_reply_queue(self, job: CompletionJob, pool: str) -> None:
        """Dispatch only a job whose answer can be delivered: one whose
        `reply_to` is a special address, too long, or a missing queue is
        parked on the dead queue with the reason, and no provider is paid."""
        problem = await self.broker.reply_queue_problem(job.reply_to)
        if problem is None:
            await _shielded(self._dispatch(job, pool))
            return
        log.warning("job not run: its answer cannot be delivered", reason=problem)
        await self.broker.dead_letter(encode(job), f"job not run: {problem}")

    def _answer(self, job: CompletionJob, result: JobResult) -> Awaitable[None]:
        """An error answer, batched with others for batch-lane jobs."""
        if job.priority == "batch" and job.reply_to is not None:
            return self._replies.put(job.reply_to, (job.id, encode(result)))
        return send_reply(self.broker, job.reply_to, result)

    async def _send_job(self, job: CompletionJob, pool: str) -> None:
        await self.broker.dispatch(pool, "interactive", encode(job), correlation_id=job.id)

    async def _send_batch(self, pool: str, jobs: list[Encoded]) -> None:
        body = encode_job_batch([job for _, job in jobs])
        await self.broker.dispatch(pool, "batch", body, correlation_id=jobs[0][0], batch=True)

    async def _reject_invalid(self, message: AbstractIncomingMessage, exc: InvalidMessage) -> None:
        """Answer a message that does not decode, or park it when nobody can be answered."""
        # An oversized body is not parsed even to salvage it: the producer's
        # AMQP properties (correlation id, reply_to) say where to answer.
        too_big = len(message.body) > self.config.router.max_job_bytes
        job_id, reply_to = (None, None) if too_big else salvage_envelope(message.body)
        reply_to = reply_to or message.reply_to
        job_id = job_id or message.correlation_id
        log.warning("invalid job", job_id=job_id, field=exc.field, reason=str(exc))
        if job_id is None or reply_to is None:
            await settle(message, requeue=False)  # dead-lettered by the queue's DLX
            return
        result = invalid_result(job_id, exc, bool(message.redelivered))
        await send_reply(self.broker, reply_to, result)
        await settle(message)


def _shielded(wait: Awaitable[None]) -> Awaitable[None]:
    """A batch's shared future must not be cancelled by one waiter giving up."""
    return asyncio.shield(wait) if isinstance(wait, asyncio.Future) else wait


def _exhausted(hop: NextHop) -> JobError:
    """The answer when nothing is left to try: the last failure, said so."""
    return job_error(
        hop.reason,
        f"every deployment this job may use failed; the last: {hop.message}",
        retryable=False,
    )


def invalid_result(job_id: str, exc: InvalidMessage, redelivered: bool) -> JobResult:
    """The answer to a job that does not decode; a repeat when its message
    came back (the first answer may already be out)."""
    return JobResult(
        job_id=job_id,
        status="error",
        error=exc.to_error(),
        timings=Timings(finished_at=time.time()),
        redelivered=redelivered,
    )
