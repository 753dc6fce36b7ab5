"""The producer's client: submit jobs, await answers, collect batch results.

    async with await Client.connect(url) as client:
        result = await client.complete(new_job("gpt-4o-mini", [Message(role="user", content="hi")]))

Every submit waits for the broker's confirm, so a returned `submit` means the
job is safely queued. Results are de-duplicated by job id: a redelivered job
can produce a second result (marked `redelivered`), and clients keep the first.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Iterator
from datetime import datetime
from types import TracebackType
from typing import Any, Self

import structlog
from aio_pika.abc import AbstractRobustConnection
from aio_pika.exceptions import ChannelClosed
from aiormq.exceptions import ChannelAccessRefused, ChannelNotFoundEntity

from modelyard import broker
from modelyard.broker import LOST, Broker, settle
from modelyard.inbox import Inbox
from modelyard.topology import (
    build_topology,
    results_queue_arguments,
)
from schemas.chat import ChatRequest, Message
from schemas.codec import InvalidMessage, decode_reply, encode, encode_job_batch
from schemas.jobs import CompletionJob, Constraints, Lane, Metadata, TraceContext
from schemas.results import JobResult, StreamChunk, unpack


def new_trace() -> TraceContext:
    """A fresh W3C traceparent, so every job is traceable even without OTel upstream."""
    return TraceContext(traceparent=f"00-{os.urandom(16).hex()}-{os.urandom(8).hex()}-01")


def new_job(
    model: str,
    messages: list[Message],
    *,
    job_id: str | None = None,
    metadata: Metadata | None = None,
    deadline: datetime | None = None,
    priority: Lane = "interactive",
    constraints: Constraints | None = None,
    **params: Any,
) -> CompletionJob:
    """A job for `model` with a fresh id and trace; `params` are ChatRequest fields.

    `priority="batch"` sends it on the batch lane: cheaper per job, a few
    milliseconds slower, and never ahead of interactive work. `constraints`
    narrows where it may run (providers, deployments, maximum prices)."""
    return CompletionJob(
        id=job_id or uuid.uuid4().hex,
        request=ChatRequest(model=model, messages=messages, **params),
        metadata=metadata or Metadata(),
        deadline=deadline,
        priority=priority,
        trace=new_trace(),
        constraints=constraints,
    )


log = structlog.get_logger("modelyard.client")


class ResultsBusyError(RuntimeError):
    """Another process holds the results queue exclusively."""


class ResultsQueueMissingError(LookupError):
    """The results queue does not exist (never declared, or deleted)."""


class ResultTimeoutError(TimeoutError):
    """No result arrived in time; the job may still finish (its result is then dropped)."""


class Client:
    """A connection to modelyard's broker, for producers."""

    def __init__(self, connection: AbstractRobustConnection, broker: Broker) -> None:
        self.connection = connection
        self.broker = broker
        self.inbox = Inbox(connection, broker)

    @classmethod
    async def connect(
        cls, url: str, name: str = "modelyard-client", *, declare: bool = True
    ) -> Client:
        """Connect and (with `declare`) make sure the submit side of the
        topology exists. A producer whose broker user may only publish jobs
        (`deploy/rabbitmq-users.sh`) passes `declare=False`: modelyard's own
        processes declare the topology."""
        connection = await broker.connect(url, name)
        publisher = Broker(connection)
        if declare:
            await publisher.declare(build_topology([]))
        return cls(connection, publisher)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the connection; pending `complete` calls fail."""
        await self.inbox.close()
        await self.connection.close()

    async def submit(self, job: CompletionJob, reply_to: str | None = None) -> None:
        """Publish a job and wait for the broker to confirm it is stored
        (through a broker restart: the publish is sent again once it is back)."""
        if reply_to is not None:
            job.reply_to = reply_to
        if job.reply_to is None:
            raise ValueError(f"job {job.id}: no reply_to: name the queue results should go to")
        job.submitted_at = time.time()
        await self.broker.submit(encode(job), correlation_id=job.id, reply_to=job.reply_to)

    async def submit_many(
        self,
        jobs: Iterable[CompletionJob],
        reply_to: str,
        *,
        max_unconfirmed: int = 512,
        batch_size: int = 64,
        on_confirmed: Callable[[CompletionJob], None] | None = None,
    ) -> int:
        """Publish many jobs, up to `batch_size` per message, with at most about
        `max_unconfirmed` jobs awaiting the broker.

        Returns how many were confirmed. On a failed publish no further job is
        sent; the ones in flight settle (each confirmed one still reported to
        `on_confirmed`), then the first error is raised. Which lane each job
        runs in is its own `priority`: mark them `"batch"` for throughput.
        """
        if batch_size < 1 or max_unconfirmed < 1:
            raise ValueError("batch_size and max_unconfirmed must be at least 1")
        slots = asyncio.Semaphore(max(1, max_unconfirmed // batch_size))
        confirmed = 0
        failures: list[BaseException] = []

        async def one(batch: list[CompletionJob], bodies: list[bytes]) -> None:
            nonlocal confirmed
            try:
                await self._submit_batch(batch, bodies, reply_to)
            except Exception as exc:
                failures.append(exc)
            else:
                confirmed += len(batch)
                for job in batch:
                    if on_confirmed is not None:
                        on_confirmed(job)
            finally:
                slots.release()

        in_flight: set[asyncio.Task[None]] = set()
        for batch, bodies in _batches(jobs, reply_to, batch_size):
            await slots.acquire()
            if failures:
                slots.release()
                break
            task = asyncio.create_task(one(batch, bodies))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
        await asyncio.gather(*in_flight)
        if failures:
            raise failures[0]
        return confirmed

    async def _submit_batch(
        self, batch: list[CompletionJob], bodies: list[bytes], reply_to: str
    ) -> None:
        """One `JobBatch` message, built from the jobs' own encodings."""
        await self.broker.submit(
            encode_job_batch(bodies), correlation_id=batch[0].id, reply_to=reply_to, batch=True
        )

    async def declare_results_queue(self, name: str) -> None:
        """A durable queue for batch results: they survive this process and the broker."""
        channel = await broker.open_channel(self.connection)
        try:
            await channel.declare_queue(name, durable=True, arguments=results_queue_arguments())
        finally:
            await channel.close()

    async def delete_queue(self, name: str) -> None:
        """Remove a results queue once its batch is fully collected."""
        channel = await broker.open_channel(self.connection)
        try:
            await channel.queue_delete(name)
        finally:
            await channel.close()

    async def results(
        self, queue: str, *, prefetch: int = 512, exclusive: bool = False
    ) -> AsyncGenerator[JobResult, None]:
        """Yield results from a durable queue, each job id once (see
        `result_groups`: a message is acked when the caller asks for the
        result after its last one)."""
        groups = self.result_groups(queue, prefetch=prefetch, exclusive=exclusive)
        async with contextlib.aclosing(groups):
            async for group in groups:
                for item in group:
                    yield item

    async def result_groups(
        self, queue: str, *, prefetch: int = 512, exclusive: bool = False
    ) -> AsyncGenerator[list[JobResult], None]:
        """Yield the results from a durable queue one message at a time (a
        batch-lane message carries many), each job id once.

        A message is acked when the caller asks for the next group, i.e.
        after handling everything it carried: stopping mid-way loses nothing,
        but the next read gets that message's results again, then marked
        `redelivered`. With
        `exclusive`, a second reader of the same queue is refused (two readers
        would each get part of the results). A message that is not a reply is
        moved to the dead queue, not left to block the queue. A broker
        restart or a lost connection is waited out: reading resumes where it
        was, and results already yielded are not yielded again.
        """
        seen: set[str] = set()
        while True:
            try:
                reader = self._read_results(queue, prefetch, exclusive, seen)
                async with contextlib.aclosing(reader):
                    async for item in reader:
                        yield item
                if self.connection.is_closed:
                    return
                # The library ends a consumer quietly when its channel stays
                # down for a minute: that is an outage to wait out, not the end.
                log.warning("results consumer ended with the connection up; resuming", queue=queue)
                await asyncio.sleep(0.2)
            except (*LOST, ChannelClosed) as exc:
                if isinstance(exc, ChannelAccessRefused):
                    raise ResultsBusyError(f"another process is reading {queue}") from exc
                if isinstance(exc, ChannelNotFoundEntity):
                    raise ResultsQueueMissingError(f"no results queue named {queue!r}") from exc
                log.warning("results consumer lost; resuming", queue=queue, error=str(exc))
                await asyncio.sleep(0.2)
                await broker.wait_connected(self.connection)

    async def _read_results(
        self, queue: str, prefetch: int, exclusive: bool, seen: set[str]
    ) -> AsyncGenerator[list[JobResult], None]:
        """One consumer's worth of `result_groups`; ends by raising when its channel goes."""
        channel = await broker.open_channel(self.connection, prefetch=prefetch)
        try:
            source = await channel.get_queue(queue)
            messages = source.iterator(exclusive=exclusive)
            await messages.consume()
            try:
                async for message in messages:
                    try:
                        reply = decode_reply(message.body)
                    except InvalidMessage as exc:
                        await self.broker.dead_letter(message.body, f"not a reply: {exc}")
                        await settle(message)
                        continue
                    group = []
                    for item in unpack(reply):
                        if isinstance(item, JobResult) and item.job_id not in seen:
                            seen.add(item.job_id)
                            item.redelivered = item.redelivered or bool(message.redelivered)
                            group.append(item)
                    if group:
                        yield group
                    await settle(message)
            finally:
                # Closing re-raises whatever ended the consumer (aiormq keeps
                # a bare `Exception` when the broker cancelled it): the reader
                # is going either way, and the caller must not see that.
                with contextlib.suppress(Exception):
                    await messages.close()
        finally:
            if not channel.is_closed:
                with contextlib.suppress(*LOST, ChannelClosed):
                    await channel.close()

    async def complete(self, job: CompletionJob, timeout: float = 60.0) -> JobResult:
        """Submit and wait for the result (AMQP request/reply)."""
        reply_to = await self.inbox.queue()
        future = self.inbox.expect(job.id)
        try:
            await self.submit(job, reply_to)
            return await asyncio.wait_for(future, timeout)
        except TimeoutError as exc:
            raise ResultTimeoutError(f"no result for job {job.id} within {timeout:g}s") from exc
        finally:
            self.inbox.forget(job.id)

    async def stream(
        self, job: CompletionJob, timeout: float = 60.0
    ) -> AsyncIterator[StreamChunk | JobResult]:
        """Submit a streaming job; yield its chunks in order, then its final result.

        If a worker dies mid-stream the job runs again: its chunks then come
        with `redelivered` set, starting again at `seq` 0, and what was
        received before should be discarded.
        """
        reply_to = await self.inbox.queue()
        job.request.stream = True
        chunks = self.inbox.expect_stream(job.id)
        try:
            await self.submit(job, reply_to)
            while True:
                try:
                    item = await asyncio.wait_for(chunks.get(), timeout)
                except TimeoutError as exc:
                    raise ResultTimeoutError(f"job {job.id} stalled for {timeout:g}s") from exc
                yield item
                if isinstance(item, JobResult):
                    return
        finally:
            self.inbox.forget(job.id)


# A batch message stays well under the router's `max_batch_bytes`, whatever
# the jobs hold (each job alone may be up to `max_job_bytes`).
BATCH_BYTES = 4 * 1024 * 1024


def _batches(
    jobs: Iterable[CompletionJob], reply_to: str, batch_size: int
) -> Iterator[tuple[list[CompletionJob], list[bytes]]]:
    """Jobs stamped for submission and grouped, with their encodings, into
    batches of at most `batch_size` jobs and about `BATCH_BYTES`."""
    batch: list[CompletionJob] = []
    bodies: list[bytes] = []
    size = 0
    for job in jobs:
        job.reply_to = reply_to
        job.submitted_at = time.time()
        body = encode(job)
        if batch and (len(batch) >= batch_size or size + len(body) > BATCH_BYTES):
            yield batch, bodies
            batch, bodies, size = [], [], 0
        batch.append(job)
        bodies.append(body)
        size += len(body)
    if batch:
        yield batch, bodies
