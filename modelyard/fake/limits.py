"""Rolling rate-limit usage, for the ``x-ratelimit-*`` headers real providers send.

Usage drains continuously at the per-minute limit (a leaky bucket), which is
how OpenAI's "remaining" and "reset" figures behave. The fake never enforces
these limits; rate limiting is injected with the fault settings instead.
"""

from __future__ import annotations

import time

REQUESTS_PER_MINUTE = 10_000
TOKENS_PER_MINUTE = 30_000_000


class Bucket:
    """Usage against one per-minute limit."""

    __slots__ = ("_at", "_level", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._level = 0.0
        self._at = time.monotonic()

    def take(self, amount: float, now: float) -> None:
        """Add amount of usage at monotonic time now, after draining since the last call."""
        drained = (now - self._at) * self.limit / 60
        self._level = max(self._level - drained, 0.0) + amount
        self._at = now

    def remaining(self) -> int:
        """What is left of the limit right now."""
        return max(self.limit - int(self._level + 0.5), 0)

    def reset_s(self) -> float:
        """Seconds until usage has fully drained."""
        return self._level * 60 / self.limit


class RateLimits:
    """Request and token buckets of one fake provider."""

    __slots__ = ("requests", "tokens")

    def __init__(
        self, requests: int = REQUESTS_PER_MINUTE, tokens: int = TOKENS_PER_MINUTE
    ) -> None:
        self.requests = Bucket(requests)
        self.tokens = Bucket(tokens)

    def take(self, tokens: int) -> None:
        """Count one request of tokens tokens."""
        now = time.monotonic()
        self.requests.take(1, now)
        self.tokens.take(tokens, now)
