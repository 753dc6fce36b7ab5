"""Batch-lane job claims: a router crash must cost no provider call.

A router killed mid-routing leaves its input unacked; the next router routes
those jobs again, and some were already dispatched. Each such job then exists
twice on a pool's queue: the first copy, and a repeat the router marked
`redelivered`. Workers claim every batch-lane job id in Postgres, one
statement per message, before calling the provider, recording which routing
(`route.routed_at`) the copy came from. A copy is skipped, unanswered and
unbilled, when the router marked it a repeat and another routing of the same
attempt of the job claimed it first: that copy answers the job. (A job
retried or fallen back is claimed again for its next attempt.)

What still runs: a copy the broker hands out again after a worker died or
was stopped (same routing: it may not have finished), a job a producer
submits again on purpose (not marked by the router), and both copies when
they reach two workers within the same few milliseconds. While Postgres is
unreachable, claims are not checked (jobs are never held back for them) and
a repeat may run: the ledger still records every call.
"""

from __future__ import annotations

import asyncio
import time

import asyncpg
import structlog

from modelyard.database import TRANSIENT, create_pool
from schemas.jobs import CompletionJob

log = structlog.get_logger("modelyard.claims")

# A claim statement slower than this is abandoned (the jobs run unchecked):
# the batch lane never waits on a struggling database for long.
CLAIM_TIMEOUT_S = 2.0
# How often to try again to reach a database that was unreachable.
RECONNECT_EVERY_S = 5.0
# Claims older than this are pruned; a router's repeat comes within minutes.
KEEP = "1 day"
PRUNE_EVERY_S = 3600.0

_CLAIM = """
WITH claimed AS (
    INSERT INTO job_claims (job_id, routed_at)
    SELECT * FROM unnest($1::text[], $2::float8[])
    ON CONFLICT (job_id) DO NOTHING
)
SELECT job_id, routed_at FROM job_claims WHERE job_id = ANY($1::text[])
"""
# The statement's snapshot predates its own inserts: the SELECT sees only
# claims made before this one.
_CLAIM_ONLY = """
INSERT INTO job_claims (job_id, routed_at)
SELECT * FROM unnest($1::text[], $2::float8[])
ON CONFLICT (job_id) DO NOTHING
"""
_PRUNE = f"DELETE FROM job_claims WHERE claimed_at < now() - interval '{KEEP}'"


def attempt_key(job: CompletionJob) -> str:
    """What a claim is taken on: a job's next attempt. A job retried or
    fallen back comes back with one more attempt in its history, and is a
    new claim, not a repeat of the first."""
    return f"{job.id}#{len(job.attempts)}"


class Claims:
    """The claim table, as seen by one worker process."""

    def __init__(self, database_url: str) -> None:
        self.database_url = database_url
        self._pool: asyncpg.Pool | None = None
        self._connecting = asyncio.Lock()
        self._next_connect = 0.0
        self._next_prune = 0.0
        self.skipped = 0

    async def close(self) -> None:
        """Close the pool."""
        if self._pool is not None:
            await self._pool.close()

    async def repeats(self, jobs: list[CompletionJob], *, resent: bool = False) -> set[str]:
        """Claim the jobs; return the ids of those to skip: repeats whose
        first copy claimed them, and, when the message itself was `resent`
        after a lost confirm (not delivered again after a worker failed),
        every job some copy claimed already. Never raises: on any database
        trouble nothing is skipped."""
        pool = await self._connected()
        if pool is None or not jobs:
            return set()
        ids = [attempt_key(job) for job in jobs]
        stamps = [job.route.routed_at if job.route else 0.0 for job in jobs]
        # Only a copy the router marked as a repeat can be skipped, so only
        # then is the table read back: a fresh message costs one INSERT.
        check = resent or any(job.redelivered for job in jobs)
        try:
            async with asyncio.timeout(CLAIM_TIMEOUT_S), pool.acquire() as conn:
                if not check:
                    await conn.execute(_CLAIM_ONLY, ids, stamps)
                    await self._maybe_prune(conn)
                    return set()
                rows = await conn.fetch(_CLAIM, ids, stamps)
        except TRANSIENT as exc:
            log.warning("job claims unavailable; jobs run unchecked", error=str(exc))
            return set()
        earlier = {row["job_id"]: row["routed_at"] for row in rows}
        skip = {
            job.id
            for job, key, stamp in zip(jobs, ids, stamps, strict=True)
            if key in earlier and (resent or (job.redelivered and earlier[key] != stamp))
        }
        self.skipped += len(skip)
        return skip

    async def _connected(self) -> asyncpg.Pool | None:
        """The pool; None while the database cannot be reached (tried again
        every `RECONNECT_EVERY_S`). Messages arriving together wait for the
        same attempt."""
        async with self._connecting:
            if self._pool is not None:
                return self._pool
            now = time.monotonic()
            if now < self._next_connect:
                return None
            self._next_connect = now + RECONNECT_EVERY_S
            try:
                async with asyncio.timeout(CLAIM_TIMEOUT_S):
                    self._pool = await create_pool(self.database_url)
            except (ConnectionError, TimeoutError) as exc:
                log.warning("job claims unavailable; jobs run unchecked", error=str(exc))
            return self._pool

    async def _maybe_prune(self, conn: asyncpg.pool.PoolConnectionProxy) -> None:
        now = time.monotonic()
        if now >= self._next_prune:
            self._next_prune = now + PRUNE_EVERY_S
            await conn.execute(_PRUNE)
