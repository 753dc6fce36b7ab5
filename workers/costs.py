"""Publishing cost events in batches.

Every job waits until its own event is confirmed by the broker before the job
is acked, so batching adds no risk: a crash before the confirm redelivers the
job. It only trades a millisecond or two of ack delay (never result delay) for
one publish per batch instead of one per call.
"""

from __future__ import annotations

import asyncio

from aio_pika.abc import AbstractExchange

from modelyard import broker
from schemas.codec import encode
from schemas.costs import CostBatch, CostEvent


class CostPublisher:
    """Collects events for up to `linger_s` or `max_batch` events, then publishes."""

    def __init__(
        self, exchange: AbstractExchange, max_batch: int = 200, linger_s: float = 0.002
    ) -> None:
        self.exchange = exchange
        self.max_batch = max_batch
        self.linger_s = linger_s
        self._events: list[CostEvent] = []
        self._sent: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None

    async def publish(self, event: CostEvent) -> None:
        """Return once `event` is confirmed by the broker (raises if the publish failed)."""
        if self._sent is None:
            self._sent = asyncio.get_running_loop().create_future()
            self._timer = asyncio.get_running_loop().call_later(self.linger_s, self._flush)
        sent = self._sent
        self._events.append(event)
        if len(self._events) >= self.max_batch:
            self._flush()
        await asyncio.shield(sent)

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        events, sent = self._events, self._sent
        self._events, self._sent, self._timer = [], None, None
        if sent is not None and events:
            task = asyncio.ensure_future(self._send(events))
            task.add_done_callback(lambda t: _settle(sent, t))

    async def _send(self, events: list[CostEvent]) -> None:
        body = encode(CostBatch(events=events))
        await self.exchange.publish(
            broker.message(body, correlation_id=events[0].job_id),
            routing_key="cost",
            mandatory=True,
        )


def _settle(sent: asyncio.Future[None], task: asyncio.Future[None]) -> None:
    """Pass the publish outcome to every job waiting on this batch."""
    if sent.done():
        return
    if task.cancelled():
        sent.cancel()
    elif (error := task.exception()) is not None:
        sent.set_exception(error)
    else:
        sent.set_result(None)
