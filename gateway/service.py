"""The HTTP gateway: one more producer on the pipeline, never a provider
caller itself.

Each request becomes a job that this process admits and routes in-process
(the router's own `Dispatcher`: keys, approvals, budgets, limits, health,
strategies) and publishes straight to its pool's queue, one broker hop fewer
than through the router service. Answers come back on this instance's own
reply queue (`Inbox`). Nothing lives here that a second instance needs: any
number run behind a load balancer.

A request's timeout becomes its job's deadline, so work a client gave up on
is never started later; a client that goes away is simply forgotten (its
reply is dropped when it comes; what was billed is in the ledger as always).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import TypeVar

import structlog
from aio_pika.abc import AbstractRobustConnection
from aiohttp import web

from gateway.batch_runner import BatchRunner
from modelyard.broker import LOST, PublishFailed, Unroutable
from modelyard.client import Client
from modelyard.config import Config
from modelyard.database import TRANSIENT, Conn, Database
from modelyard.inbox import Inbox
from modelyard.metrics import HttpMetrics, ProcessMetrics
from modelyard.ops import Readiness, bound_port, broker_check, database_check, serve_app
from modelyard.replies import error_result
from router.admission import DATABASE_PATIENCE_S
from router.dispatch import Dispatcher
from schemas.chat import ChatRequest
from schemas.errors import ErrorKind, JobError, job_error
from schemas.jobs import CompletionJob, TraceContext
from schemas.results import JobResult, StreamChunk

log = structlog.get_logger("modelyard.gateway")

T = TypeVar("T")

# How long past a job's deadline the gateway still waits for its answer: a
# call started just before the deadline may still be finishing.
ANSWER_GRACE_S = 30.0


class Gateway:
    """One gateway instance: its HTTP server, its reply queue, and the
    admission and routing it shares with the router service."""

    def __init__(
        self,
        config: Config,
        connection: AbstractRobustConnection,
        *,
        port: int | None = None,
        metrics: ProcessMetrics | None = None,
    ) -> None:
        self.config = config
        self.settings = config.gateway
        process = metrics or ProcessMetrics()
        self.registry = process.registry
        self.metrics = process.part(HttpMetrics)
        self.dispatcher = Dispatcher(config, connection, metrics=process)
        self.inbox = Inbox(connection, self.dispatcher.broker)
        self.db = Database(config.database_url)
        self.batches = BatchRunner(
            self.dispatcher, Client(connection, self.dispatcher.broker), self.db
        )
        self.readiness = Readiness()
        self.readiness.add("broker", broker_check(connection))
        self.readiness.add("database", database_check(config.database_url))
        self.port = self.settings.port if port is None else port
        self._runner: web.AppRunner | None = None
        self._reply_to = ""

    @property
    def url(self) -> str:
        """Where clients reach this instance."""
        return f"http://{self.settings.host}:{self.port}"

    async def start(self) -> None:
        """Declare the topology, open the reply queue, then listen."""
        from gateway.app import build_app  # noqa: PLC0415 (the app imports this module)

        await self.dispatcher.start()
        self._reply_to = await self.inbox.queue()
        self.readiness.started = True
        self._runner = await serve_app(build_app(self), self.settings.host, self.port)
        self.port = bound_port(self._runner)
        self.batches.start()
        log.info("gateway started", url=self.url)

    async def stop(self) -> None:
        """Stop listening (requests in progress finish) and running batches
        (handed back for another gateway to take over), then close."""
        if self._runner is not None:
            await self._runner.cleanup()
        await self.batches.stop()
        await self.inbox.close()
        await self.dispatcher.stop()
        await self.db.close()

    async def db_run(self, work: Callable[[Conn], Awaitable[T]], *, what: str) -> T:
        """`work` in a transaction, given up on after `DATABASE_PATIENCE_S`
        of the database being away (the request is then answered 503)."""
        return await self.db.run(work, what=what, give_up_after_s=DATABASE_PATIENCE_S)

    def job(self, request: ChatRequest, secret: str | None, timeout_s: float) -> CompletionJob:
        """A job for one HTTP request, answered on this instance's queue."""
        return CompletionJob(
            id=uuid.uuid4().hex,
            request=request,
            api_key=secret,
            reply_to=self._reply_to,
            deadline=datetime.fromtimestamp(time.time() + timeout_s, UTC),
            submitted_at=time.time(),
            trace=TraceContext(traceparent=_traceparent()),
        )

    async def complete(self, job: CompletionJob) -> JobResult | JobError:
        """The job's final result, or why it was refused before it ran."""
        answer = self.inbox.expect(job.id)
        try:
            if (refusal := await self._submit(job)) is not None:
                return refusal
            return await asyncio.wait_for(answer, _patience(job))
        except TimeoutError:
            return _no_answer(job)
        finally:
            self.inbox.forget(job.id)

    async def stream(self, job: CompletionJob) -> AsyncIterator[StreamChunk | JobResult]:
        """The job's chunks in order, then its final result (an error result
        when it was refused or no answer came in time)."""
        items = self.inbox.expect_stream(job.id)
        try:
            if (refusal := await self._submit(job)) is not None:
                yield error_result(job, refusal)
                return
            while True:
                try:
                    item = await asyncio.wait_for(items.get(), _patience(job))
                except TimeoutError:
                    yield error_result(job, _no_answer(job))
                    return
                yield item
                if isinstance(item, JobResult):
                    return
        finally:
            self.inbox.forget(job.id)

    async def _submit(self, job: CompletionJob) -> JobError | None:
        """Admit the job and put it on its pool's queue (confirmed); why it
        was refused otherwise. A client leaving meanwhile cuts neither short
        (an admission cut off after its budget was reserved would hold the
        reservation until it expires): the job is sent and answered as usual."""
        return await asyncio.shield(self._admit_and_route(job))

    async def _admit_and_route(self, job: CompletionJob) -> JobError | None:
        try:
            refusal = (await self.dispatcher.admit([job]))[0]
        except (*TRANSIENT, ConnectionError) as exc:
            log.warning("admission unavailable", error=str(exc))
            return _unavailable("the gateway cannot reach its database to admit the request")
        if refusal is not None:
            return refusal
        try:
            await self.dispatcher.route(job)
        except (Unroutable, PublishFailed, *LOST) as exc:
            log.warning("job not sent", job_id=job.id, error=str(exc))
            await self.dispatcher.release(job)
            return _unavailable("the gateway could not hand the request to its workers")
        return None


def _patience(job: CompletionJob) -> float:
    """How long to wait for the job's next answer."""
    assert job.deadline is not None
    return max(job.deadline.timestamp() - time.time(), 0) + ANSWER_GRACE_S


def _unavailable(what: str) -> JobError:
    return job_error(ErrorKind.OVERLOADED, f"{what}; try again shortly", retry_after_s=5)


def _no_answer(job: CompletionJob) -> JobError:
    return job_error(
        ErrorKind.DEADLINE_EXCEEDED,
        f"no answer for request {job.id} before its deadline",
    )


def _traceparent() -> str:
    """A fresh W3C traceparent."""
    return f"00-{uuid.uuid4().hex}-{uuid.uuid4().hex[:16]}-01"
