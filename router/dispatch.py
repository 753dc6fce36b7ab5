"""Admission, routing and dispatch: what the router does with a producer's
jobs once they are decoded, as a library. The router service (`service.py`)
feeds it from its queues; the HTTP gateway calls it in-process, so its jobs
go straight to a pool's queue, one broker hop fewer.

Every call returns what to wait on: the job is safe once that settles (it is
confirmed on a pool's queue, or its answer is confirmed on its reply queue,
or it is parked on the dead queue). Batch-lane jobs are packed per pool into
`JobBatch` messages (up to `batch_lane.max_jobs` jobs, waiting at most
`batch_lane.linger_ms`), which is most of what makes a large batch cheap.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import Awaitable

import structlog
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection

from modelyard.batching import Batcher, Encoded, encoded_size, settle_all
from modelyard.broker import Broker, Consumer, settle
from modelyard.config import Config, ModelGroup
from modelyard.handoffs import handoff_batcher
from modelyard.metrics import DispatchMetrics, ProcessMetrics
from modelyard.replies import (
    error_result,
    final_failure,
    kept_for_replay,
    reply_batcher,
    send_reply,
)
from modelyard.topology import (
    RETRY_DELAYS_MS,
    ROUTER_QUEUE,
    build_topology,
    delay_step_ms,
    health_topology,
)
from modelyard.tracing import job_span
from router.admission import DATABASE_PATIENCE_S, Admission
from router.health import HealthView
from router.keys import KeyRecord
from router.routing import Choice, RouteTable, build_route_table
from schemas.codec import InvalidMessage, decode_health, encode, encode_job_batch
from schemas.costs import CostBatch
from schemas.errors import ErrorKind, JobError, job_error
from schemas.jobs import CompletionJob, Constraints, Lane, NextHop, Route
from schemas.results import JobResult

log = structlog.get_logger("modelyard.router")

# The most notes a job carries (`CompletionJob.notes` holds up to 16).
MAX_NOTES = 8
NOTE_CHARS = 512  # the longest note a job may carry


class Dispatcher:
    """Admits, routes and publishes jobs for one router or gateway process.
    It follows the workers' health reports on a queue of its own."""

    def __init__(
        self,
        config: Config,
        connection: AbstractRobustConnection,
        *,
        database_patience_s: float | None = DATABASE_PATIENCE_S,
        metrics: ProcessMetrics | None = None,
    ) -> None:
        self.config = config
        self.metrics = (metrics or ProcessMetrics()).part(DispatchMetrics)
        self.routes: RouteTable = build_route_table(config)
        self.rng = random.Random()
        self.broker = Broker(connection)
        self.health = HealthView(config.health, config.deployments)
        self.admission = Admission(config, self.routes, database_patience_s=database_patience_s)
        self._health_topology = health_topology(uuid.uuid4().hex[:16])
        self._health_consumer = Consumer(
            connection, self._health_topology.queues[0].name, self._on_health, prefetch=64
        )

    async def start(self) -> None:
        """Declare the topology and follow the workers' health reports, so
        the first jobs are routed knowing what they say."""
        await self.broker.declare(build_topology(self.config.pool_names()))
        await self.broker.declare(self._health_topology)
        await self._health_consumer.start()
        lane = self.config.batch_lane
        self._batches: Batcher[tuple[str, Lane], Encoded] = Batcher(
            self._send_batch,
            max_items=lane.max_jobs,
            linger_s=lane.linger_ms / 1000,
            size=encoded_size,
        )
        self._replies = reply_batcher(
            self.broker, max_items=lane.max_jobs, linger_s=lane.linger_ms / 1000
        )
        self._deferred = handoff_batcher(
            self.broker, max_items=lane.max_jobs, linger_s=lane.linger_ms / 1000
        )
        self._releases: Batcher[str, str] = Batcher(
            self._send_releases, max_items=500, linger_s=lane.linger_ms / 1000
        )

    async def stop(self) -> None:
        """Stop following health reports; close the channel and the database pool."""
        await self._health_consumer.stop(grace_s=1)
        await self.broker.close()
        await self.admission.close()

    async def _on_health(self, message: AbstractIncomingMessage) -> None:
        """A worker's health report, into the view routing reads."""
        try:
            report = decode_health(message.body)
        except InvalidMessage as exc:
            log.warning("unreadable health report dropped", reason=str(exc))
        else:
            self.health.observe(report, time.time())
        await settle(message)

    async def admit(
        self, jobs: list[CompletionJob], *, owner: KeyRecord | None = None
    ) -> list[JobError | None]:
        """Admission for a producer's jobs, all at once: None for each one
        admitted (and ready to `route`), else why it is refused. What only
        modelyard may set on a job is forgotten first. `owner`: the key
        every job is for, identified earlier (see `Admission.admit`)."""
        for job in jobs:
            _only_as_submitted(job)
        refusals = await self.admission.admit(jobs, owner=owner)
        for refusal in refusals:
            if refusal is not None:
                self.metrics.refused.labels(refusal.kind.value).inc()
        return refusals

    async def readmit(self, jobs: list[CompletionJob]) -> list[JobError | None]:
        """Admission again for jobs an operator replayed from the dead queue,
        which modelyard had admitted before: by the key id they were
        admitted with (refused if that key was revoked or removed since),
        against today's approvals, limits and budgets. Their attempt
        history stays, so their next call is a new attempt."""
        verdicts: list[JobError | None] = [None] * len(jobs)
        # A reservation still held (a job the broker parked mid-run never
        # gave its back) goes before a new one is made.
        await asyncio.gather(*(shielded(self.release(job)) for job in jobs if job.reservation))
        by_key: dict[str | None, list[int]] = {}
        for i, job in enumerate(jobs):
            attempts, asked = job.attempts, job.constraints_asked
            _only_as_submitted(job)
            job.attempts, job.api_key = attempts, None
            if asked is not None:  # admission narrows afresh what the producer asked
                job.constraints = asked if asked != Constraints() else None
            by_key.setdefault(job.key_id, []).append(i)
        for key_id, indexes in by_key.items():
            owner = await self.admission.current_key(key_id) if key_id is not None else None
            if key_id is not None and owner is None:
                gone = job_error(
                    ErrorKind.UNAUTHORIZED,
                    f"key {key_id}, which this job was admitted with, no longer exists",
                )
                for i in indexes:
                    verdicts[i] = gone
                continue
            group = [jobs[i] for i in indexes]
            for i, verdict in zip(
                indexes, await self.admission.admit(group, owner=owner), strict=True
            ):
                verdicts[i] = verdict
        for verdict in verdicts:
            if verdict is not None:
                self.metrics.refused.labels(verdict.kind.value).inc()
        return verdicts

    async def take(
        self, jobs: list[CompletionJob], *, redelivered: bool, admitted: bool, replay: bool = False
    ) -> list[Awaitable[None]]:
        """Admission for a producer's jobs (all of a message at once), then
        routing; what to wait on before the message is acked. A `replay`
        is admitted again by its key id (see `readmit`)."""
        if admitted:
            refusals: list[JobError | None] = [None] * len(jobs)
        elif replay:
            refusals = await self.readmit(jobs)
        else:
            refusals = await self.admit(jobs)
        waits = []
        for job, refusal in zip(jobs, refusals, strict=True):
            if refusal is None:
                waits.append(self.route(job, redelivered=redelivered))
                continue
            job.redelivered = job.redelivered or redelivered
            log.info("job refused", job_id=job.id, kind=refusal.kind, reason=refusal.message)
            waits.append(self.answer(job, error_result(job, refusal)))
        return waits

    def route(self, job: CompletionJob, *, redelivered: bool = False) -> Awaitable[None]:
        """Route one admitted job and send it on; what to wait on."""
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
        group = self.routes.resolve(job.request.model)
        if (refusal := self._refusal(job, group, now)) is not None:
            return self._refuse(job, refusal)
        assert group is not None
        chosen = self._choose(job, group, now)
        if isinstance(chosen, JobError):
            if kept_for_replay(job, chosen):  # its chain is used up
                return settle_all([shielded(self._refuse(job, chosen)), self._park(job, chosen)])
            return self._refuse(job, chosen)
        deployment = chosen.deployment
        if chosen.wait_until is not None:
            return self._defer(job, chosen.wait_until - now, now)  # its next hop kept
        job.next_hop = None
        self.health.sent(deployment.name, now)
        if chosen.note is not None:
            log.warning("every deployment cooling down", deployment=deployment.name)
            _note(job, chosen.note)
        job.route = Route(
            deployment=deployment.name,
            pool=deployment.pool,
            routed_at=now,
            note=chosen.note,
            model=chosen.model,
        )
        if not self.broker.reply_queue_known(job.reply_to):
            return self._check_reply_queue(job, deployment.pool)
        return self._dispatch(job, deployment.pool)

    def _refusal(self, job: CompletionJob, group: ModelGroup | None, now: float) -> JobError | None:
        """Why the job cannot be routed at all, if it cannot."""
        if job.deadline_passed(now):
            return job_error(ErrorKind.DEADLINE_EXCEEDED, "deadline passed before routing")
        if group is None:
            return job_error(
                ErrorKind.UNKNOWN_MODEL,
                f"no model or alias named {job.request.model!r}",
                field="$.request.model",
            )
        return self._check_fallbacks(job)

    def _choose(self, job: CompletionJob, group: ModelGroup, now: float) -> Choice | JobError:
        """A deployment for a new job, or for one a worker sent on; the
        error to answer when there is none."""
        hop = job.next_hop
        if hop is None:
            chosen = self.routes.choose(group, job, self.rng, health=self.health, now=now)
            return _unsatisfiable(group.name) if chosen is None else chosen
        if (chosen := self._next(job, hop, now)) is None:
            return _exhausted(hop)
        return chosen

    def _next(self, job: CompletionJob, hop: NextHop, now: float) -> Choice | None:
        own = job.fallbacks if self.config.allow_job_fallbacks else None
        chosen = self.routes.next_hop(job, hop, self.rng, own, health=self.health, now=now)
        if chosen is not None:
            name = chosen.deployment.name
            kind = "retry" if not hop.fallback and name == hop.deployment else "fallback"
            log.info(kind, deployment=name, reason=hop.reason, attempts=len(job.attempts))
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

    def _defer(self, job: CompletionJob, wait_s: float, now: float) -> Awaitable[None]:
        """A job every deployment of which asked us to wait: it waits in the
        broker's retry ladder, then comes back here to be routed again.
        One whose deadline comes first is answered now."""
        step = delay_step_ms(wait_s) or RETRY_DELAYS_MS[-1]
        if job.deadline is not None and now + step / 1000 >= job.deadline.timestamp():
            error = job_error(
                ErrorKind.DEADLINE_EXCEEDED,
                f"every deployment this job may use asked to wait {wait_s:.1f}s, "
                "past the job's deadline",
            )
            return self._refuse(job, error)
        log.info("job waits for its deployments", wait_s=round(wait_s, 3))
        _note(job, f"every deployment this job may use asked to wait; it waited {wait_s:.1f}s")
        self.metrics.deferred.inc()
        return self._deferred.put(step, (job.id, encode(job)))

    async def _park(self, job: CompletionJob, error: JobError) -> None:
        """A copy of a job that failed for good on the dead queue, for an
        operator to replay once the cause is fixed."""
        await self.broker.dead_letter(encode(job), final_failure(error), admitted=True)

    def _refuse(self, job: CompletionJob, error: JobError) -> Awaitable[None]:
        """Answer a job routing cannot send anywhere."""
        self.metrics.refused.labels(error.kind.value).inc()
        return self.answer(job, error_result(job, error))

    def _dispatch(self, job: CompletionJob, pool: str) -> Awaitable[None]:
        deployment = job.route.deployment if job.route else ""
        log.debug("routed", deployment=deployment, pool=pool)
        self.metrics.routed.labels(deployment).inc()
        if job.priority == "batch":
            # A retried or fallen-back batch job has waited its turn once: it
            # goes ahead of the batch backlog, in batches on the pool's
            # interactive queue (whose workers still run it as batch work).
            lane: Lane = "interactive" if job.attempts else "batch"
            return self._batches.put((pool, lane), (job.id, encode(job)))
        return self._send_job(job, pool)

    async def _check_reply_queue(self, job: CompletionJob, pool: str) -> None:
        """Dispatch only a job whose answer can be delivered: one whose
        `reply_to` is a special address, too long, or a missing queue is
        parked on the dead queue with the reason, and no provider is paid."""
        problem = await self.broker.reply_queue_problem(job.reply_to)
        if problem is None:
            await shielded(self._dispatch(job, pool))
            return
        log.warning("job not run: its answer cannot be delivered", reason=problem)
        await self.broker.dead_letter(encode(job), f"job not run: {problem}", admitted=True)
        if job.reservation is not None:
            await self._releases.add("ended", job.reservation)

    def answer(self, job: CompletionJob, result: JobResult) -> Awaitable[None]:
        """An error answer, batched with others for batch-lane jobs; a job
        that holds budget reservations has them released too."""
        if job.priority == "batch" and job.reply_to is not None:
            sent: Awaitable[None] = self._replies.put(job.reply_to, (job.id, encode(result)))
        else:
            sent = send_reply(self.broker, job.reply_to, result)
        if job.reservation is None:
            return sent
        released = self._releases.put("ended", job.reservation)
        return settle_all([shielded(sent), asyncio.shield(released)])

    def release(self, job: CompletionJob) -> Awaitable[None]:
        """Give back the budget a job reserved, for a job that will not run
        (its caller could not send it on); nothing when it holds none."""
        if job.reservation is None:
            return asyncio.sleep(0)
        reservation, job.reservation = job.reservation, None
        return self._releases.put("ended", reservation)

    async def _send_releases(self, _key: str, reservations: list[str]) -> None:
        body = encode(CostBatch(events=[], releases=reservations))
        await self.broker.cost(body, correlation_id=reservations[0])

    async def _send_job(self, job: CompletionJob, pool: str) -> None:
        await self.broker.dispatch(pool, "interactive", encode(job), correlation_id=job.id)

    async def _send_batch(self, to: tuple[str, Lane], jobs: list[Encoded]) -> None:
        body = encode_job_batch([job for _, job in jobs])
        pool, lane = to
        await self.broker.dispatch(pool, lane, body, correlation_id=jobs[0][0], batch=True)

    def reply(self, reply_to: str, job_id: str, result: JobResult) -> Awaitable[None]:
        """An answer batched with others to the same reply queue."""
        return self._replies.put(reply_to, (job_id, encode(result)))


def _only_as_submitted(job: CompletionJob) -> None:
    """Forget what only modelyard may set on a job: a producer cannot send
    one in as a retry, a fallback or an admitted job."""
    job.route, job.next_hop, job.attempts, job.notes = None, None, [], []
    job.constraints_asked = None
    job.reservation, job.reserved_until, job.budget_left = None, None, None


def _note(job: CompletionJob, note: str) -> None:
    """Keep what routing had to say for the result, once each, a few at most."""
    note = note[:NOTE_CHARS]
    if note not in job.notes and len(job.notes) < MAX_NOTES:
        job.notes.append(note)


def shielded(wait: Awaitable[None]) -> Awaitable[None]:
    """A batch's shared future must not be cancelled by one waiter giving up."""
    return asyncio.shield(wait) if isinstance(wait, asyncio.Future) else wait


def _unsatisfiable(model: str) -> JobError:
    """The answer when the job's constraints leave none of its model's deployments."""
    return job_error(
        ErrorKind.INVALID_JOB,
        f"no deployment of {model!r} satisfies the job's constraints "
        "(providers, deployments, maximum prices): widen them or ask for another model",
        field="$.constraints",
    )


def _exhausted(hop: NextHop) -> JobError:
    """The answer when nothing is left to try: the last failure, said so."""
    return job_error(
        hop.reason,
        f"every deployment this job may use failed; the last: {hop.message}",
        retryable=False,
    )
