"""The router process: admits submitted jobs and sends each to a worker pool.

It acks a submitted job only after its effect is safe: the job is confirmed
on a pool's queue, or its error result is confirmed on the reply queue, or it
is parked on the dead queue. A crash before that redelivers the job.
"""

from __future__ import annotations

import random
import time

import structlog
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractRobustConnection

from modelyard import broker
from modelyard.config import Config
from modelyard.replies import error_result, send_reply
from modelyard.topology import DISPATCH_EXCHANGE, ROUTER_QUEUE, build_topology
from modelyard.tracing import job_span
from router.routing import RouteTable, build_route_table
from schemas.codec import InvalidMessage, decode_job, encode, salvage_envelope
from schemas.errors import ErrorKind, job_error
from schemas.jobs import CompletionJob, Route
from schemas.results import JobResult, Timings

log = structlog.get_logger("modelyard.router")


class Router:
    """Consumes `router.jobs`; publishes to `modelyard.dispatch`."""

    def __init__(self, config: Config, connection: AbstractRobustConnection) -> None:
        self.config = config
        self.connection = connection
        self.routes: RouteTable = build_route_table(config)
        self.rng = random.Random()
        self._channel: AbstractChannel | None = None
        self._consumer = broker.Consumer(self.handle, log)

    async def start(self) -> None:
        """Declare the topology and start consuming."""
        self._channel = channel = await broker.open_channel(
            self.connection, prefetch=self.config.router.concurrency
        )
        queues = await broker.declare(channel, build_topology(self.config.pool_names()))
        self._dispatch = await channel.get_exchange(DISPATCH_EXCHANGE)
        await self._consumer.start(queues[ROUTER_QUEUE])
        log.info("router started", queue=ROUTER_QUEUE, concurrency=self.config.router.concurrency)

    async def stop(self) -> None:
        """Stop taking jobs, let those in flight finish, close the channel."""
        await self._consumer.stop()
        if self._channel is not None and not self._channel.is_closed:
            await self._channel.close()

    async def handle(self, message: AbstractIncomingMessage) -> None:
        """Admit, route and forward one job; every path ends in ack or dead letter."""
        assert self._channel is not None
        try:
            job = decode_job(message.body, self.config.router.max_job_bytes)
        except InvalidMessage as exc:
            await self._reject_invalid(message, exc)
            return
        if job.reply_to is None and message.reply_to:
            job.reply_to = message.reply_to
        with (
            structlog.contextvars.bound_contextvars(
                job_id=job.id, trace_id=job.trace.trace_id() if job.trace else None
            ),
            job_span(job, ROUTER_QUEUE),
        ):
            await self._route(job, redelivered=bool(message.redelivered))
        await message.ack()

    async def _route(self, job: CompletionJob, *, redelivered: bool) -> None:
        assert self._channel is not None
        now = time.time()
        if job.deadline_passed(now):
            error = job_error(ErrorKind.DEADLINE_EXCEEDED, "deadline passed before routing")
            await send_reply(
                self._channel, job.reply_to, error_result(job, error, redelivered=redelivered)
            )
            return
        group = self.routes.resolve(job.request.model)
        if group is None:
            error = job_error(
                ErrorKind.UNKNOWN_MODEL,
                f"no model or alias named {job.request.model!r}",
                field="$.request.model",
            )
            await send_reply(
                self._channel, job.reply_to, error_result(job, error, redelivered=redelivered)
            )
            return
        deployment = self.routes.choose(group, self.rng)
        job.route = Route(deployment=deployment.name, pool=deployment.pool, routed_at=now)
        # Mandatory: a pool queue that does not exist must fail the publish
        # (the job is then requeued), not drop the job.
        await self._dispatch.publish(
            broker.message(encode(job), correlation_id=job.id, reply_to=job.reply_to),
            routing_key=deployment.pool,
            mandatory=True,
        )
        log.debug("routed", deployment=deployment.name, pool=deployment.pool)

    async def _reject_invalid(self, message: AbstractIncomingMessage, exc: InvalidMessage) -> None:
        """Answer a job that does not decode, or park it when nobody can be answered."""
        assert self._channel is not None
        # An oversized body is not parsed even to salvage it: the producer's
        # AMQP properties (correlation id, reply_to) say where to answer.
        too_big = len(message.body) > self.config.router.max_job_bytes
        job_id, reply_to = (None, None) if too_big else salvage_envelope(message.body)
        reply_to = reply_to or message.reply_to
        job_id = job_id or message.correlation_id
        log.warning("invalid job", job_id=job_id, field=exc.field, reason=str(exc))
        if job_id is None or reply_to is None:
            await message.reject(requeue=False)  # dead-lettered by the queue's DLX
            return
        result = JobResult(
            job_id=job_id,
            status="error",
            error=exc.to_error(),
            timings=Timings(finished_at=time.time()),
        )
        await send_reply(self._channel, reply_to, result)
        await message.ack()
