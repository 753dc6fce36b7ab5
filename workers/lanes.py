"""Sharing a worker's provider-call slots between the two lanes.

A pool's concurrency is one budget for both lanes. When a slot frees up, a
waiting interactive job always gets it before a waiting batch job, so a large
batch can keep every slot busy without making an interactive caller wait
behind it for more than one provider call.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections import deque
from collections.abc import AsyncIterator

from schemas.jobs import Lane


class SlotsClosed(RuntimeError):
    """The worker is stopping: no new provider call may start."""


def batch_prefetch(concurrency: int, jobs_per_message: float) -> int:
    """How many batch messages a worker should hold so that every slot can be
    busy: enough of the batches arriving lately (small ones when batch work
    trickles in, full ones under load), plus one at hand; never more than the
    concurrency, never fewer than two."""
    wanted = math.ceil(concurrency / max(jobs_per_message, 1.0)) + 1
    return max(2, min(concurrency, wanted))


class Slots:
    """`size` concurrent provider calls; interactive waiters are served first."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._free = size
        self._queued = 0  # waiters in either lane, cancelled ones included until skipped
        self._closed = False
        self._waiting: dict[Lane, deque[asyncio.Future[None]]] = {
            "interactive": deque(),
            "batch": deque(),
        }

    @property
    def in_use(self) -> int:
        """Slots held right now."""
        return self.size - self._free

    @contextlib.asynccontextmanager
    async def take(self, lane: Lane) -> AsyncIterator[None]:
        """Hold one slot for the duration of the block."""
        await self._acquire(lane)
        try:
            yield
        finally:
            self._release()

    def close(self) -> None:
        """Refuse every waiting and future `take` with `SlotsClosed`; calls
        already holding a slot finish normally."""
        self._closed = True
        for queue in self._waiting.values():
            while queue:
                granted = queue.popleft()
                self._queued -= 1
                if not granted.done():
                    granted.set_exception(SlotsClosed("the worker is stopping"))

    async def _acquire(self, lane: Lane) -> None:
        if self._closed:
            raise SlotsClosed("the worker is stopping")
        if self._free > 0 and self._queued == 0:
            self._free -= 1
            return
        granted = asyncio.get_running_loop().create_future()
        self._waiting[lane].append(granted)
        self._queued += 1
        try:
            await granted
        except asyncio.CancelledError:
            if granted.done() and not granted.cancelled() and granted.exception() is None:
                self._release()  # handed a slot just as we were cancelled: pass it on
            else:
                with contextlib.suppress(ValueError):  # already skipped by a release
                    self._waiting[lane].remove(granted)
                    self._queued -= 1
            raise

    def _release(self) -> None:
        """Hand the slot to the next waiter, interactive first, or free it.
        (After `close` there are no waiters: the slot is simply freed.)"""
        for lane in ("interactive", "batch"):
            queue = self._waiting[lane]
            while queue:
                granted = queue.popleft()
                self._queued -= 1
                if not granted.done():
                    granted.set_result(None)
                    return
        self._free += 1
