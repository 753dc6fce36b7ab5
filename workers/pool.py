"""A worker pool process: consumes one pool's queue and calls providers.

For each job: call the provider through its adapter, publish the result to
the job's reply queue and (for a billed call) a cost event to the ledger,
await both confirms, then ack. A crash before the ack redelivers the job; the
repeated result is marked `redelivered` so clients can drop it.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime

import aiohttp
import structlog
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractRobustConnection

from modelyard import broker
from modelyard.config import Config, Deployment
from modelyard.replies import error_result, send_reply, timings_for
from modelyard.topology import COSTS_EXCHANGE, build_topology, worker_queue
from router.service import deadline_passed
from schemas.codec import InvalidMessage, decode_job, encode
from schemas.costs import CostEvent
from schemas.errors import ErrorKind, JobError, job_error
from schemas.jobs import Attempt, CompletionJob
from schemas.results import JobResult
from workers import transport
from workers.costs import CostPublisher
from workers.pricing import PriceCard, cost_of, price_card
from workers.providers import PROVIDERS, AdapterError, ProviderReply

log = structlog.get_logger("modelyard.worker")


def cost_event(
    job: CompletionJob, deployment: Deployment, reply: ProviderReply, card: PriceCard, latency_ms: float
) -> CostEvent:
    """The ledger entry for one billed call. Never carries prompts or keys."""
    meta = job.metadata
    return CostEvent(
        event_id=uuid.uuid4(),
        job_id=job.id,
        occurred_at=datetime.now(UTC),
        provider=deployment.provider,
        deployment=deployment.name,
        provider_model=reply.completion.model or deployment.model,
        model=job.request.model,
        usage=reply.usage,
        cost=cost_of(reply.usage, card),
        price_source=card.source,
        latency_ms=round(latency_ms, 3),
        provider_request_id=reply.request_id,
        key_id=job.key_id,
        team=meta.team,
        project=meta.project,
        user=meta.user,
        batch_id=meta.batch_id,
        custom_id=meta.custom_id,
        raw_usage=reply.raw_usage,
    )


class Worker:
    """Consumes `worker.<pool>` with at most `concurrency` jobs in flight."""

    def __init__(
        self,
        config: Config,
        pool: str,
        connection: AbstractRobustConnection,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.config = config
        self.pool = pool
        self.connection = connection
        self.concurrency = config.pool(pool).concurrency
        self.deployments = {n: d for n, d in config.deployments.items() if d.pool == pool}
        env = os.environ if env is None else env
        # Keys are read once, from this process's environment, and kept here.
        self._keys = {
            n: env.get(d.api_key_env) if d.api_key_env else None for n, d in self.deployments.items()
        }
        self._prices = {n: price_card(d) for n, d in self.deployments.items()}
        self._channel: AbstractChannel | None = None
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        """Declare the topology and start consuming this pool's queue."""
        for name, card in self._prices.items():
            if card.source == "unknown":
                log.warning("no price known; cost events will be flagged", deployment=name)
        self._session = transport.new_session(self.concurrency)
        self._channel = channel = await broker.open_channel(self.connection, prefetch=self.concurrency)
        queues = await broker.declare(channel, build_topology(self.config.pool_names()))
        self._costs = CostPublisher(await channel.get_exchange(COSTS_EXCHANGE))
        await queues[worker_queue(self.pool)].consume(broker.guarded(self.handle, log))
        log.info("worker started", pool=self.pool, concurrency=self.concurrency)

    async def stop(self) -> None:
        """Close the channel (unacked jobs return to the queue) and the HTTP pool."""
        if self._channel is not None and not self._channel.is_closed:
            await self._channel.close()
        if self._session is not None:
            await self._session.close()

    async def handle(self, message: AbstractIncomingMessage) -> None:
        """Run one job to a confirmed result, then ack."""
        try:
            job = decode_job(message.body)
        except InvalidMessage as exc:
            # The router validated it: this is corruption, not a producer error.
            log.error("undecodable dispatched job", reason=str(exc))
            await message.reject(requeue=False)
            return
        with structlog.contextvars.bound_contextvars(
            job_id=job.id, trace_id=job.trace.trace_id() if job.trace else None
        ):
            result, cost = await self._run(job, redelivered=bool(message.redelivered))
            assert self._channel is not None
            publishes = [send_reply(self._channel, job.reply_to, result)]
            if cost is not None:
                publishes.append(self._costs.publish(cost))
            await asyncio.gather(*publishes)
        await message.ack()

    async def _run(self, job: CompletionJob, *, redelivered: bool) -> tuple[JobResult, CostEvent | None]:
        """Call the provider for `job`; the result, and a cost event if billed."""
        deployment = self.deployments.get(job.route.deployment if job.route else "")
        if deployment is None:
            error = job_error(ErrorKind.UNKNOWN_MODEL, f"deployment not served by pool {self.pool!r}")
            return error_result(job, error, redelivered=redelivered), None
        if deadline_passed(job, time.time()):
            error = job_error(ErrorKind.DEADLINE_EXCEEDED, "deadline passed before the provider call")
            return error_result(job, error, redelivered=redelivered), None
        started = time.time()
        outcome = await self._call(job, deployment)
        finished = time.time()
        ok = isinstance(outcome, ProviderReply)
        job.attempts.append(
            Attempt(
                deployment=deployment.name,
                provider=deployment.provider,
                started_at=started,
                finished_at=finished,
                outcome="ok" if ok else "error",
                error=None if isinstance(outcome, ProviderReply) else outcome.kind,
                provider_request_id=outcome.request_id if isinstance(outcome, ProviderReply) else None,
            )
        )
        if isinstance(outcome, JobError):
            log.info("provider call failed", deployment=deployment.name, error=outcome.kind)
            return error_result(job, outcome, redelivered=redelivered), None
        event = cost_event(job, deployment, outcome, self._prices[deployment.name], (finished - started) * 1000)
        result = JobResult(
            job_id=job.id,
            status="ok",
            response=outcome.completion,
            usage=outcome.usage,
            cost=event.cost,
            model=job.request.model,
            provider=deployment.provider,
            deployment=deployment.name,
            metadata=job.metadata,
            attempts=job.attempts,
            timings=timings_for(job, started),
            redelivered=redelivered,
        )
        return result, event

    async def _call(self, job: CompletionJob, deployment: Deployment) -> ProviderReply | JobError:
        adapter = PROVIDERS[deployment.provider]
        try:
            request = adapter.build_request(job.request, deployment, self._keys[deployment.name])
        except AdapterError as exc:
            return exc.error
        assert self._session is not None
        response = await transport.send(self._session, request, deployment.timeout_s)
        if isinstance(response, JobError):
            return response
        return adapter.parse_response(response)
