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
INSERT INTO job_claims (job_id, routed_at, repeat)
SELECT * FROM unnest($1::text[], $2::float8[], $3::bool[])
ON CONFLICT (job_id) DO NOTHING
RETURNING job_id
"""
_EARLIER = "SELECT job_id, routed_at, repeat FROM job_claims WHERE job_id = ANY($1::text[])"
_RELEASE = """
DELETE FROM job_claims AS c
USING unnest($1::text[], $2::float8[]) AS r(job_id, routed_at)
WHERE c.job_id = r.job_id AND c.routed_at = r.routed_at
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

    async def close(self) -> None:
        """Close the pool."""
        if self._pool is not None:
            await self._pool.close()

    async def repeats(self, jobs: list[CompletionJob], *, resent: bool = False) -> set[str]:
        """Claim the jobs; return the ids of those to skip because another
        copy of the same attempt claimed it first and will answer it:

        - a copy the router marked a repeat, claimed by another routing;
        - a copy the router did not mark, claimed by a marked repeat of
          another routing (the repeat reached a worker first);
        - any copy of a message `resent` after a lost confirm.

        One INSERT per message; the earlier claims are read only when some
        were taken. Never raises: on any database trouble nothing is skipped."""
        pool = await self._connected()
        if pool is None or not jobs:
            return set()
        keys = [attempt_key(job) for job in jobs]
        stamps = [_stamp(job) for job in jobs]
        marks = [job.redelivered for job in jobs]
        try:
            async with asyncio.timeout(CLAIM_TIMEOUT_S), pool.acquire() as conn:
                taken = {row["job_id"] for row in await conn.fetch(_CLAIM, keys, stamps, marks)}
                clashes = [key for key in keys if key not in taken]
                rows = await conn.fetch(_EARLIER, clashes) if clashes else []
                if not clashes:
                    await self._maybe_prune(conn)
        except (*TRANSIENT, ValueError) as exc:
            log.warning("job claims unavailable; jobs run unchecked", error=str(exc))
            return set()
        earlier = {row["job_id"]: (row["routed_at"], row["repeat"]) for row in rows}
        return {
            job.id
            for job, key, stamp in zip(jobs, keys, stamps, strict=True)
            if key in earlier and _answered_elsewhere(job, stamp, *earlier[key], resent=resent)
        }

    async def release(self, jobs: list[CompletionJob]) -> None:
        """Give up the claims of jobs handed back unstarted, so the copy that
        carries them on is never taken for a repeat. Best effort."""
        pool = await self._connected()
        if pool is None or not jobs:
            return
        try:
            async with asyncio.timeout(CLAIM_TIMEOUT_S), pool.acquire() as conn:
                await conn.execute(
                    _RELEASE, [attempt_key(job) for job in jobs], [_stamp(job) for job in jobs]
                )
        except (*TRANSIENT, ValueError) as exc:
            log.warning("job claims not released", error=str(exc))

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
            except (*TRANSIENT, ValueError) as exc:  # down, restarting, or a bad URL
                log.warning("job claims unavailable; jobs run unchecked", error=str(exc))
            return self._pool

    async def _maybe_prune(self, conn: asyncpg.pool.PoolConnectionProxy) -> None:
        now = time.monotonic()
        if now >= self._next_prune:
            self._next_prune = now + PRUNE_EVERY_S
            await conn.execute(_PRUNE)


def _stamp(job: CompletionJob) -> float:
    """Which routing this copy came from."""
    return job.route.routed_at if job.route else 0.0


def _answered_elsewhere(
    job: CompletionJob, stamp: float, routed_at: float, repeat: bool, *, resent: bool
) -> bool:
    """Whether the copy that claimed this attempt first answers it, so
    this one must not run."""
    if resent:
        return True
    if routed_at == stamp:  # the same routing, delivered again: it may not have finished
        return False
    return job.redelivered or repeat
