"""The ledger process: cost events in, Postgres rows out, in batches.

Events are buffered up to `batch_size` or `flush_ms`, written in one
transaction, and acked only after the commit. While the database is down the
batch is retried with backoff and stays unacked, so a crash at any point
redelivers it and the idempotent insert absorbs the repeat.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from datetime import UTC, datetime

import structlog
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection
from aio_pika.exceptions import ChannelClosed, ChannelInvalidStateError, MessageProcessError

from ledger import store
from modelyard import budgets
from modelyard.broker import LOST, STOP_GRACE_S, Broker, Consumer, settle
from modelyard.config import Config
from modelyard.database import BAD_DATA, Database
from modelyard.metrics import LedgerMetrics, ProcessMetrics
from modelyard.topology import LEDGER_QUEUE, build_topology
from schemas.codec import InvalidMessage, decode_costs, encode
from schemas.costs import CostEvent

log = structlog.get_logger("modelyard.ledger")

# How soon to look again for expired reservations when the ledger was not
# caught up with its queue.
SWEEP_RETRY_S = 1.0


class Ledger:
    """Consumes `ledger.costs` and writes the ledger table."""

    def __init__(
        self,
        config: Config,
        connection: AbstractRobustConnection,
        metrics: ProcessMetrics | None = None,
    ) -> None:
        self.config = config
        self.connection = connection
        self.batch_size = config.ledger.batch_size
        self.flush_s = config.ledger.flush_ms / 1000
        self._buffer: list[AbstractIncomingMessage] = []
        self.metrics = (metrics or ProcessMetrics()).part(LedgerMetrics)
        self.metrics.buffered.set_function(lambda: len(self._buffer))
        self._full = asyncio.Event()
        self.db = Database(config.database_url)
        self._flusher: asyncio.Task[None] | None = None
        self.broker = Broker(connection)
        # Room for one batch being written and the next one filling.
        self._consumer = Consumer(
            connection, LEDGER_QUEUE, self._receive, prefetch=2 * self.batch_size
        )
        self._stopping = False
        self._partitions_month = ""
        self._next_sweep = 0.0
        self.written = 0

    async def start(self) -> None:
        """Connect to Postgres and the broker, then start consuming."""
        await self.db.open()
        await self._keep_partitions()
        await self.broker.declare(build_topology(self.config.pool_names()))
        self._flusher = asyncio.create_task(self._flush_forever())
        await self._consumer.start()
        log.info("ledger started", batch_size=self.batch_size, flush_ms=self.config.ledger.flush_ms)

    async def stop(self) -> None:
        """Take no more events, let the flusher write what is buffered (for up
        to the grace period), close. Anything unwritten stays unacked and is
        redelivered to the next ledger."""
        await self._consumer.cancel()
        self._stopping = True
        self._full.set()
        if self._flusher is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._flusher), STOP_GRACE_S)
            except TimeoutError:
                # Cut off mid-write: no later batch may be acked with `multiple`
                # (it would settle this one), so nothing more is flushed.
                self._flusher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._flusher
        await self._consumer.close()
        await self.broker.close()
        await self.db.close()

    def _channel_closed(self) -> bool:
        channel = self._consumer.channel
        return channel is None or channel.is_closed

    async def _receive(self, message: AbstractIncomingMessage) -> None:
        self._buffer.append(message)
        if len(self._buffer) >= self.batch_size:
            self._full.set()

    async def _flush_forever(self) -> None:
        """Flush every `flush_ms`, or at once when a batch is full, until stopped
        with an empty buffer. A pass that fails for an unforeseen reason keeps
        its batch buffered and is tried again: the flusher must never die."""
        while not (self._stopping and not self._buffer):
            if not self._stopping:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._full.wait(), self.flush_s)
            self._full.clear()
            try:
                await self._keep_partitions()
                await self._drain()
                await self._expire_reservations()
            except Exception:
                log.exception("ledger flush failed; retrying the same batch")
                await asyncio.sleep(1.0)
            if self._stopping and self._channel_closed():
                return

    async def _drain(self) -> None:
        """Flush buffered batches in delivery order; a batch leaves the buffer
        only once written and acked."""
        self._drop_orphans()
        while self._buffer and not self._channel_closed():
            batch = self._buffer[: self.batch_size]
            await self._flush(batch)
            del self._buffer[: len(batch)]

    def _drop_orphans(self) -> None:
        """Forget buffered messages whose channel is gone (a reconnect, a
        replaced channel): the broker has put them back and delivers them
        again, and they cannot be acked any more. Acking with `multiple` is
        then exact again: every buffered message is on the current channel."""
        live = [m for m in self._buffer if not _orphaned(m)]
        if len(live) != len(self._buffer):
            log.info(
                "events from a closed channel dropped; redelivered",
                count=len(self._buffer) - len(live),
            )
            self._buffer[:] = live

    async def _expire_reservations(self) -> None:
        """Now and then, return reservations nobody settled (a process died
        holding them) to their budgets. Only once every cost event waiting
        for the ledger is written: after an outage of the ledger, a
        reservation past its time may still have its cost on the way, and
        returning it first would let the budget be spent twice. Until then
        the budget stays reserved: it refuses more, it never spends more."""
        now = time.monotonic()
        if now < self._next_sweep:
            return
        if self._buffer or await self.broker.waiting([LEDGER_QUEUE]) != 0:
            self._next_sweep = now + SWEEP_RETRY_S  # not caught up (or cannot tell)
            return
        self._next_sweep = now + min(self.config.access.reservation_ttl_s / 4, 30.0)
        async with self.db.pool.acquire() as conn:
            await budgets.expire(conn)

    async def _keep_partitions(self) -> None:
        """At a month's turn, make sure this and next month's partitions exist."""
        month = datetime.now(UTC).strftime("%Y-%m")
        if month == self._partitions_month:
            return
        async with self.db.pool.acquire() as conn:
            await store.ensure_partitions(conn)
        self._partitions_month = month

    async def _flush(self, batch: list[AbstractIncomingMessage]) -> None:
        decoded: list[AbstractIncomingMessage] = []
        events: list[CostEvent] = []
        releases: list[str] = []
        for message in batch:
            try:
                costs = decode_costs(message.body)
            except InvalidMessage as exc:
                log.error("undecodable cost message dead-lettered", reason=str(exc))
                await settle(message, requeue=False)
                continue
            decoded.append(message)
            events += costs.events
            releases += costs.releases
        try:
            await self._write(events, releases)
        except BAD_DATA:
            # One bad row must not block the queue: find it, park it, keep the rest.
            events = await self._write_one_by_one(events)
            await self._write([], releases)
        self.written += len(events)
        self.metrics.events.inc(len(events))
        self.metrics.cost.inc(float(sum(e.cost or 0 for e in events)))
        if decoded:
            # Batches are flushed in delivery order, one at a time, so acking
            # the last tag with `multiple` settles exactly this batch. If the
            # channel went meanwhile, the batch is redelivered and the
            # idempotent insert absorbs it.
            with contextlib.suppress(*LOST, ChannelClosed, MessageProcessError):
                await decoded[-1].ack(multiple=True)

    async def _write_one_by_one(self, events: list[CostEvent]) -> list[CostEvent]:
        kept = []
        for event in events:
            try:
                await self._write([event])
            except BAD_DATA as exc:
                log.error("ledger rejected a cost event; dead-lettered", reason=str(exc))
                await self.broker.dead_letter(encode(event), f"ledger rejected: {exc}")
                self.metrics.rejected.inc()
            else:
                kept.append(event)
        return kept

    async def _write(self, events: list[CostEvent], releases: list[str] | None = None) -> None:
        """Write until it works: a down database delays the ledger, never
        loses it. Budgets that crossed their alert share are announced."""
        if not (events or releases):
            return
        with self.metrics.write_latency.time():
            alerts = await self.db.run(
                lambda conn: store.write_batch(conn, events, releases), what="ledger write"
            )
        for alert in alerts:
            log.warning(
                "budget alert: spend crossed its alert share",
                scope=alert.scope,
                subject=alert.subject,
                period=alert.period,
                spent=str(alert.spent),
                limit=str(alert.limit),
            )
            await self.broker.alert(encode(alert))


def _orphaned(message: AbstractIncomingMessage) -> bool:
    """Whether the channel a message came on is gone (it cannot be acked)."""
    try:
        return message.channel.is_closed
    except ChannelInvalidStateError:
        return True
