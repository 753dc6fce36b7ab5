"""A worker pool process: consumes one pool's queues and calls providers.

For each job: call the provider through its adapter, publish the result to
the job's reply queue and (for a billed call) a cost event to the ledger,
await both confirms, then ack. A crash before the ack redelivers the job; the
repeated result is marked `redelivered` so clients can drop it.

Interactive jobs arrive one per message and are answered at once. Batch-lane
jobs arrive many per message, and their results leave many per message; the
message is acked when all of its jobs are answered, so a crash re-runs at
most the batches the worker held (enough to fill its slots).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Literal

import aiohttp
import msgspec
import structlog
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection

from modelyard.broker import Broker, Consumer, PublishFailed, resent, settle
from modelyard.config import Config, ConfigError, Deployment
from modelyard.database import Database
from modelyard.handoffs import handoff_batcher
from modelyard.metrics import ProcessMetrics, WorkerMetrics
from modelyard.prices import PriceCard, cost_of, estimated_tokens, price_card
from modelyard.replies import (
    error_result,
    final_failure,
    kept_for_replay,
    reply_batcher,
    route_notes,
    send_reply,
    timings_for,
)
from modelyard.topology import build_topology, dispatch_key, worker_queue
from modelyard.tracing import job_span
from router.routing import build_route_table, current_model
from schemas.codec import InvalidMessage, decode_job, decode_job_batch, encode, encode_job_batch
from schemas.costs import CostEvent
from schemas.errors import ErrorKind, JobError, job_error
from schemas.jobs import JOB_BATCH_TYPE, Attempt, CompletionJob, Lane, NextHop
from schemas.results import JobResult, RateLimits, StreamChunk, Usage
from workers import transport
from workers.answers import Answers
from workers.claims import Claims, attempt_key
from workers.concurrency import ConcurrencyLease
from workers.costs import CostPublisher
from workers.health import HealthRecorder
from workers.lanes import Slots, SlotsClosed, batch_prefetch
from workers.providers import (
    PROVIDERS,
    Adapter,
    AdapterError,
    HttpRequest,
    HttpResponse,
    ProviderReply,
)
from workers.ratelimit import DeploymentLimiter, exhausted_reset_s, refill_wait
from workers.retry import GiveUp, Retry, decide

log = structlog.get_logger("modelyard.worker")

# Urgent health reports (a provider asked to be left alone) go out at most
# this often, so a burst of 429s costs the broker one report, not hundreds.
MIN_REPORT_GAP_S = 0.05
# How long a failed batch-lane job waits for others going the same way.
HANDOFF_LINGER_S = 0.05


class Billed(msgspec.Struct, kw_only=True):
    """What a provider call used, as far as we know: the basis of a cost event."""

    usage: Usage
    raw_usage: dict[str, Any]
    provider_model: str
    request_id: str | None
    status: Literal["ok", "error"] = "ok"


def cost_event(
    job: CompletionJob, deployment: Deployment, billed: Billed, card: PriceCard, latency_ms: float
) -> CostEvent:
    """The ledger entry for one billed call. Never carries prompts or keys."""
    meta = job.metadata
    return CostEvent(
        event_id=uuid.uuid4(),
        job_id=job.id,
        occurred_at=datetime.now(UTC),
        provider=deployment.provider,
        deployment=deployment.name,
        provider_model=billed.provider_model,
        model=job.request.model,
        usage=billed.usage,
        cost=cost_of(billed.usage, card),
        price_source=card.source,
        status=billed.status,
        latency_ms=round(latency_ms, 3),
        provider_request_id=billed.request_id,
        key_id=job.key_id,
        reservation=job.reservation,
        team=meta.team,
        project=meta.project,
        user=meta.user,
        batch_id=meta.batch_id,
        custom_id=meta.custom_id,
        raw_usage=billed.raw_usage,
    )


def billed_reply(reply: ProviderReply, deployment: Deployment) -> Billed:
    """A successful call's usage, for the ledger."""
    return Billed(
        usage=reply.usage,
        raw_usage=reply.raw_usage,
        provider_model=reply.completion.model or deployment.model,
        request_id=reply.request_id,
    )


def _key(deployment: Deployment, env: Mapping[str, str]) -> str | None:
    """A deployment's API key from the environment; a named but unset
    variable stops the worker at start rather than failing every job with 401."""
    if not deployment.api_key_env:
        return None
    key = env.get(deployment.api_key_env)
    if not key:
        raise ConfigError(
            f"deployments.{deployment.name}.api_key_env: {deployment.api_key_env} is not set "
            "in this worker's environment"
        )
    return key


# How long a cost event waits for others to share its message: one message
# per dozen events at a few hundred calls/s, for the broker and the ledger.
COST_LINGER_S = 0.02


class Worker:
    """Consumes a pool's two lanes (`worker.<pool>` and `worker.<pool>.batch`)
    with at most `concurrency` provider calls in flight between them."""

    def __init__(
        self,
        config: Config,
        pool: str,
        connection: AbstractRobustConnection,
        env: Mapping[str, str] | None = None,
        metrics: ProcessMetrics | None = None,
    ) -> None:
        self.config = config
        self.pool = pool
        self.connection = connection
        self.concurrency = config.pool(pool).concurrency
        self.deployments = {n: d for n, d in config.deployments.items() if d.pool == pool}
        self.routes = build_route_table(config)
        env = os.environ if env is None else env
        # Keys are read once, from this process's environment, and kept here.
        self._keys = {n: _key(d, env) for n, d in self.deployments.items()}
        self._prices = {n: price_card(d) for n, d in self.deployments.items()}
        self._slots = Slots(self.concurrency)
        self.metrics = (metrics or ProcessMetrics()).part(WorkerMetrics)
        self.metrics.in_flight.labels(pool).set_function(lambda: self._slots.in_use)
        self._resizing = self._stopping = False
        self._background: set[asyncio.Future[None]] = set()
        self._session: aiohttp.ClientSession | None = None
        self.broker = Broker(connection)
        self._answers = Answers()
        self._claims = Claims(config.database_url) if config.database_url else None
        self._db = Database(config.database_url)
        self._limits = {
            n: DeploymentLimiter(self._db, n, d.rpm, d.tpm)
            for n, d in self.deployments.items()
            if d.rpm is not None or d.tpm is not None
        }
        self.instance = uuid.uuid4().hex[:16]
        self._caps = {
            n: ConcurrencyLease(self._db, n, self.instance, d.max_concurrent)
            for n, d in self.deployments.items()
            if d.max_concurrent is not None
        }
        self.health = HealthRecorder(
            self.instance, pool, list(self.deployments), config.health.window_s
        )
        self._reporting: asyncio.Task[None] | None = None
        # Interactive jobs come one per message, up to the pool's concurrency.
        self._consumer = Consumer(
            connection, worker_queue(pool), self.handle, prefetch=self.concurrency
        )
        # Batch jobs come many per message: enough messages to fill every
        # slot. Full batches are assumed until the sizes seen say otherwise.
        self._batch_size = float(config.batch_lane.max_jobs)
        self._batch_prefetch = batch_prefetch(self.concurrency, self._batch_size)
        self._batch_consumer = Consumer(
            connection,
            worker_queue(pool, "batch"),
            self.handle,
            prefetch=self._batch_prefetch,
        )

    async def start(self) -> None:
        """Declare the topology and start consuming this pool's two lanes."""
        for name, card in self._prices.items():
            if card.source == "unknown":
                log.warning("no price known; cost events will be flagged", deployment=name)
        self._session = transport.new_session(self.concurrency)
        await self.broker.declare(build_topology(self.config.pool_names()))
        # Cost events wait up to COST_LINGER_S for company, or until half
        # the slots wait on them (each holds its slot until confirmed).
        self._costs = CostPublisher(
            self.broker, max_batch=max(1, self.concurrency // 2), linger_s=COST_LINGER_S
        )
        lane = self.config.batch_lane
        self._replies = reply_batcher(
            self.broker, max_items=lane.max_jobs, linger_s=lane.linger_ms / 1000
        )
        # Batch-lane jobs sent on travel together too, one message per step
        # of the retry ladder (0: straight back to the router to fall back),
        # waiting longer for company: failures trickle in far slower than jobs.
        self._handoffs = handoff_batcher(
            self.broker,
            max_items=lane.max_jobs,
            linger_s=max(lane.linger_ms / 1000, HANDOFF_LINGER_S),
        )
        await self._consumer.start()
        await self._batch_consumer.start()
        self._reporting = asyncio.create_task(self._report_health())
        for cap in self._caps.values():
            cap.start()
        log.info("worker started", pool=self.pool, concurrency=self.concurrency)

    async def _report_health(self) -> None:
        """Publish this process's view of its deployments every
        `report_every_ms`, and at once when a provider asks to be left alone.
        Reports are advice: one that cannot be sent is skipped."""
        every = self.config.health.report_every_ms / 1000
        queues = [worker_queue(self.pool, lane) for lane in ("interactive", "batch")]
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.health.urgent.wait(), every)
            self.health.urgent.clear()
            try:
                async with asyncio.timeout(max(every, 1.0)):
                    queued = await self.broker.waiting(queues)
                    report = self.health.report(time.time(), queued or 0)
                    await self.broker.health(encode(report))
            except (TimeoutError, PublishFailed) as exc:
                log.debug("health report skipped", reason=f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(MIN_REPORT_GAP_S)

    async def stop(self) -> None:
        """Stop taking jobs, let provider calls in flight finish, then close.

        Jobs still waiting for a slot do not start: their messages go back to
        the queue for another worker, rather than starting provider calls the
        grace period might cut off after the provider has billed them."""
        self._stopping = True  # no consumer swap may race the cancel below
        if self._reporting is not None:
            self._reporting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reporting
        if self._background:  # a swap waits for the broker if it is away: not forever
            await asyncio.wait(self._background, timeout=5)
        await asyncio.gather(self._consumer.cancel(), self._batch_consumer.cancel())
        self._slots.close()
        for limiter in self._limits.values():
            limiter.close()
        await asyncio.gather(*(cap.close() for cap in self._caps.values()))
        await asyncio.gather(self._consumer.drain(), self._batch_consumer.drain())
        await asyncio.gather(*(cap.release() for cap in self._caps.values()))
        await asyncio.gather(self._consumer.close(), self._batch_consumer.close())
        await self.broker.close()
        if self._claims is not None:
            await self._claims.close()
        await self._db.close()
        if self._session is not None:
            await self._session.close()

    async def handle(self, message: AbstractIncomingMessage) -> None:
        """Run a message's jobs (one interactive job, or a batch side by side)
        to confirmed results, then ack. A failed publish requeues the message:
        its jobs run again, and their repeated results are marked. When the
        worker is stopping, jobs that have not started go back to the queue."""
        lane: Lane
        try:
            if message.type == JOB_BATCH_TYPE:
                jobs, lane = decode_job_batch(message.body).jobs, "batch"
            else:
                jobs, lane = [decode_job(message.body)], "interactive"
        except InvalidMessage as exc:
            # The router validated it: this is corruption, not a producer error.
            log.error("undecodable dispatched message", reason=str(exc))
            await settle(message, requeue=False)
            return
        redelivered = bool(message.redelivered)
        copy = resent(message)
        # A batch on the interactive queue holds retried or fallen-back jobs:
        # they take slots ahead of the batch backlog, and their (small) size
        # says nothing about the batch lane's messages.
        queue: Lane = (
            "batch" if message.routing_key == dispatch_key(self.pool, "batch") else "interactive"
        )
        if lane == "batch" and queue == "batch":
            self._observe_batch(len(jobs))
            jobs = await self._unclaimed(jobs, resent_copy=copy and not redelivered)
        # Which attempt of each job this message carries (a retried job comes
        # back with its history): the key of a repeat of this very attempt.
        keys = [attempt_key(job) for job in jobs]
        outcomes = await asyncio.gather(
            *(
                self._process(job, key, lane, queue, redelivered=redelivered, copy=copy)
                for job, key in zip(jobs, keys, strict=True)
            ),
            return_exceptions=True,
        )
        if repeats := outcomes.count(False):
            log.warning("repeats of jobs this worker answered not run again", jobs=repeats)
        failures = [o for o in outcomes if isinstance(o, BaseException)]
        if errors := [f for f in failures if not isinstance(f, SlotsClosed)]:
            raise errors[0]  # requeued by the consumer's guard; repeats are marked
        refused = [job for job, o in zip(jobs, outcomes, strict=True) if isinstance(o, SlotsClosed)]
        if refused and len(refused) == len(jobs):
            log.info("stopping: message returned to the queue", jobs=len(jobs))
            await settle(message, requeue=True)
            return
        if refused:
            # The others are answered (and billed): hand back only the jobs
            # that never started, rather than running the answered ones again.
            if self._claims is not None and lane == "batch":
                await self._claims.release(refused)
            await self._hand_back(refused, redelivered=redelivered)
        if await settle(message):
            self._answers.forget(keys)
        else:
            # The channel went away (a broker restart): the broker will hand
            # this message out again; its answered jobs are not run again.
            log.info("ack lost with the channel; answers kept for the redelivery", jobs=len(jobs))

    async def _unclaimed(
        self, jobs: list[CompletionJob], *, resent_copy: bool
    ) -> list[CompletionJob]:
        """The batch-lane jobs to run: those a restarted router dispatched a
        second time, or a message sent again after a lost confirm, are left
        out when another copy claimed them (that copy answers them;
        `workers/claims.py`)."""
        if self._claims is None:
            return jobs
        skip = await self._claims.repeats(jobs, resent=resent_copy)
        if not skip:
            return jobs
        log.warning("router repeats of claimed jobs not run", jobs=len(skip))
        return [job for job in jobs if job.id not in skip]

    async def _hand_back(self, jobs: list[CompletionJob], *, redelivered: bool) -> None:
        """Put jobs that never started back on the pool's batch queue, as a
        new message (confirmed before the old one is acked)."""
        for job in jobs:
            job.redelivered = job.redelivered or redelivered
        body = encode_job_batch([encode(job) for job in jobs])
        log.info("stopping: jobs not started handed back", jobs=len(jobs))
        await self.broker.dispatch(self.pool, "batch", body, correlation_id=jobs[0].id, batch=True)

    def _observe_batch(self, jobs: int) -> None:
        """Follow the size of arriving batches, and hold more (or fewer) batch
        messages when it has changed twofold: a trickle of one-job batches
        must still fill every slot, full batches must not pile up in memory."""
        self._batch_size = (self._batch_size + jobs) / 2
        wanted = batch_prefetch(self.concurrency, self._batch_size)
        current = self._batch_prefetch
        if self._resizing or self._stopping or current // 2 < wanted < current * 2:
            return
        self._resizing = True
        task = asyncio.ensure_future(self._batch_consumer.resize(wanted))
        self._background.add(task)
        task.add_done_callback(lambda t: self._resized(t, wanted))

    def _resized(self, task: asyncio.Future[None], prefetch: int) -> None:
        self._background.discard(task)
        self._resizing = False
        if task.cancelled():
            return
        if (error := task.exception()) is not None:
            log.warning("batch prefetch not changed", reason=str(error))
            return
        self._batch_prefetch = prefetch
        log.debug("batch prefetch changed", prefetch=prefetch)

    async def _process(
        self,
        job: CompletionJob,
        key: str,
        lane: Lane,
        queue: Lane,
        *,
        redelivered: bool,
        copy: bool,
    ) -> bool:
        """Call the provider in one of the pool's slots (taken with the
        priority of the `queue` the job came from); return once the result
        (and the cost event, if billed) are confirmed, batched with others
        for a batch-`lane` job. False when the job was not run: a possible
        `copy` of one this process answered."""
        redelivered = redelivered or job.redelivered
        received = time.time()
        with (
            structlog.contextvars.bound_contextvars(
                job_id=job.id, trace_id=job.trace.trace_id() if job.trace else None
            ),
            job_span(job, worker_queue(self.pool, queue)) as span,
        ):
            # The slot is held until the cost event is confirmed: a call the
            # provider billed but the ledger may not hear of (this process
            # dying before the confirm) is then always one of at most
            # `concurrency`, which bounds what a crash can leave unrecorded.
            async with self._answers.once(key, repeat=copy or job.redelivered) as first:
                if not first:
                    # This process answered this job already (its message came
                    # back after a reconnect): not called, not answered again.
                    return False
                async with self._slots.take(queue):
                    result, cost = await self._run_safely(job, redelivered=redelivered)
                    if isinstance(result, JobResult):
                        result.timings.received_at = received
                        span.set_attribute("gen_ai.provider.name", result.provider or "")
                        if result.error is not None:
                            span.set_attribute("error.type", result.error.kind.value)
                    await self._publish(job, lane, result, cost)
                    return True

    async def _hand_on(self, handoff: Handoff, lane: Lane) -> None:
        """A job to wait in the broker's retry ladder, or straight back to the
        router to fall back: alone for an interactive job, batched with
        others going the same way for a batch-lane job."""
        job, step = handoff.job, handoff.step_ms or 0
        if lane == "batch":
            await self._handoffs.add(step, (job.id, encode(job)))
        elif step:
            await self.broker.defer(step, encode(job), correlation_id=job.id)
        else:
            await self.broker.resubmit(encode(job), correlation_id=job.id)

    async def _publish(
        self, job: CompletionJob, lane: Lane, result: JobResult | Handoff, cost: CostEvent | None
    ) -> None:
        """The result to the producer and the cost event to the ledger, both
        confirmed (sent again after a reconnect until they are)."""
        if isinstance(result, Handoff):
            publishes = [self._hand_on(result, lane)]
        elif lane == "batch" and job.reply_to is not None:
            publishes = [self._replies.add(job.reply_to, (job.id, encode(result)))]
        else:
            publishes = [send_reply(self.broker, job.reply_to, result)]
        if (
            isinstance(result, JobResult)
            and result.error is not None
            and kept_for_replay(job, result.error)
        ):
            body = encode(job)
            publishes.append(
                self.broker.dead_letter(body, final_failure(result.error), admitted=True)
            )
        if isinstance(result, JobResult) and job.reservation is not None:
            # The job ends here: its budget reservations go, with its last
            # cost in the same ledger transaction when it was billed.
            if cost is not None:
                cost.final = True
            else:
                publishes.append(self._costs.release(job.reservation))
        if cost is not None:
            publishes.append(self._costs.publish(cost))
        await asyncio.gather(*publishes)

    async def _run_safely(
        self, job: CompletionJob, *, redelivered: bool
    ) -> tuple[JobResult | Handoff, CostEvent | None]:
        """`_run`, with a bug in translation or transport answered as a
        `server_error` result instead of requeueing the job to fail (and
        maybe bill) again and again until it is dead-lettered unanswered."""
        try:
            result, cost = await self._run(job, redelivered=redelivered)
        except SlotsClosed:
            raise  # stopping before the call: the job goes back to the queue
        except Exception as exc:
            log.exception("job failed inside the worker")
            error = job_error(
                ErrorKind.SERVER_ERROR, f"modelyard worker error: {type(exc).__name__}"
            )
            return error_result(job, error, redelivered=redelivered), None
        return result, cost

    def _scrubbed(self, error: JobError) -> JobError:
        """The error with this pool's keys removed from every string a provider supplied."""
        error.message = self._scrub(error.message)
        if error.provider_code is not None:
            error.provider_code = self._scrub(error.provider_code)
        return error

    def _scrub(self, text: str) -> str:
        """Remove this pool's API keys from provider-supplied text: a proxy or
        compatible server may echo a key back in an error body."""
        for key in self._keys.values():
            if key and key in text:
                text = text.replace(key, "[redacted]")
        return text

    async def _made(
        self, job: CompletionJob, deployment: Deployment, *, redelivered: bool, started: float
    ) -> Call:
        """The provider call, counted in this worker's health report."""
        call = Call(outcome=job_error(ErrorKind.SERVER_ERROR, "the call did not finish"))
        try:
            if job.request.stream:
                call = await self._stream(job, deployment, redelivered=redelivered)
            else:
                call = await self._call(job, deployment)
        finally:
            finished = time.time()
            self.health.finished(
                deployment.name,
                now=finished,
                error=call.outcome if isinstance(call.outcome, JobError) else None,
                latency_ms=(finished - started) * 1000,
                limits=call.rate_limits,
            )
        return call

    async def _cleared(
        self, job: CompletionJob, deployment: Deployment, limiter: DeploymentLimiter | None
    ) -> JobError | None:
        """Why the call must not be made (its deadline passed, its budget
        reservation could lapse), after waiting for the deployment's rate
        limit; None when it may go ahead."""
        if job.deadline_passed(time.time()):
            return job_error(
                ErrorKind.DEADLINE_EXCEEDED, "deadline passed before the provider call"
            )
        if (late := _reservation_too_old(job, deployment)) is not None:
            return late
        if limiter is not None:
            tokens = sum(estimated_tokens(job.request))
            if limiter.tpm is not None and tokens > limiter.tpm:
                return job_error(
                    ErrorKind.RATE_LIMITED,
                    f"the job needs about {tokens} tokens, more than {deployment.name}'s "
                    f"whole minute ({limiter.tpm} tpm); it can never run there",
                    retryable=False,
                )
            await limiter.acquire(tokens)
            if job.deadline_passed(time.time()):
                return job_error(
                    ErrorKind.DEADLINE_EXCEEDED,
                    f"deadline passed while waiting for {deployment.name}'s rate limit",
                )
        return None

    async def _run(
        self, job: CompletionJob, *, redelivered: bool
    ) -> tuple[JobResult | Handoff, CostEvent | None]:
        """Call the provider for `job`; the result (or, after a failure worth
        another try, where the job goes next), and a cost event if billed."""
        deployment = self.deployments.get(job.route.deployment if job.route else "")
        if deployment is None:
            error = job_error(
                ErrorKind.UNKNOWN_MODEL, f"deployment not served by pool {self.pool!r}"
            )
            return error_result(job, error, redelivered=redelivered), None
        limiter = self._limits.get(deployment.name)
        cap = self._caps.get(deployment.name)
        # The concurrency slot first, then the minute's capacity: capacity
        # is spent in the bucket that counted it, never after a long wait.
        async with cap.slot() if cap is not None else contextlib.nullcontext():
            if (refusal := await self._cleared(job, deployment, limiter)) is not None:
                return error_result(job, refusal, redelivered=redelivered), None
            started = time.time()
            self.health.started(deployment.name)
            call = await self._made(job, deployment, redelivered=redelivered, started=started)
        finished = time.time()
        outcome, billed = call.outcome, call.billed
        if (
            isinstance(outcome, JobError)
            and outcome.kind == ErrorKind.RATE_LIMITED
            and outcome.retry_after_s is None
        ):
            # No retry-after: what the rate-limit headers say it takes to
            # have room for this call again is what it asked.
            tokens = sum(estimated_tokens(job.request))
            outcome.retry_after_s = exhausted_reset_s(call.rate_limits, tokens)
        if limiter is not None:  # the provider's own signals slow a limited deployment down
            if isinstance(outcome, JobError) and outcome.kind == ErrorKind.RATE_LIMITED:
                limiter.slow_down(outcome.retry_after_s or 0.0)
            limiter.slow_down(refill_wait(call.rate_limits) or 0.0)
        card = self._prices[deployment.name]
        latency_ms = (finished - started) * 1000
        event = None if billed is None else cost_event(job, deployment, billed, card, latency_ms)
        attempt = _attempt(deployment, started, finished, outcome, billed)
        attempt.model = current_model(job)
        attempt.cost = event.cost if event is not None else None
        job.attempts.append(attempt)
        self._count(deployment.name, finished - started, outcome, event)
        if isinstance(outcome, JobError):
            outcome = self._scrubbed(outcome)
            log.info("provider call failed", deployment=deployment.name, error=outcome.kind)
            if (handoff := self._next_step(job, outcome, streamed=call.streamed)) is not None:
                self.metrics.handed_on.labels(deployment.name, outcome.kind.value).inc()
                return handoff, event
            result = error_result(job, outcome, redelivered=redelivered)
            result.rate_limits = call.rate_limits
            if billed is not None and event is not None:  # a stream that failed midway
                result.usage, result.cost = billed.usage, event.cost
            return result, event
        assert event is not None
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
            rate_limits=call.rate_limits,
            warnings=[
                *route_notes(job),
                *(
                    f"{deployment.provider} has no equivalent for `{name}`; it was left out"
                    for name in PROVIDERS[deployment.provider].ignored(job.request, deployment)
                ),
            ],
        )
        return result, event

    def _count(
        self, deployment: str, took_s: float, outcome: object, event: CostEvent | None
    ) -> None:
        """A provider call in the metrics: its outcome, time, tokens and cost."""
        kind = outcome.kind.value if isinstance(outcome, JobError) else "ok"
        self.metrics.calls.labels(deployment, kind).inc()
        self.metrics.latency.labels(deployment).observe(took_s)
        if event is not None:
            self.metrics.tokens.labels(deployment, "input").inc(event.usage.input_tokens)
            self.metrics.tokens.labels(deployment, "output").inc(event.usage.output_tokens)
            self.metrics.cost.labels(deployment).inc(float(event.cost or 0))

    def _next_step(self, job: CompletionJob, error: JobError, *, streamed: bool) -> Handoff | None:
        """Where a failed job goes next (`workers/retry.py` decides): back
        to the router after a delay in the broker, or at once to fall back;
        None to answer it with its error, which the decision may have
        replaced (a retry that would pass the deadline)."""
        group = self.routes.resolve(current_model(job))  # its retry policy applies
        if group is None:
            return None
        own = job.fallbacks if self.config.allow_job_fallbacks else None
        left = self.routes.untried(job, error.kind, own)
        failed = job.attempts[-1].deployment
        decision = decide(
            error,
            job.attempts,
            group.retry,
            deadline=job.deadline,
            now=time.time(),
            targets_left=left is not None,
            sibling_left=left is not None
            and any(t.deployment == failed for t in left[0].deployments),
            streamed=streamed,
        )
        if isinstance(decision, GiveUp):
            if decision.error is not error:
                error.kind, error.message = decision.error.kind, decision.error.message
                error.retryable = decision.error.retryable
            return None
        retry = isinstance(decision, Retry)
        job.next_hop = NextHop(
            reason=error.kind,
            deployment=job.attempts[-1].deployment,
            fallback=not retry,
            message=f"{error.kind.value}: {error.message}",
        )
        step = decision.step_ms if isinstance(decision, Retry) else None
        log.info("job sent on", retry_in_ms=step, fallback=not retry, reason=error.kind)
        return Handoff(job=job, step_ms=step)

    def _prepare(
        self, job: CompletionJob, deployment: Deployment
    ) -> tuple[Adapter, HttpRequest] | JobError:
        adapter = PROVIDERS[deployment.provider]
        try:
            return adapter, adapter.build_request(
                job.request, deployment, self._keys[deployment.name]
            )
        except AdapterError as exc:
            return exc.error

    async def _call(self, job: CompletionJob, deployment: Deployment) -> Call:
        prepared = self._prepare(job, deployment)
        if isinstance(prepared, JobError):
            return Call(outcome=prepared)
        adapter, request = prepared
        assert self._session is not None
        response = await transport.send(self._session, request, deployment.timeout_s)
        if isinstance(response, JobError):
            return Call(outcome=response)
        return answered(adapter, response, deployment)

    async def _stream(
        self, job: CompletionJob, deployment: Deployment, *, redelivered: bool
    ) -> Call:
        """Relay a streamed answer as ordered chunks; the final reply comes back."""
        prepared = self._prepare(job, deployment)
        if isinstance(prepared, JobError):
            return Call(outcome=prepared)
        adapter, request = prepared
        assert self._session is not None
        async with transport.open_stream(self._session, request, deployment.timeout_s) as opened:
            if isinstance(opened, JobError):
                return Call(outcome=opened)
            if isinstance(opened, HttpResponse):
                return answered(adapter, opened, deployment)
            header = adapter.request_id_header
            request_id = opened.headers.get(header) if header else None
            decoder = adapter.stream_decoder(request_id)
            seq = 0
            cut_off: JobError | None = None
            try:
                # Keep-alive pings reset the idle timeout; this bounds the whole answer.
                async with asyncio.timeout(deployment.stream_timeout_s):
                    async for name, data in opened.events():
                        for delta in decoder.feed(name, data):
                            chunk = StreamChunk(
                                job_id=job.id,
                                seq=seq,
                                redelivered=redelivered,
                                content=delta.content,
                                tool_calls=delta.tool_calls,
                                finish_reason=delta.finish_reason,
                            )
                            # One at a time: chunks must reach the producer in order.
                            await send_reply(self.broker, job.reply_to, chunk)
                            seq += 1
            except TimeoutError:
                limit = deployment.stream_timeout_s
                cut_off = job_error(ErrorKind.TIMEOUT, f"stream still running after {limit:g}s")
            outcome = cut_off or opened.error or decoder.finish()
        limits = adapter.rate_limits(opened.headers)
        if isinstance(outcome, ProviderReply):
            return Call(
                outcome=outcome, billed=billed_reply(outcome, deployment), rate_limits=limits
            )
        so_far = decoder.usage_so_far()
        billed = None
        if so_far is not None:  # the provider counted tokens before the stream broke
            billed = Billed(
                usage=so_far[0],
                raw_usage=so_far[1],
                provider_model=deployment.model,
                request_id=request_id,
                status="error",
            )
        return Call(outcome=outcome, billed=billed, rate_limits=limits, streamed=seq > 0)


class Call(msgspec.Struct, kw_only=True):
    """What one provider call came to: the answer or error, what it billed,
    and the provider's rate-limit view."""

    outcome: ProviderReply | JobError
    billed: Billed | None = None
    rate_limits: RateLimits | None = None
    streamed: bool = False  # chunks reached the producer: never run again


class Handoff(msgspec.Struct, kw_only=True):
    """A failed job sent on rather than answered: after `step_ms` in the
    broker's retry ladder, or (None) straight back to the router."""

    job: CompletionJob
    step_ms: int | None


def _reservation_too_old(job: CompletionJob, deployment: Deployment) -> JobError | None:
    """A job whose budget reservation may expire before its call ends is not
    started: an expired reservation no longer holds its share of the budget."""
    if job.reserved_until is None:
        return None
    longest = deployment.stream_timeout_s if job.request.stream else deployment.timeout_s
    if time.time() + longest < job.reserved_until:
        return None
    return job_error(
        ErrorKind.BUDGET_EXCEEDED,
        "the job waited so long that its budget reservation would expire before its call "
        "ends (access.reservation_ttl_s); submit it again",
    )


def answered(adapter: Adapter, response: HttpResponse, deployment: Deployment) -> Call:
    """A complete (non-streamed) response, read by its adapter."""
    outcome = adapter.parse_response(response)
    billed = billed_reply(outcome, deployment) if isinstance(outcome, ProviderReply) else None
    return Call(outcome=outcome, billed=billed, rate_limits=adapter.rate_limits(response.headers))


def _attempt(
    deployment: Deployment,
    started: float,
    finished: float,
    outcome: ProviderReply | JobError,
    billed: Billed | None,
) -> Attempt:
    """The history entry for one provider call."""
    return Attempt(
        deployment=deployment.name,
        provider=deployment.provider,
        started_at=started,
        finished_at=finished,
        outcome="error" if isinstance(outcome, JobError) else "ok",
        error=outcome.kind if isinstance(outcome, JobError) else None,
        provider_request_id=billed.request_id if billed else None,
        billed=billed is not None,
    )
