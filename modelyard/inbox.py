"""A process's own reply queue, and the calls waiting on it.

One durable queue per process (a producer's `Client`, a gateway instance),
created on first use. It outlives a dropped connection (answers sent
meanwhile wait in it; the robust channel consumes it again on reconnect)
and expires once its process is gone. Each answer goes to the call that
expects its job id; an answer nobody expects (its caller gave up) is
dropped, and one that is not a reply at all is parked on the dead queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid

from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractRobustConnection
from aio_pika.exceptions import ChannelClosed

from modelyard import broker
from modelyard.broker import LOST, Broker, GroupedAcks, settle
from modelyard.topology import reply_queue, reply_queue_arguments
from schemas.codec import InvalidMessage, decode_reply
from schemas.results import JobResult, Reply, StreamChunk, unpack

Streamed = JobResult | StreamChunk


class Inbox:
    """Where one process's answers arrive, sorted by job id."""

    def __init__(self, connection: AbstractRobustConnection, publisher: Broker) -> None:
        self.connection = connection
        self.publisher = publisher
        self._channel: AbstractChannel | None = None
        self._queue: str | None = None
        self._lock = asyncio.Lock()
        self._results: dict[str, asyncio.Future[JobResult]] = {}
        self._streams: dict[str, asyncio.Queue[Streamed]] = {}
        self._acks = GroupedAcks()

    async def queue(self) -> str:
        """The reply queue's name, declaring and consuming it the first time."""
        async with self._lock:
            if self._queue is None:
                self._channel = channel = await broker.open_channel(self.connection, prefetch=256)
                queue = await channel.declare_queue(
                    reply_queue(uuid.uuid4().hex), durable=True, arguments=reply_queue_arguments()
                )
                await queue.consume(self._on_reply)
                self._queue = queue.name
            return self._queue

    def expect(self, job_id: str) -> asyncio.Future[JobResult]:
        """The future `job_id`'s final result will be set on; `forget` it after."""
        future: asyncio.Future[JobResult] = asyncio.get_running_loop().create_future()
        self._results[job_id] = future
        return future

    def expect_stream(self, job_id: str) -> asyncio.Queue[Streamed]:
        """The queue `job_id`'s chunks, then its final result, arrive on."""
        items: asyncio.Queue[Streamed] = asyncio.Queue()
        self._streams[job_id] = items
        return items

    def forget(self, job_id: str) -> None:
        """Nobody waits for `job_id` any more: later answers are dropped."""
        self._results.pop(job_id, None)
        self._streams.pop(job_id, None)

    def waiting(self) -> int:
        """How many calls wait for an answer."""
        return len(self._results) + len(self._streams)

    async def close(self) -> None:
        """Fail every waiting call and delete the queue (nothing reads it again)."""
        for future in self._results.values():
            if not future.done():
                future.set_exception(ConnectionError("the reply queue was closed"))
        if self._channel is not None and self._queue is not None:
            with contextlib.suppress(*LOST, ChannelClosed):
                await self._channel.queue_delete(self._queue)

    async def _on_reply(self, message: AbstractIncomingMessage) -> None:
        try:
            self._deliver(decode_reply(message.body))
        except InvalidMessage as exc:
            # Later replies finish meanwhile: their group's ack waits for
            # this one, which is acked only once it is parked.
            async with self._acks.holding():
                try:
                    await self.publisher.dead_letter(message.body, f"not a reply: {exc}")
                except BaseException:
                    await settle(message, requeue=True)
                    raise
                self._acks.done(message)
            return
        self._acks.done(message)

    def _deliver(self, message: Reply) -> None:
        """Hand each answer in a reply message to the call waiting for it."""
        for reply in unpack(message):
            if (items := self._streams.get(reply.job_id)) is not None:
                items.put_nowait(reply)
                continue
            future = self._results.get(reply.job_id)
            if isinstance(reply, JobResult) and future is not None and not future.done():
                future.set_result(reply)
