"""Sliding-minute counting in Postgres, shared by every process: the
per-deployment limits of workers (`workers/ratelimit.py`) and the per-key
and per-team limits of admission (`router/admission.py`).

Requests and tokens are counted per subject (a deployment, `key:<id>`,
`team:<name>`) in `BUCKET_S`-second buckets. Any 60-second span touches at
most `WINDOW_BUCKETS` consecutive buckets, so whoever adds to the current
bucket only while the last `WINDOW_BUCKETS` (it included) stay within the
limit keeps every 60 seconds within it. Buckets are told by the database's
clock (`clock`), so hosts whose clocks disagree still count in the same
ones. Callers lock the subject's current bucket row first: everyone
counting against one subject queues there.

What is counted ahead of the event it pays for (a worker's lease, spent by
calls that reach the provider a moment later) asks for `LATE_WINDOW_BUCKETS`:
one bucket more, so a call that arrives up to a bucket after the one that
paid for it still falls inside the window that counted it.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from typing import NamedTuple

from modelyard.database import Conn

BUCKET_S = 5
# 60 s spans 12 buckets, and can touch 13 consecutive ones.
WINDOW_BUCKETS = math.ceil(60 / BUCKET_S) + 1
LATE_WINDOW_BUCKETS = WINDOW_BUCKETS + 1

_OPEN = "INSERT INTO rate_usage (deployment, bucket) VALUES ($1, $2) ON CONFLICT DO NOTHING"
_PRUNE = "DELETE FROM rate_usage WHERE deployment = $1 AND bucket < $2::timestamptz - $3::interval"
_LOCK = "SELECT 1 FROM rate_usage WHERE deployment = $1 AND bucket = $2 FOR UPDATE"
_SUM = """
SELECT coalesce(sum(requests), 0) AS requests, coalesce(sum(tokens), 0) AS tokens,
       min(bucket) FILTER (WHERE requests > 0 OR tokens > 0) AS oldest
FROM rate_usage WHERE deployment = $1 AND bucket >= $2::timestamptz - $3::interval
"""
_ADD = (
    "UPDATE rate_usage SET requests = requests + $3, tokens = tokens + $4 "
    "WHERE deployment = $1 AND bucket = $2"
)


class Window(NamedTuple):
    """A subject's last minute, as counted, with its current bucket locked."""

    bucket: datetime  # the current bucket's start
    buckets: int  # how many buckets it spans, the current one included
    requests: int
    tokens: int
    oldest: datetime | None  # the oldest bucket with anything in it


async def clock(conn: Conn) -> float:
    """The database's time (unix seconds): the one clock every process
    counts buckets by, whatever its own host's clock says."""
    return float(await conn.fetchval("SELECT extract(epoch FROM clock_timestamp())"))


def bucket_at(wall: float) -> tuple[datetime, float]:
    """The bucket `wall` (unix seconds) falls in, and the seconds left in it."""
    start = math.floor(wall / BUCKET_S) * BUCKET_S
    return datetime.fromtimestamp(start, UTC), start + BUCKET_S - wall


async def lock(conn: Conn, subject: str, bucket: datetime, buckets: int = WINDOW_BUCKETS) -> Window:
    """Lock `subject`'s current bucket and read its window of `buckets`
    buckets (in the caller's transaction)."""
    await conn.execute(_OPEN, subject, bucket)
    await conn.execute(_PRUNE, subject, bucket, timedelta(minutes=10))
    await conn.execute(_LOCK, subject, bucket)
    span = timedelta(seconds=(buckets - 1) * BUCKET_S)
    row = await conn.fetchrow(_SUM, subject, bucket, span)
    assert row is not None
    return Window(bucket, buckets, int(row["requests"]), int(row["tokens"]), row["oldest"])


async def add(conn: Conn, subject: str, bucket: datetime, requests: int, tokens: int) -> None:
    """Count `requests` and `tokens` in `subject`'s current bucket."""
    await conn.execute(_ADD, subject, bucket, requests, tokens)


def reopens_in(window: Window, now: float) -> float:
    """Seconds until the oldest counted bucket leaves the window (room again)."""
    if window.oldest is None:
        return float(BUCKET_S)
    leaves = window.oldest.timestamp() + window.buckets * BUCKET_S
    return max(leaves - now, 0.0) + 0.01
