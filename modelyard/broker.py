"""The only module that talks AMQP: connect, declare, consume, and the few
verbs every role publishes with.

Every publish goes through `Broker`: persistent, `mandatory`, and awaited
until the broker confirms it. A publish cut off by a lost connection or a
closed channel is sent again once the broker is back, from this process's
memory, so a broker restart loses nothing a process was still holding (an
in-process outbox: nothing is recomputed and no provider is called twice).
Callers ack their input only after the publish returns, which is what makes
a crash at any point lose nothing (at worst the input is redelivered).

Every consumer has its own channel, watched: a channel closed by a
channel-level error (a bad publish, an ack the broker refused) is reopened
and the consumer restarted, so no message can leave a process alive and idle.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import aiormq
import structlog
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)
from aio_pika.exceptions import (
    AMQPConnectionError,
    ChannelClosed,
    ChannelInvalidStateError,
    DeliveryError,
    MessageProcessError,
    PublishError,
)

from modelyard.topology import (
    ALERTS_EXCHANGE,
    COSTS_EXCHANGE,
    DEAD_EXCHANGE,
    DISPATCH_EXCHANGE,
    HEALTH_EXCHANGE,
    INTERNAL_EXCHANGE,
    JOBS_EXCHANGE,
    Topology,
    delay_exchange,
    dispatch_key,
    reply_target_problem,
)
from schemas.jobs import JOB_BATCH_TYPE, Lane, redact_keys

PERSISTENT = aio_pika.DeliveryMode.PERSISTENT

# The header that carries why a message was parked on the dead queue.
REASON_HEADER = "x-modelyard-reason"
# On a job modelyard parked after admitting it (its key is gone from it,
# its key id kept): `dead replay` sends it back to be admitted again by that
# key id, its attempt history kept, rather than as a producer's new job.
ADMITTED_HEADER = "x-modelyard-admitted"
# On a replayed admitted job, on the internal exchange producers cannot reach.
REPLAY_HEADER = "x-modelyard-replay"
# Set on a message sent again after its confirm was lost (a reconnect): the
# broker may hold the first try too.
RESENT_HEADER = "x-modelyard-resent"

log = structlog.get_logger("modelyard.broker")


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
    """A channel with publisher confirms; unroutable mandatory publishes
    raise. While the connection is away, this waits for it."""
    await wait_connected(connection)
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
    timestamp: datetime | None = None,
    persistent: bool = True,
) -> aio_pika.Message:
    """A JSON message, persistent unless it is worth nothing after a broker
    restart; `type` names a body that is not the queue's usual one."""
    return aio_pika.Message(
        body,
        content_type="application/json",
        delivery_mode=PERSISTENT if persistent else aio_pika.DeliveryMode.NOT_PERSISTENT,
        correlation_id=correlation_id,
        reply_to=reply_to,
        headers=headers,
        priority=priority,
        type=type,
        timestamp=timestamp,
    )


class Unroutable(Exception):
    """The broker returned a mandatory publish: no queue is bound for it."""


class PublishFailed(Exception):
    """A publish the broker kept refusing for reasons other than a lost connection."""


# Failures that say the connection or channel went away, not that the
# message is at fault: the publish is sent again once the broker is back.
LOST = (AMQPConnectionError, ConnectionError, ChannelInvalidStateError, TimeoutError)

# A channel closed by the broker because of *this* publish would close again
# each time: after this many, the publish fails instead of looping.
MAX_CHANNEL_ERRORS = 3
# A publish the broker nacks (a queue at its length limit, a resource alarm)
# is retried with backoff up to this long: backpressure, not a failure.
NACK_PATIENCE_S = 60.0
MAX_BACKOFF_S = 2.0
# How long a reply queue seen to exist is trusted to exist: a batch's jobs
# cost one check, and a queue deleted meanwhile still ends on the dead queue.
KNOWN_QUEUE_TTL_S = 30.0
# A reply queue check that takes longer (a half-open connection) is given
# up: the queue is assumed to exist, and a missing one still ends on the
# dead queue.
QUEUE_CHECK_TIMEOUT_S = 5.0
# How long a reconnecting channel may take before it is replaced by a new one.
RESTORE_WAIT_S = 5.0


class Broker:
    """One process's publishing side: a confirming channel and the verbs the
    roles need (submit, dispatch, reply, cost, dead-letter). Confirms,
    `mandatory`, republishing after a reconnect and replacing a channel a
    channel-level error closed are handled here, once."""

    def __init__(self, connection: AbstractRobustConnection) -> None:
        self.connection = connection
        self._channel: AbstractChannel | None = None
        self._exchanges: dict[str, AbstractExchange] = {}
        self._known_queues: dict[str, float] = {}
        self._checking: dict[str, asyncio.Future[bool]] = {}
        self._lock = asyncio.Lock()

    async def declare(self, topology: Topology) -> None:
        """Declare the topology (idempotent; every process does it at start)."""
        await declare(await self._ready_channel(), topology)

    async def close(self) -> None:
        """Close the publishing channel (the connection belongs to the caller)."""
        if self._channel is not None and not self._channel.is_closed:
            with contextlib.suppress(*LOST, ChannelClosed):
                await self._channel.close()

    # The verbs.

    async def submit(
        self, body: bytes, *, correlation_id: str, reply_to: str | None, batch: bool = False
    ) -> None:
        """A job (or a `JobBatch` when `batch`) to the router, confirmed."""
        msg = message(
            body,
            correlation_id=correlation_id,
            reply_to=reply_to,
            type=JOB_BATCH_TYPE if batch else None,
        )
        await self.publish(JOBS_EXCHANGE, "job", msg)

    async def resubmit(self, body: bytes, *, correlation_id: str, batch: bool = False) -> None:
        """A job (or a `JobBatch`) modelyard already admitted, straight back
        to the router (a fallback), confirmed."""
        msg = message(body, correlation_id=correlation_id, type=JOB_BATCH_TYPE if batch else None)
        await self.publish(INTERNAL_EXCHANGE, "job", msg)

    async def dispatch(
        self, pool: str, lane: Lane, body: bytes, *, correlation_id: str, batch: bool = False
    ) -> None:
        """Work to a pool's lane, confirmed. An unroutable publish (no such
        pool queue) raises, so the caller's input is requeued, never dropped.
        No AMQP `reply_to` travels with it: the job names its reply queue,
        and RabbitMQ refuses some `reply_to` values on publish."""
        msg = message(body, correlation_id=correlation_id, type=JOB_BATCH_TYPE if batch else None)
        await self.publish(DISPATCH_EXCHANGE, dispatch_key(pool, lane), msg)

    async def defer(
        self, step_ms: int, body: bytes, *, correlation_id: str, batch: bool = False
    ) -> None:
        """A job (or a `JobBatch` when `batch`) to wait `step_ms` (a step of
        the retry ladder) in the broker, then go back to the router,
        confirmed. Nothing waits in a process."""
        msg = message(body, correlation_id=correlation_id, type=JOB_BATCH_TYPE if batch else None)
        await self.publish(delay_exchange(step_ms), "", msg)

    async def health(self, body: bytes) -> None:
        """A worker's health report to every router, confirmed; dropped when
        no router is listening (the next report says the same, and more)."""
        msg = message(body, persistent=False)
        with contextlib.suppress(Unroutable):
            await self.publish(HEALTH_EXCHANGE, "", msg)

    async def alert(self, body: bytes) -> None:
        """A budget alert to whoever listens, confirmed; dropped (not an
        error) when nobody has bound a queue to `modelyard.alerts`."""
        with contextlib.suppress(Unroutable):
            await self.publish(ALERTS_EXCHANGE, "", message(body))

    async def cost(self, body: bytes, *, correlation_id: str) -> None:
        """Cost events to the ledger, confirmed."""
        await self.publish(COSTS_EXCHANGE, "cost", message(body, correlation_id=correlation_id))

    async def reply(self, reply_to: str | None, body: bytes, *, correlation_id: str) -> None:
        """An answer to the producer's queue, confirmed. An answer nobody can
        receive (no `reply_to`, one that is not an ordinary queue, or a queue
        that is gone) goes to the dead queue with the reason: it is kept."""
        problem = reply_target_problem(reply_to)
        if problem is not None:
            await self.dead_letter(body, problem)
            return
        assert reply_to is not None
        try:
            await self.publish("", reply_to, message(body, correlation_id=correlation_id))
        except Unroutable:
            log.warning("reply queue missing, result dead-lettered", reply_to=reply_to)
            await self.dead_letter(body, f"reply queue {reply_to!r} does not exist")
        except PublishFailed as exc:
            # The answer is paid for: kept on the dead queue, never recomputed.
            log.warning("reply refused by the broker, result dead-lettered", reply_to=reply_to)
            await self.dead_letter(body, f"reply queue {reply_to!r} refused the answer: {exc}")

    async def dead_letter(self, body: bytes, reason: str, *, admitted: bool = False) -> None:
        """Park a message on the dead queue with the reason, for inspection and
        replay; a virtual key anywhere in it (a job that failed to decode
        still carries its producer's key) is removed first. `admitted`: a
        job modelyard admitted (see `ADMITTED_HEADER`)."""
        headers: dict[str, Any] = {REASON_HEADER: reason[:4096]}
        if admitted:
            headers[ADMITTED_HEADER] = True
        msg = message(redact_keys(body), headers=headers, timestamp=datetime.now(UTC))
        await self.publish(DEAD_EXCHANGE, "", msg)

    async def replay(self, body: bytes, *, correlation_id: str, batch: bool = False) -> None:
        """An admitted job (or `JobBatch`) from the dead queue back to the
        router, to be admitted again by its key id, confirmed."""
        msg = message(
            body,
            correlation_id=correlation_id,
            type=JOB_BATCH_TYPE if batch else None,
            headers={REPLAY_HEADER: True},
        )
        await self.publish(INTERNAL_EXCHANGE, "job", msg)

    def reply_queue_known(self, reply_to: str | None, ttl_s: float = KNOWN_QUEUE_TTL_S) -> bool:
        """Whether `reply_to` was seen to be a usable queue in the last `ttl_s`."""
        seen = self._known_queues.get(reply_to or "")
        return seen is not None and time.monotonic() - seen < ttl_s

    async def reply_queue_problem(
        self, reply_to: str | None, ttl_s: float = KNOWN_QUEUE_TTL_S
    ) -> str | None:
        """Why answers cannot be sent to `reply_to`, or None when they can:
        checked before a job is dispatched, so no provider is paid for an
        answer nobody can receive. A queue seen to exist is remembered for
        `ttl_s`, so a batch's jobs cost one check, not one each."""
        problem = reply_target_problem(reply_to)
        if problem is not None or reply_to is None:
            return problem
        if self.reply_queue_known(reply_to, ttl_s):
            return None
        # Jobs of one batch arrive together: they share a single check.
        checking = self._checking.get(reply_to)
        if checking is None:
            checking = self._checking[reply_to] = asyncio.ensure_future(
                self._queue_exists(reply_to)
            )
            checking.add_done_callback(lambda _: self._checking.pop(reply_to, None))
        if not await asyncio.shield(checking):
            return f"reply queue {reply_to!r} does not exist"
        if len(self._known_queues) > 10_000:  # a bound, not a cache policy
            self._known_queues.clear()
        self._known_queues[reply_to] = time.monotonic()
        return None

    async def _queue_exists(self, name: str) -> bool:
        """A passive declare on a throwaway channel (a missing queue closes
        the channel it was asked on). Unknown while disconnected: assumed to
        exist, since a missing queue still ends on the dead queue later."""
        transport = getattr(self.connection, "transport", None)
        if transport is None:
            return True
        try:
            async with asyncio.timeout(QUEUE_CHECK_TIMEOUT_S):
                channel = await transport.connection.channel(publisher_confirms=False)
        except (*LOST, aiormq.exceptions.AMQPError):
            return True
        try:
            async with asyncio.timeout(QUEUE_CHECK_TIMEOUT_S):
                await channel.queue_declare(name, passive=True)
            return True
        except aiormq.exceptions.ChannelNotFoundEntity:
            return False
        except (*LOST, aiormq.exceptions.AMQPError):
            return True
        finally:
            if not channel.is_closed:
                with contextlib.suppress(*LOST, aiormq.exceptions.AMQPError):
                    await channel.close()

    async def waiting(self, queues: list[str]) -> int | None:
        """Messages ready on these queues (a passive declare each, on a
        throwaway channel); None when the broker cannot say right now."""
        transport = getattr(self.connection, "transport", None)
        if transport is None:
            return None
        try:
            async with asyncio.timeout(QUEUE_CHECK_TIMEOUT_S):
                channel = await transport.connection.channel(publisher_confirms=False)
                try:
                    total = 0
                    for name in queues:
                        declared = await channel.queue_declare(name, passive=True)
                        total += declared.message_count or 0
                    return total
                finally:
                    if not channel.is_closed:
                        await channel.close()
        except (TimeoutError, *LOST, aiormq.exceptions.AMQPError):
            return None

    # The one publish path.

    async def publish(self, exchange: str, routing_key: str, msg: aio_pika.Message) -> None:
        """Publish with `mandatory` until the broker confirms it.

        A lost connection or channel is waited out and the message sent again
        (a duplicate is possible, never a loss: every consumer de-duplicates).
        A returned message raises `Unroutable`; a nack is retried with backoff
        for `NACK_PATIENCE_S`; a channel the broker keeps closing because of
        this message raises `PublishFailed` after `MAX_CHANNEL_ERRORS`."""
        channel_errors = 0
        first_nack: float | None = None
        backoff = 0.05
        while True:
            try:
                target = await self._exchange(exchange)
                await target.publish(msg, routing_key=routing_key, mandatory=True)
                return
            except PublishError as exc:
                raise Unroutable(f"no queue for {exchange or 'default'}/{routing_key}") from exc
            except DeliveryError as exc:
                first_nack = first_nack or time.monotonic()
                if time.monotonic() - first_nack > NACK_PATIENCE_S:
                    raise PublishFailed(f"broker kept refusing the publish: {exc}") from exc
                failure: BaseException = exc
            except ChannelClosed as exc:
                channel_errors += 1
                if channel_errors >= MAX_CHANNEL_ERRORS:
                    raise PublishFailed(f"the broker closed the channel: {exc}") from exc
                failure = exc
            except LOST as exc:
                failure = exc
            log.warning(
                "publish not confirmed; sending again",
                exchange=exchange,
                error=f"{type(failure).__name__}: {failure}",
                retry_in_s=backoff,
            )
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF_S)
            await self._recover()
            # The broker may have stored the first try before the confirm
            # was lost: consumers treat a resent message as a possible copy.
            msg.headers[RESENT_HEADER] = True

    async def _exchange(self, name: str) -> AbstractExchange:
        channel = await self._ready_channel()
        if name == "":
            return channel.default_exchange
        exchange = self._exchanges.get(name)
        if exchange is None:
            exchange = self._exchanges[name] = await channel.get_exchange(name, ensure=False)
        return exchange

    async def _ready_channel(self) -> AbstractChannel:
        if self._channel is None:
            async with self._lock:
                if self._channel is None:
                    self._channel = await open_channel(self.connection)
                    self._exchanges.clear()
        return self._channel

    async def _recover(self) -> None:
        """After a failure: wait for the connection, then for the channel to
        be restored; a channel still closed after that (its restore failed,
        as it can after a channel-level error) is replaced by a new one."""
        await wait_connected(self.connection)
        channel = self._channel
        if channel is None or not channel.is_closed:
            return
        await _wait_restored(channel)
        if channel.is_closed and self._channel is channel:
            async with self._lock:
                if self._channel is channel:
                    await _discard(channel)
                    self._channel = None
                    self._exchanges.clear()


async def wait_connected(connection: AbstractRobustConnection) -> None:
    """Return once the connection is up (at once when it is)."""
    connected = getattr(connection, "connected", None)
    if isinstance(connected, asyncio.Event) and not connected.is_set():
        await connected.wait()


async def _wait_restored(channel: AbstractChannel) -> None:
    """Give a robust channel `RESTORE_WAIT_S` to reopen itself."""
    ready = getattr(channel, "ready", None)
    if ready is None:
        return
    with contextlib.suppress(TimeoutError, *LOST, ChannelClosed):
        await asyncio.wait_for(ready(), RESTORE_WAIT_S)


async def _discard(channel: AbstractChannel) -> None:
    """Close a channel we give up on, whatever state it is in."""
    with contextlib.suppress(*LOST, ChannelClosed, RuntimeError):
        await asyncio.wait_for(channel.close(), 2)


Handler = Callable[[AbstractIncomingMessage], Awaitable[None]]

# How long a stopping process lets in-flight messages finish before closing
# its channel (the broker then redelivers whatever is left).
STOP_GRACE_S = 30.0
# How often a consumer checks that its channel is open, and how many checks
# in a row may find it closed (while connected) before it is replaced.
WATCH_S = 1.0
WATCH_STRIKES = 3


class Consumer:
    """Consumes one queue on a channel of its own, counting messages in flight
    so that a stop can let them finish instead of cutting provider calls in
    half, and watching the channel: one closed by a channel-level error is
    replaced and the consumer started again."""

    def __init__(
        self,
        connection: AbstractRobustConnection,
        queue: str,
        handler: Handler,
        *,
        prefetch: int,
    ) -> None:
        self.connection = connection
        self.queue_name = queue
        self._handler = guarded(handler)
        self.prefetch = prefetch
        self._in_flight = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._channel: AbstractChannel | None = None
        self._queue: AbstractQueue | None = None
        self._tag: str | None = None
        self._stopped = False
        self._watch: asyncio.Task[None] | None = None

    @property
    def channel(self) -> AbstractChannel | None:
        """The channel consumed on now (it changes when one is replaced)."""
        return self._channel

    async def start(self) -> None:
        """Begin consuming, and watching the channel."""
        await self._open()
        self._watch = asyncio.create_task(self._watch_channel())

    async def _open(self) -> None:
        self._channel = channel = await open_channel(self.connection, prefetch=self.prefetch)
        # Declared (passively), not just looked up: the robust channel then
        # knows the queue and consumes it again when it reopens.
        self._queue = await channel.declare_queue(self.queue_name, passive=True)
        self._tag = await self._queue.consume(self._run)

    async def resize(self, prefetch: int) -> None:
        """Let the broker hand this consumer up to `prefetch` unacked messages.

        RabbitMQ fixes a consumer's prefetch when it starts (and quorum queues
        have no channel-wide prefetch), so this starts a new consumer with the
        new limit, then cancels the old one; messages the old one holds stay
        in hand and are acked as usual."""
        if self._queue is None or self._tag is None or self._stopped:
            return
        await self._queue.channel.set_qos(prefetch_count=prefetch)
        self.prefetch = prefetch
        old, self._tag = self._tag, await self._queue.consume(self._run)
        with contextlib.suppress(ChannelInvalidStateError):
            await self._queue.cancel(old)

    async def cancel(self) -> None:
        """Take no more messages (those in flight carry on)."""
        self._stopped = True
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        if self._queue is not None and self._tag is not None and not self._queue.channel.is_closed:
            with contextlib.suppress(ChannelInvalidStateError, *LOST):
                await self._queue.cancel(self._tag)

    async def drain(self, grace_s: float = STOP_GRACE_S) -> None:
        """Wait up to `grace_s` for the messages in flight to finish; then
        cancel what is left, so nothing is published for a message whose
        channel is about to close (the broker hands it to another consumer,
        which answers it once)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), grace_s)
        if self._tasks:
            log.warning("stopping: handlers still running cancelled", count=len(self._tasks))
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def close(self) -> None:
        """Close the channel (unacked messages go back to the queue)."""
        if self._channel is not None and not self._channel.is_closed:
            with contextlib.suppress(*LOST, ChannelClosed):
                await self._channel.close()

    async def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """Take no more messages; wait up to `grace_s` for those in flight; close."""
        await self.cancel()
        await self.drain(grace_s)
        await self.close()

    async def _watch_channel(self) -> None:
        """Start again on a new channel when, while the connection is up, the
        channel stays closed or no longer carries this consumer."""
        strikes = 0
        while not self._stopped:
            await asyncio.sleep(WATCH_S)
            connected = getattr(self.connection, "connected", None)
            up = not isinstance(connected, asyncio.Event) or connected.is_set()
            strikes = strikes + 1 if up and not await self._consuming() else 0
            if strikes < WATCH_STRIKES or self._stopped:
                continue
            channel = self._channel
            log.warning("consumer lost its channel; starting again", queue=self.queue_name)
            try:
                if channel is not None:
                    await _discard(channel)
                await self._open()
                strikes = 0
            except (*LOST, ChannelClosed) as exc:
                log.warning("consumer channel not reopened yet", error=str(exc))

    async def _consuming(self) -> bool:
        """Whether the broker is delivering to this consumer right now."""
        channel = self._channel
        if channel is None or channel.is_closed:
            return False
        try:
            underlay = await asyncio.wait_for(channel.get_underlay_channel(), WATCH_S)
        except (TimeoutError, *LOST, ChannelClosed, RuntimeError):
            return False
        consumers: dict[str, Any] = getattr(underlay, "consumers", {})
        return self._tag in consumers

    async def _run(self, message: AbstractIncomingMessage) -> None:
        """Handle the message in a task of our own. The client library runs
        each delivery in a task it cancels when the channel closes (a broker
        restart): a handler cut off there would drop a provider call already
        billed. Ours runs on; its publishes wait for the broker to be back."""
        self._in_flight += 1
        self._idle.clear()
        task = asyncio.create_task(self._handle(message))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handle(self, message: AbstractIncomingMessage) -> None:
        try:
            await self._handler(message)
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()


class GroupedAcks:
    """Acks for a consumer that finishes its messages in the order they were
    delivered (the reply inboxes): one `multiple` ack for all the messages
    finished within `linger_s`, instead of a frame, and work for the broker,
    per message. A message whose handling awaits something is `holding()`
    the acks meanwhile, so none is acked before it is done. Acks are off
    the answer's path: a reply lost with its channel before its ack is
    delivered again, and a second copy of an answer is dropped."""

    def __init__(self, linger_s: float = 0.005, max_pending: int = 64) -> None:
        self.linger_s = linger_s
        self.max_pending = max_pending
        self._last: AbstractIncomingMessage | None = None
        self._pending = 0
        self._holding = 0
        self._timer: asyncio.TimerHandle | None = None
        self._sending: set[asyncio.Task[bool]] = set()
        # The channel of the last ack sent, and the tag it went up to: a
        # message at or below it is acked already (acking it again is a
        # channel error).
        self._acked: tuple[object, int] | None = None

    def done(self, message: AbstractIncomingMessage) -> None:
        """`message` is done (call it while `holding()`, for one held): it
        is acked with the next group, by the latest message done on its
        channel."""
        channel, tag = _channel_of(message), message.delivery_tag or 0
        if channel is None:
            return  # its channel is gone: the broker delivers it again
        acked = self._acked
        if acked is not None and acked[0] is channel and tag <= acked[1]:
            return  # a multiple ack already covered it
        last = self._last
        if last is not None and _channel_of(last) is channel and (last.delivery_tag or 0) > tag:
            self._pending += 1  # an earlier message, finished late: the later one covers it
            return
        self._last = message
        self._pending += 1
        if self._pending >= self.max_pending:
            self._flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.linger_s, self._flush)

    @contextlib.asynccontextmanager
    async def holding(self) -> AsyncIterator[None]:
        """No ack goes out while this runs (the message it handles is not done)."""
        self._holding += 1
        try:
            yield
        finally:
            self._holding -= 1
            if self._holding == 0 and self._last is not None and self._timer is None:
                self._flush()

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._holding or self._last is None:
            return  # the message being held acks them all once it is done
        last, self._last, self._pending = self._last, None, 0
        channel = _channel_of(last)
        if channel is None:
            return  # gone with its channel: nothing to ack, all of it comes again
        self._acked = (channel, last.delivery_tag or 0)
        task = asyncio.ensure_future(_ack_through(last))
        self._sending.add(task)  # the loop keeps only weak references to tasks
        task.add_done_callback(self._sending.discard)


def _channel_of(message: AbstractIncomingMessage) -> object | None:
    """The channel a message came on, or None once that channel is closed
    (aio-pika raises then)."""
    try:
        return message.channel
    except ChannelInvalidStateError:
        return None


async def _ack_through(message: AbstractIncomingMessage) -> bool:
    """Ack `message` and every earlier one on its channel; False when the
    channel is gone (the broker delivers them again)."""
    try:
        await message.ack(multiple=True)
        return True
    except (MessageProcessError, *LOST, ChannelClosed):
        return False


def resent(message: AbstractIncomingMessage) -> bool:
    """Whether the message may be a second copy of one the broker already
    held: delivered again, or sent again after a lost confirm."""
    return bool(message.redelivered) or bool((message.headers or {}).get(RESENT_HEADER))


def guarded(handler: Handler) -> Handler:
    """Wrap a consumer so a bug in it requeues the message instead of leaving it
    unacked forever (which would silently shrink the prefetch window). A message
    that fails every time is dead-lettered by the queue's delivery limit."""

    async def run(message: AbstractIncomingMessage) -> None:
        try:
            await handler(message)
        except Exception:
            log.exception("handler failed; message requeued", message_id=message.correlation_id)
            await settle(message, requeue=True)

    return run


async def settle(message: AbstractIncomingMessage, *, requeue: bool | None = None) -> bool:
    """Ack (`requeue` None) or reject a message; False when its channel is
    gone, in which case the broker has already put it back for redelivery.

    A reject, not a nack: newer RabbitMQ counts only rejects (and lost
    consumers) towards a quorum queue's delivery limit."""
    try:
        if requeue is None:
            await message.ack()
        else:
            await message.reject(requeue=requeue)
        return True
    except (MessageProcessError, *LOST, ChannelClosed):
        return False
