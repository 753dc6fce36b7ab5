"""Deployment health reports: what workers saw of each deployment lately.

Every worker process publishes a `HealthReport` on the `modelyard.health`
fan-out exchange every fraction of a second, and every router (and the HTTP
gateway) keeps the latest report of each worker. A report carries the
worker's whole recent window, in one-second buckets, rather than a delta
since the last report: a router that starts late, or missed reports, knows
as much as the others after the next one, and two routers fed the same
reports make the same choice.
"""

from __future__ import annotations

import msgspec

from schemas.chat import Int64

HEALTH_VERSION = 1


class Bucket(msgspec.Struct, array_like=True):
    """One second of calls to one deployment, as seen by one worker:
    `second` is the unix second; `faults` the calls that failed for a reason
    that is the deployment's, not the job's (rate limits, overload, server
    errors, timeouts, auth); `latency_ms` is summed over successful calls."""

    second: Int64
    calls: Int64
    ok: Int64
    faults: Int64
    latency_ms: float


class DeploymentHealth(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One worker's view of one deployment."""

    deployment: str
    buckets: list[Bucket] = msgspec.field(default_factory=list)
    # Calls in progress now.
    in_flight: Int64 = 0
    # The provider asked not to be called before this unix time (a 429 with
    # retry-after).
    blocked_until: float | None = None
    # The provider's last word on its headroom, from its rate-limit headers.
    remaining_requests: Int64 | None = None
    remaining_tokens: Int64 | None = None


class HealthReport(msgspec.Struct, kw_only=True):
    """One worker process's recent view of the deployments of its pool."""

    source: str  # the worker process's instance id
    pool: str
    sent_at: float
    deployments: list[DeploymentHealth]
    # Messages waiting on the pool's two queues when the report was made.
    queued: Int64 = 0
    v: Int64 = HEALTH_VERSION
