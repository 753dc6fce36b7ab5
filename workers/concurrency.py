"""A deployment's `max_concurrent` calls, held across every worker process.

Each worker holds a lease on some of the deployment's call slots in Postgres
(`concurrency_leases`: deployment, worker, slots, expires_at) and never has
more calls in flight there than it holds. Leases are taken and given back a
few slots at a time, not per call: a worker that has callers waiting asks
for more (only what no live lease holds), one with slots idle for a while
gives them back, and every lease is renewed while its worker lives. The sum
of live leases never passes `max_concurrent`; a worker that dies strands its
slots only until its lease expires (`LEASE_S`), after which another worker
may take them. A worker whose lease expired without renewal (it lost the
database) stops starting calls until it holds a lease again.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import structlog

from modelyard.database import TRANSIENT, Conn, Database
from workers.lanes import SlotsClosed

log = structlog.get_logger("modelyard.concurrency")

# A lease lives this long unless renewed; renewed every third of it.
LEASE_S = 15.0
# Slots a worker may keep idle before giving them back.
IDLE_S = 2.0
# The least time between two lease changes of one worker (waiting callers
# wake the keeper; this keeps them from hammering the database).
MIN_GAP_S = 0.2

_GRAB = """
WITH held AS (
    SELECT coalesce(sum(slots), 0) AS slots FROM concurrency_leases
    WHERE deployment = $1 AND worker <> $2 AND expires_at > now()
)
INSERT INTO concurrency_leases AS l (deployment, worker, slots, expires_at)
SELECT $1, $2, greatest(least($3, $4 - held.slots), 0), now() + make_interval(secs => $5)
FROM held
ON CONFLICT (deployment, worker) DO UPDATE
    SET slots = excluded.slots, expires_at = excluded.expires_at
RETURNING slots
"""
_LOCK = "SELECT pg_advisory_xact_lock(hashtext('modelyard.concurrency:' || $1))"


class ConcurrencyLease:
    """One worker's share of one deployment's call slots."""

    def __init__(self, db: Database, deployment: str, worker: str, maximum: int) -> None:
        self.db = db
        self.deployment = deployment
        self.worker = worker
        self.maximum = maximum
        self.held = 0  # slots leased by this process
        self.in_use = 0
        self.waiting = 0
        self.valid_until = 0.0  # monotonic
        self._changed = asyncio.Condition()
        self._wanted = asyncio.Event()  # callers wait: the keeper should ask for more
        self._idle_since = time.monotonic()
        self._closed = False
        self._keeper: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Keep the lease renewed (and grown or shrunk) in the background."""
        self._keeper = asyncio.create_task(self._keep())

    async def close(self) -> None:
        """The worker is stopping: callers still waiting give up
        (`SlotsClosed`); calls in flight keep their slots, and the lease
        keeps being renewed until `release`."""
        self._closed = True
        async with self._changed:
            self._changed.notify_all()
        self._wanted.set()

    async def release(self) -> None:
        """Give the lease back (once no call of this worker is in flight)."""
        if self._keeper is not None:
            self._keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keeper
        with contextlib.suppress(*TRANSIENT):
            await self.db.run(self._release_all, what="lease release", give_up_after_s=2)

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one of the deployment's call slots for the block."""
        async with self._changed:
            self.waiting += 1
            try:
                while not self._free():
                    if self._closed:
                        raise SlotsClosed("the worker is stopping")
                    self._wanted.set()  # the keeper asks for more
                    await self._changed.wait()
            finally:
                self.waiting -= 1
            self.in_use += 1
        try:
            yield
        finally:
            async with self._changed:
                self.in_use -= 1
                if self.in_use == 0:
                    self._idle_since = time.monotonic()
                self._changed.notify_all()

    def _free(self) -> bool:
        return self.in_use < self.held and time.monotonic() < self.valid_until

    async def _keep(self) -> None:
        """Renew every LEASE_S / 3, or at once when callers wait for slots."""
        while True:
            try:
                await self._renew()
            except (*TRANSIENT, ConnectionError) as exc:  # the lease runs out
                log.warning("concurrency lease not renewed", error=str(exc))
            await asyncio.sleep(MIN_GAP_S)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wanted.wait(), LEASE_S / 3)
            self._wanted.clear()

    async def _renew(self) -> None:
        busy = self.in_use + self.waiting
        idle = busy == 0 and time.monotonic() - self._idle_since > IDLE_S
        # Keep what is held while busy (no churn), grow to what is wanted,
        # give everything back once idle for a while.
        wanted = 0 if idle else min(max(busy, self.held), self.maximum)
        asked = time.monotonic()
        granted = await self.db.run(
            lambda conn: self._grab(conn, wanted), what="concurrency lease", give_up_after_s=5
        )
        async with self._changed:
            self.held = granted
            self.valid_until = asked + LEASE_S
            self._changed.notify_all()

    async def _grab(self, conn: Conn, wanted: int) -> int:
        await conn.execute(_LOCK, self.deployment)  # one lease change at a time
        slots = await conn.fetchval(
            _GRAB, self.deployment, self.worker, wanted, self.maximum, LEASE_S
        )
        return max(int(slots), 0)

    async def _release_all(self, conn: Conn) -> None:
        await conn.execute(
            "DELETE FROM concurrency_leases WHERE deployment = $1 AND worker = $2",
            self.deployment,
            self.worker,
        )
