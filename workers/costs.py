"""Publishing cost events in batches.

Every job waits until its own event is confirmed by the broker before the job
is acked, so batching adds no risk: a crash before the confirm redelivers the
job. It only trades a millisecond or two of ack delay (never result delay) for
one publish per batch instead of one per call.
"""

from __future__ import annotations

from modelyard.batching import Batcher
from modelyard.broker import Broker
from schemas.codec import encode
from schemas.costs import CostBatch, CostEvent


class CostPublisher:
    """Collects events for up to `linger_s` or `max_batch` events, then publishes."""

    def __init__(self, broker: Broker, max_batch: int = 200, linger_s: float = 0.002) -> None:
        self.broker = broker
        self._batches: Batcher[str, CostEvent | str] = Batcher(
            self._send, max_items=max_batch, linger_s=linger_s
        )

    async def publish(self, event: CostEvent) -> None:
        """Return once `event` is confirmed by the broker (raises if the publish failed)."""
        await self._batches.add("cost", event)

    async def release(self, reservation: str) -> None:
        """Tell the ledger a job ended without a billed last call, so its
        budget reservation is released; returns once confirmed."""
        await self._batches.add("cost", reservation)

    async def _send(self, _key: str, items: list[CostEvent | str]) -> None:
        events = [item for item in items if isinstance(item, CostEvent)]
        releases = [item for item in items if isinstance(item, str)]
        body = encode(CostBatch(events=events, releases=releases))
        first = events[0].job_id if events else releases[0]
        await self.broker.cost(body, correlation_id=first)
