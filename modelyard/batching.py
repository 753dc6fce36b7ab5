"""Many items, one broker message: the batch lane's and the ledger feed's
way of paying the broker's per-message cost once per batch, not per job.

Each `add` returns only when the message holding its item is confirmed (or
raises if that publish failed), so a caller that acks its input afterwards
keeps the at-least-once guarantee: batching trades a few milliseconds of
delay for a fraction of the broker work, never safety.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable, Iterable
from typing import Any, Generic, TypeVar

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")


# Under RabbitMQ's own limit (`max_message_size`: 128 MiB in 3.x, 16 MiB
# from 4.0), with room for the envelope around the items: a message too large
# for the broker would fail every job in it, every time.
MAX_MESSAGE_BYTES = 15 * 1024 * 1024


Encoded = tuple[str, bytes]  # (job id, encoded body): what message batches carry


def encoded_size(item: Encoded) -> int:
    """What an encoded item adds to its batch message, for the byte cap."""
    return len(item[1])


class Batcher(Generic[K, T]):
    """Collects items per key for up to `linger_s`, `max_items` or (with
    `size`) `max_bytes`, then sends each key's items with `send(key, items)`.
    An item larger than `max_bytes` on its own travels alone."""

    def __init__(
        self,
        send: Callable[[K, list[T]], Awaitable[None]],
        *,
        max_items: int,
        linger_s: float,
        size: Callable[[T], int] | None = None,
        max_bytes: int = MAX_MESSAGE_BYTES,
    ) -> None:
        self._send = send
        self.max_items = max_items
        self.linger_s = linger_s
        self._size = size
        self.max_bytes = max_bytes
        self._open: dict[K, _Pending[T]] = {}
        self._sending: set[asyncio.Task[None]] = set()

    async def add(self, key: K, item: T) -> None:
        """Return once the message carrying `item` is confirmed."""
        # Shielded: one caller giving up must not cancel its neighbours' publish.
        await asyncio.shield(self.put(key, item))

    def put(self, key: K, item: T) -> asyncio.Future[None]:
        """Queue `item`; the future (shared by every item of its message, so
        never cancel it: shield it) settles when that message is confirmed."""
        size = self._size(item) if self._size is not None else 0
        pending = self._open.get(key)
        if pending is not None and pending.bytes + size > self.max_bytes:
            self._flush(key)
            pending = None
        if pending is None:
            loop = asyncio.get_running_loop()
            pending = self._open[key] = _Pending(loop.create_future())
            pending.timer = loop.call_later(self.linger_s, self._flush, key)
        sent = pending.sent
        pending.items.append(item)
        pending.bytes += size
        if len(pending.items) >= self.max_items or pending.bytes >= self.max_bytes:
            self._flush(key)
        return sent

    def _flush(self, key: K) -> None:
        pending = self._open.pop(key, None)
        if pending is None:
            return
        if pending.timer is not None:
            pending.timer.cancel()
        task = asyncio.ensure_future(self._send(key, pending.items))
        self._sending.add(task)  # the loop only keeps weak references to tasks
        task.add_done_callback(self._sending.discard)
        task.add_done_callback(lambda t: _settle(pending.sent, t))


class _Pending(Generic[T]):
    """One key's batch being filled."""

    def __init__(self, sent: asyncio.Future[None]) -> None:
        self.sent = sent
        self.items: list[T] = []
        self.bytes = 0
        self.timer: asyncio.TimerHandle | None = None


def _settle(sent: asyncio.Future[None], task: asyncio.Future[None]) -> None:
    """Pass the publish outcome to every caller waiting on this batch."""
    if sent.done():
        return
    if task.cancelled():
        sent.cancel()
    elif (error := task.exception()) is not None:
        sent.set_exception(error)
    else:
        sent.set_result(None)


async def settle_all(waits: Iterable[Awaitable[Any]]) -> None:
    """Wait for every one, then raise the first failure if any: a message
    holding many jobs is acked (or requeued) only once all of them settled."""
    outcomes = await asyncio.gather(*waits, return_exceptions=True)
    if failed := next((o for o in outcomes if isinstance(o, BaseException)), None):
        raise failed
