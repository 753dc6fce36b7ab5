"""The only module that talks AMQP: connect, declare, publish with confirms.

Every publish that carries work or cost is persistent and awaits the broker's
confirm; callers ack their input only after that returns, which is what makes
a crash at any point lose nothing (at worst the input is redelivered).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aio_pika
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)
from aio_pika.exceptions import AMQPConnectionError, ChannelInvalidStateError, MessageProcessError

from modelyard.topology import DEAD_EXCHANGE, Topology

PERSISTENT = aio_pika.DeliveryMode.PERSISTENT


async def connect(url: str, name: str) -> AbstractRobustConnection:
    """A connection that reconnects and re-consumes by itself after a broker restart.

    The first connection must succeed: a wrong URL or a stopped broker is
    reported at once (`ConnectionError` naming the broker, password hidden)
    rather than retried silently."""
    try:
        return await aio_pika.connect_robust(url, client_properties={"connection_name": name})
    except (OSError, AMQPConnectionError) as exc:
        raise ConnectionError(
            f"cannot connect to RabbitMQ at {without_password(url)}: {exc}"
        ) from exc


def without_password(url: str) -> str:
    """A URL safe to print: any password replaced by `***`."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


async def open_channel(
    connection: AbstractRobustConnection, prefetch: int | None = None
) -> AbstractChannel:
    """A channel with publisher confirms; unroutable mandatory publishes raise."""
    channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
    if prefetch is not None:
        await channel.set_qos(prefetch_count=prefetch)
    return channel


async def declare(channel: AbstractChannel, topology: Topology) -> dict[str, AbstractQueue]:
    """Declare every exchange, queue and binding; safe to run from every process."""
    exchanges: dict[str, AbstractExchange] = {}
    for spec in topology.exchanges:
        exchanges[spec.name] = await channel.declare_exchange(
            spec.name, aio_pika.ExchangeType(spec.type), durable=True
        )
    queues: dict[str, AbstractQueue] = {}
    for q in topology.queues:
        queue = await channel.declare_queue(q.name, durable=True, arguments=q.arguments)
        for exchange, key in q.bindings:
            await queue.bind(exchanges[exchange], key)
        queues[q.name] = queue
    return queues


def message(
    body: bytes,
    *,
    correlation_id: str | None = None,
    reply_to: str | None = None,
    headers: dict[str, Any] | None = None,
    priority: int | None = None,
    type: str | None = None,
) -> aio_pika.Message:
    """A persistent JSON message; `type` names a body that is not the queue's usual one."""
    return aio_pika.Message(
        body,
        content_type="application/json",
        delivery_mode=PERSISTENT,
        correlation_id=correlation_id,
        reply_to=reply_to,
        headers=headers,
        priority=priority,
        type=type,
    )


async def dead_letter(channel: AbstractChannel, body: bytes, reason: str) -> None:
    """Park a message on the dead queue with the reason, for inspection and replay."""
    exchange = await channel.get_exchange(DEAD_EXCHANGE, ensure=False)
    await exchange.publish(message(body, headers={"x-modelyard-reason": reason}), routing_key="")


Handler = Callable[[AbstractIncomingMessage], Awaitable[None]]

# How long a stopping process lets in-flight messages finish before closing
# its channel (the broker then redelivers whatever is left).
STOP_GRACE_S = 30.0


class Consumer:
    """Consumes a queue with a handler, counting messages in flight so that a
    stop can let them finish instead of cutting provider calls in half."""

    def __init__(self, handler: Handler, log: Any) -> None:
        self._handler = guarded(handler, log)
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._queue: AbstractQueue | None = None
        self._tag: str | None = None

    async def start(self, queue: AbstractQueue) -> None:
        """Begin consuming."""
        self._queue = queue
        self._tag = await queue.consume(self._run)

    async def resize(self, prefetch: int) -> None:
        """Let the broker hand this consumer up to `prefetch` unacked messages.

        RabbitMQ fixes a consumer's prefetch when it starts (and quorum queues
        have no channel-wide prefetch), so this starts a new consumer with the
        new limit, then cancels the old one; messages the old one holds stay
        in hand and are acked as usual."""
        if self._queue is None or self._tag is None:
            return
        await self._queue.channel.set_qos(prefetch_count=prefetch)
        old, self._tag = self._tag, await self._queue.consume(self._run)
        with contextlib.suppress(ChannelInvalidStateError):
            await self._queue.cancel(old)

    async def cancel(self) -> None:
        """Take no more messages (those in flight carry on)."""
        if self._queue is not None and self._tag is not None and not self._queue.channel.is_closed:
            with contextlib.suppress(ChannelInvalidStateError):
                await self._queue.cancel(self._tag)

    async def drain(self, grace_s: float = STOP_GRACE_S) -> None:
        """Wait up to `grace_s` for the messages in flight to finish."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), grace_s)

    async def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """Take no more messages; wait up to `grace_s` for those in flight."""
        await self.cancel()
        await self.drain(grace_s)

    async def _run(self, message: AbstractIncomingMessage) -> None:
        self._in_flight += 1
        self._idle.clear()
        try:
            await self._handler(message)
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()


def guarded(handler: Handler, log: Any) -> Handler:
    """Wrap a consumer so a bug in it requeues the message instead of leaving it
    unacked forever (which would silently shrink the prefetch window). A message
    that fails every time is dead-lettered by the queue's delivery limit."""

    async def run(message: AbstractIncomingMessage) -> None:
        try:
            await handler(message)
        except Exception:
            log.exception("handler failed; message requeued", message_id=message.correlation_id)
            # Already settled, or its channel is gone (the broker requeues it then).
            # A reject, not a nack: newer RabbitMQ counts only rejects (and
            # lost consumers) towards a quorum queue's delivery limit.
            with contextlib.suppress(MessageProcessError, ChannelInvalidStateError):
                await message.reject(requeue=True)

    return run
