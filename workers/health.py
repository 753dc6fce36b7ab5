"""What a worker saw of each deployment lately, for every router to read.

Each provider call is counted in one-second buckets per deployment (calls,
successes, faults, latency); a report (`schemas.health.HealthReport`) holds
the last `window_s` seconds of buckets, the calls in flight, and any wait the
provider asked for. The worker publishes one every `report_every_ms`, and at
once when a provider asks to be left alone (a 429 with `retry-after`), so
routers stop sending it work within milliseconds, not a report interval.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque

from schemas.errors import ErrorKind, JobError
from schemas.health import Bucket, DeploymentHealth, HealthReport
from schemas.results import RateLimits

# Failures that say something about the deployment rather than the job: a
# bad request or a content refusal is the job's, and cools nothing down.
DEPLOYMENT_FAULTS = frozenset(
    {
        ErrorKind.RATE_LIMITED,
        ErrorKind.OVERLOADED,
        ErrorKind.TIMEOUT,
        ErrorKind.SERVER_ERROR,
        ErrorKind.AUTH,
        ErrorKind.NOT_FOUND,
    }
)


class _Seen:
    """One deployment's recent calls, as this process saw them."""

    def __init__(self) -> None:
        self.buckets: deque[Bucket] = deque()
        self.in_flight = 0
        self.blocked_until: float | None = None
        self.remaining_requests: int | None = None
        self.remaining_tokens: int | None = None


class HealthRecorder:
    """Counts one worker process's calls per deployment; makes its reports."""

    def __init__(self, source: str, pool: str, deployments: list[str], window_s: int) -> None:
        self.source = source
        self.pool = pool
        self.window_s = window_s
        self._seen = {name: _Seen() for name in deployments}
        # Set when a report should go out now rather than at the next tick.
        self.urgent = asyncio.Event()

    def started(self, deployment: str) -> None:
        """A call to `deployment` begins."""
        self._seen[deployment].in_flight += 1

    def finished(
        self,
        deployment: str,
        *,
        now: float,
        error: JobError | None,
        latency_ms: float,
        limits: RateLimits | None,
    ) -> None:
        """A call to `deployment` ended (`error` None: it succeeded)."""
        seen = self._seen[deployment]
        seen.in_flight -= 1
        second = math.floor(now)
        if not seen.buckets or seen.buckets[-1].second != second:
            seen.buckets.append(Bucket(second, 0, 0, 0, 0.0))
        bucket = seen.buckets[-1]
        bucket.calls += 1
        if error is None:
            bucket.ok += 1
            bucket.latency_ms += latency_ms
        elif error.kind in DEPLOYMENT_FAULTS:
            bucket.faults += 1
        if limits is not None:
            seen.remaining_requests = limits.remaining_requests
            seen.remaining_tokens = limits.remaining_tokens
        wait = _asked_wait(error, limits)
        if wait is not None and wait > 0:
            until = now + wait
            if seen.blocked_until is None or until > seen.blocked_until:
                seen.blocked_until = until
                self.urgent.set()

    def report(self, now: float, queued: int = 0) -> HealthReport:
        """The last `window_s` seconds of every deployment of the pool."""
        oldest = math.floor(now) - self.window_s
        views = []
        for name, seen in self._seen.items():
            while seen.buckets and seen.buckets[0].second <= oldest:
                seen.buckets.popleft()
            if seen.blocked_until is not None and seen.blocked_until <= now:
                seen.blocked_until = None
            views.append(
                DeploymentHealth(
                    deployment=name,
                    buckets=list(seen.buckets),
                    in_flight=seen.in_flight,
                    blocked_until=seen.blocked_until,
                    remaining_requests=seen.remaining_requests,
                    remaining_tokens=seen.remaining_tokens,
                )
            )
        return HealthReport(
            source=self.source, pool=self.pool, sent_at=now, deployments=views, queued=queued
        )


def _asked_wait(error: JobError | None, limits: RateLimits | None) -> float | None:
    """Seconds a rate-limit refusal asked us to wait (its retry-after).

    Remaining requests at zero are not a request to wait: providers refill
    continuously, and their reset figure is the time to refill completely,
    far longer than the wait for the next request (the pool's own rate
    limiter is the place to slow down ahead of a 429)."""
    if error is None or error.kind != ErrorKind.RATE_LIMITED or not error.retryable:
        return None
    if error.retry_after_s is not None:
        return error.retry_after_s
    return limits.retry_after_s if limits is not None else None
