"""The router process: admits submitted jobs and sends each to a worker pool.

It acks a submitted message (one job, or a batch of them) only after its
effect is safe: each job is confirmed on a pool's queue, or its error result
is confirmed on the reply queue, or it is parked on the dead queue. A crash
before that redelivers the message; jobs routed again are marked.

What happens to a decoded job (admission, routing, the batch lane's
packing) is `router/dispatch.py`, which the HTTP gateway shares; this module
is the AMQP service around it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable

import structlog
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection

from modelyard.batching import settle_all
from modelyard.broker import REPLAY_HEADER, Broker, Consumer, resent, settle
from modelyard.config import Config
from modelyard.metrics import ProcessMetrics
from modelyard.replies import send_reply
from modelyard.topology import ROUTER_INTERNAL_QUEUE, ROUTER_QUEUE
from router.dispatch import Dispatcher, shielded
from schemas.codec import InvalidMessage, decode_job, salvage_envelope, split_job_batch
from schemas.jobs import JOB_BATCH_TYPE, CompletionJob
from schemas.results import JobResult, Timings

log = structlog.get_logger("modelyard.router")


class Router:
    """Consumes `router.jobs` and `router.internal`; publishes to `modelyard.dispatch`."""

    def __init__(
        self,
        config: Config,
        connection: AbstractRobustConnection,
        metrics: ProcessMetrics | None = None,
    ) -> None:
        self.config = config
        self.connection = connection
        # While the database is away the router holds the messages it has
        # (at most `concurrency`) and waits; the rest wait in the broker.
        self.dispatcher = Dispatcher(config, connection, database_patience_s=None, metrics=metrics)
        self._consumer = Consumer(
            connection, ROUTER_QUEUE, self.handle, prefetch=config.router.concurrency
        )
        self._internal = Consumer(
            connection,
            ROUTER_INTERNAL_QUEUE,
            self.handle_internal,
            prefetch=config.router.concurrency,
        )

    @property
    def broker(self) -> Broker:
        """The router's broker facade."""
        return self.dispatcher.broker

    async def start(self) -> None:
        """Declare the topology, follow health reports, then start consuming."""
        await self.dispatcher.start()
        await self._internal.start()
        await self._consumer.start()
        log.info("router started", queue=ROUTER_QUEUE, concurrency=self.config.router.concurrency)

    async def stop(self) -> None:
        """Stop taking jobs, let those in flight finish, close the channel."""
        await asyncio.gather(self._consumer.stop(), self._internal.stop())
        await self.dispatcher.stop()

    async def handle(self, message: AbstractIncomingMessage) -> None:
        """A producer's message (`router.jobs`): admit, route and forward its
        job or jobs; every path ends in ack, or in a requeue when a publish
        failed. While the database is away, admission waits for it."""
        await self._handle(message, admitted=False)

    async def handle_internal(self, message: AbstractIncomingMessage) -> None:
        """Jobs modelyard sent itself (`router.internal`: retries, fallbacks,
        jobs that waited for a provider), admitted already: routed on."""
        replayed = bool((message.headers or {}).get(REPLAY_HEADER))
        await self._handle(message, admitted=not replayed, replay=replayed)

    async def _handle(
        self, message: AbstractIncomingMessage, *, admitted: bool, replay: bool = False
    ) -> None:
        if message.type == JOB_BATCH_TYPE:
            await self._handle_batch(message, admitted=admitted, replay=replay)
            return
        try:
            job = decode_job(message.body, self.config.router.max_job_bytes)
        except InvalidMessage as exc:
            await self._reject_invalid(message, exc)
            return
        if job.reply_to is None and message.reply_to:
            job.reply_to = message.reply_to
        waits = await self.dispatcher.take(
            [job], redelivered=resent(message), admitted=admitted, replay=replay
        )
        await settle_all(map(shielded, waits))
        await settle(message)

    async def _handle_batch(
        self, message: AbstractIncomingMessage, *, admitted: bool, replay: bool
    ) -> None:
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
        jobs: list[CompletionJob] = []
        waits: list[Awaitable[None]] = []
        for raw in raws:
            decoded = self._decode_raw(raw, message.reply_to, redelivered)
            if isinstance(decoded, CompletionJob):
                jobs.append(decoded)
            else:
                waits.append(decoded)
        waits += await self.dispatcher.take(
            jobs, redelivered=redelivered, admitted=admitted, replay=replay
        )
        # Jobs share the few outgoing batches they join: wait on each once.
        unique = {id(wait): wait for wait in waits}
        # A failure is raised once all have settled; the consumer's guard then
        # requeues the message, and jobs it had sent are marked when sent again.
        await settle_all(map(shielded, unique.values()))
        await settle(message)

    def _decode_raw(
        self, raw: bytes, reply_to: str | None, redelivered: bool
    ) -> CompletionJob | Awaitable[None]:
        """One job of a batch, or (when it does not decode) its answer to wait on."""
        try:
            job = decode_job(raw, self.config.router.max_job_bytes)
        except InvalidMessage as exc:
            job_id, own_reply_to = salvage_envelope(raw)
            reply_to = own_reply_to or reply_to
            log.warning("invalid job in batch", job_id=job_id, field=exc.field, reason=str(exc))
            if job_id is None or reply_to is None:
                return self.broker.dead_letter(raw, f"invalid job, nobody to tell: {exc}")
            result = invalid_result(job_id, exc, redelivered)
            return self.dispatcher.reply(reply_to, job_id, result)
        if job.reply_to is None:
            job.reply_to = reply_to
        return job

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
            # Parked by us rather than the queue's dead-letter exchange, so
            # the producer's key is removed from the copy that is kept.
            await self.broker.dead_letter(message.body, f"invalid job, nobody to tell: {exc}")
            await settle(message)
            return
        result = invalid_result(job_id, exc, bool(message.redelivered))
        await send_reply(self.dispatcher.broker, reply_to, result)
        await settle(message)


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
