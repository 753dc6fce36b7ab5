"""What this worker process has already answered, so a message that comes
back to it is not run (and billed) a second time.

When the broker restarts, or a channel closes, every message a worker holds
goes back to its queue, and the ack of a job answered meanwhile is lost with
the channel: the broker hands the same message out again. The answer and its
cost event were confirmed (the broker facade republishes them after a
reconnect), so the repeat needs no provider call. A job is remembered from
the moment it starts until its message is acked, or for `KEEP_S` when the ack
was lost (the repeat may go to another worker, which cannot know).
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager

KEEP_S = 600.0


class Answers:
    """Job ids running or answered in this process."""

    def __init__(self, keep_s: float = KEEP_S) -> None:
        self.keep_s = keep_s
        self._running: dict[str, asyncio.Future[None]] = {}
        self._done: OrderedDict[str, float] = OrderedDict()

    @asynccontextmanager
    async def once(self, job_id: str, *, repeat: bool) -> AsyncIterator[bool]:
        """Yield True when the job should run here; False when it is a
        `repeat` of one this process answered (after waiting for a copy
        still running). A copy that is not a repeat always runs: a producer
        may reuse an id on purpose. The job counts as answered only when the
        block exits without an exception."""
        if repeat:
            while (running := self._running.get(job_id)) is not None:
                await asyncio.shield(running)
            if job_id in self._done:
                yield False
                return
        if job_id in self._running:  # a second fresh copy in flight: not tracked
            yield True
            return
        finished: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._running[job_id] = finished
        try:
            yield True
            self._remember(job_id)
        finally:
            del self._running[job_id]
            finished.set_result(None)

    def forget(self, job_ids: Iterable[str]) -> None:
        """The jobs' message was acked: no repeat can come from the broker."""
        for job_id in job_ids:
            self._done.pop(job_id, None)

    def _remember(self, job_id: str) -> None:
        now = time.monotonic()
        self._done[job_id] = now
        self._done.move_to_end(job_id)
        while self._done:
            oldest, at = next(iter(self._done.items()))
            if now - at <= self.keep_s:
                break
            del self._done[oldest]
