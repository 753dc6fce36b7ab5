"""Per-deployment rate limits that hold across every worker process.

A deployment's `rpm` and `tpm` are shared through Postgres without a
database round trip per call: a worker leases a slice of capacity (a few
requests and their tokens) and spends it locally; when the slice is spent
it leases another. Leases are counted in the sliding minute of
`modelyard/ratewindow.py`, so no 60 seconds ever see more calls than the
limit, whatever the number of workers. A slice is good only until shortly
before the end of the bucket it was counted in (unused, it is forfeited),
and the window it is counted in is one bucket longer than a minute needs:
a call that reaches the provider late (a busy host, a slow connection) is
still inside the window that paid for it.

When the window is full the worker waits for a bucket to fall out of it,
holding the job's message unacked: the job stays in the broker (another
worker gets it if this one dies), and at most `concurrency` jobs wait in a
worker. A 429 with a retry-after holds every call to that deployment in this
process until then.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time

import structlog

from modelyard import ratewindow
from modelyard.database import Conn, Database
from schemas.results import RateLimits
from workers.lanes import SlotsClosed

log = structlog.get_logger("modelyard.ratelimit")

# A lease stops this long before its bucket ends: a call it pays for must
# reach the provider (and be counted there) within the bucket.
LEASE_MARGIN_S = 0.25
# How much of a deployment's limit one lease takes at most.
SLICE_SHARE = 0.02


class Lease:
    """Capacity this process may spend until `until` (monotonic)."""

    def __init__(self, requests: int = 0, tokens: int = 0, until: float = 0.0) -> None:
        self.requests, self.tokens, self.until = requests, tokens, until


class DeploymentLimiter:
    """One deployment's shared `rpm` / `tpm`, as seen by one worker process."""

    def __init__(self, db: Database, deployment: str, rpm: int | None, tpm: int | None) -> None:
        self.db = db
        self.deployment = deployment
        self.rpm, self.tpm = rpm, tpm
        self._lease = Lease()
        self._lock = asyncio.Lock()
        self._held_until = 0.0  # monotonic: the provider asked us to wait
        self._closed = asyncio.Event()

    def close(self) -> None:
        """The worker is stopping: calls still waiting for capacity give up
        (`SlotsClosed`), and their jobs go back to the queue unstarted."""
        self._closed.set()

    def slow_down(self, seconds: float) -> None:
        """The provider answered 429 asking for `seconds`: no call before then."""
        self._held_until = max(self._held_until, time.monotonic() + seconds)

    async def acquire(self, tokens: int) -> None:
        """Wait until one call of about `tokens` tokens may be made."""
        async with self._lock:  # one lease at a time; callers queue in order
            while True:
                if self._closed.is_set():
                    raise SlotsClosed("the worker is stopping")
                now = time.monotonic()
                if now < self._held_until:
                    await self._pause(self._held_until - now)
                    continue
                lease = self._lease
                if now < lease.until and lease.requests >= 1 and lease.tokens >= tokens:
                    lease.requests -= 1
                    lease.tokens -= tokens
                    return
                wait = await self._renew(tokens)
                if wait > 0:
                    await self._pause(wait)

    async def _pause(self, seconds: float) -> None:
        """Sleep, unless the worker stops first."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closed.wait(), seconds)

    async def _renew(self, tokens: int) -> float:
        """Lease a new slice; the seconds to wait when none is left."""
        want_requests = max(1, math.floor((self.rpm or 0) * SLICE_SHARE)) if self.rpm else 1_000_000
        want_tokens = max(tokens, math.floor((self.tpm or 0) * SLICE_SHARE)) if self.tpm else 10**12
        asked_at = time.monotonic()
        granted, bucket_end_in = await self.db.run(
            lambda conn: self._take(conn, want_requests, want_tokens, tokens),
            what="rate limit lease",
        )
        if granted is None:
            # Too late in this bucket, or full: the oldest bucket of the
            # window leaves it at the end of this one.
            return bucket_end_in + 0.01
        requests, leased_tokens = granted
        # Spent only until shortly before its bucket ends (counted from
        # before the lease was asked for, so never later), so every call it
        # pays for reaches the provider inside that bucket.
        self._lease = Lease(requests, leased_tokens, asked_at + bucket_end_in - LEASE_MARGIN_S)
        return 0.0

    async def _take(
        self, conn: Conn, requests: int, tokens: int, minimum_tokens: int
    ) -> tuple[tuple[int, int] | None, float]:
        """The slice granted (None: none), and the seconds left in its bucket,
        both by the database's clock."""
        bucket, bucket_end_in = ratewindow.bucket_at(await ratewindow.clock(conn))
        if bucket_end_in <= LEASE_MARGIN_S:
            return None, bucket_end_in - 0.009  # too late in this bucket: lease from the next
        # Every worker of the deployment queues on its bucket: leases are serial.
        window = await ratewindow.lock(
            conn, self.deployment, bucket, ratewindow.LATE_WINDOW_BUCKETS
        )
        free_requests = (self.rpm - window.requests) if self.rpm else requests
        free_tokens = (self.tpm - window.tokens) if self.tpm else tokens
        grant_requests = min(requests, free_requests)
        grant_tokens = min(tokens, free_tokens)
        if grant_requests < 1 or grant_tokens < minimum_tokens:
            return None, bucket_end_in
        await ratewindow.add(
            conn,
            self.deployment,
            bucket,
            grant_requests if self.rpm else 0,
            grant_tokens if self.tpm else 0,
        )
        return (grant_requests, grant_tokens), bucket_end_in


def exhausted_reset_s(limits: RateLimits | None, tokens: int = 1) -> float | None:
    """How long a provider that said no requests or no tokens are left
    takes to have room for this call again: for each empty bucket, the time
    it takes to refill by one request or by the call's `tokens` (its reset
    is the time to refill completely: the reset over the limit per unit),
    the longer of the two; None when it said neither."""
    if limits is None:
        return None
    waits = []
    if (one_request := refill_wait(limits)) is not None:
        waits.append(one_request)
    if limits.remaining_tokens == 0 and limits.reset_tokens_s:
        share = min(tokens / limits.limit_tokens, 1.0) if limits.limit_tokens else 1.0
        waits.append(limits.reset_tokens_s * share)
    return max(waits) if waits else None


def refill_wait(limits: RateLimits | None) -> float | None:
    """How long to pause a deployment whose answer said no requests are left:
    the time its bucket takes to refill by one (its reset is the time to
    refill completely, so the reset over the limit); None when it has room."""
    if limits is None or limits.remaining_requests != 0 or not limits.reset_requests_s:
        return None
    return limits.reset_requests_s / max(limits.limit_requests or 1, 1)
