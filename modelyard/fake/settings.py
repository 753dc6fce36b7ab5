"""What the fake provider should do, and the per-request roll of the dice.

Faults are drawn from a seeded RNG so that a failing test or a benchmark run
can be replayed: the same settings and the same sequence of valid requests
give the same sequence of faults.
"""

from __future__ import annotations

import random
from typing import Literal

import msgspec

Fault = Literal["rate_limit", "quota", "server_error", "overloaded", "hang", "malformed"]
"""The name a fault is logged under.

``rate_limit`` is a retryable 429, ``quota`` the non-retryable 429
(``insufficient_quota``), ``server_error`` a 500, ``overloaded`` a 503,
``hang`` a normal answer sent after ``hang_s``, ``malformed`` a 200 whose body
is not valid JSON.
"""


class FakeSettings(msgspec.Struct, forbid_unknown_fields=True):
    """Knobs of the fake provider; every rate is a share of requests in 0..1.

    The rates are exclusive: one uniform draw per request picks at most one
    fault, so their sum must not exceed 1. A prompt of more than
    ``context_window`` tokens gets the provider's context-length error.
    """

    latency_ms: float = 0
    jitter_ms: float = 0
    rate_429: float = 0
    retry_after_s: float = 1.0
    rate_quota: float = 0
    rate_500: float = 0
    rate_503: float = 0
    rate_hang: float = 0
    hang_s: float = 600
    rate_malformed: float = 0
    api_key: str | None = None
    seed: int = 0
    context_window: int = 128_000
    stream_gap_ms: float = 0
    # A misbehaving proxy: every request fails with a 400 whose body repeats
    # the API key in every field (for tests that keys never leak onward).
    echo_key: bool = False

    def __post_init__(self) -> None:
        """Reject settings the dice cannot honour (msgspec turns this into a ValidationError)."""
        rates = self.fault_rates()
        if any(not 0 <= rate <= 1 for _, rate in rates):
            raise ValueError("fault rates must be between 0 and 1")
        if sum(rate for _, rate in rates) > 1:
            raise ValueError("fault rates must add up to at most 1")
        if (
            min(
                self.latency_ms, self.jitter_ms, self.retry_after_s, self.hang_s, self.stream_gap_ms
            )
            < 0
        ):
            raise ValueError("durations must not be negative")
        if self.context_window < 1:
            raise ValueError("the context window must hold at least one token")

    def fault_rates(self) -> tuple[tuple[Fault, float], ...]:
        """Each fault with its rate, in the fixed order the dice use."""
        return (
            ("rate_limit", self.rate_429),
            ("quota", self.rate_quota),
            ("server_error", self.rate_500),
            ("overloaded", self.rate_503),
            ("hang", self.rate_hang),
            ("malformed", self.rate_malformed),
        )


class FaultDice:
    """Decides each request's fault and latency from RNGs seeded by the settings.

    Faults and jitter use separate RNGs, so turning jitter on does not change
    which requests fail.
    """

    def __init__(self, settings: FakeSettings) -> None:
        self.settings = settings
        self._faults = random.Random(settings.seed)
        self._jitter = random.Random(f"jitter:{settings.seed}")
        self._thresholds = _cumulative(settings.fault_rates())

    def draw(self) -> Fault | None:
        """The fault for the next request, or None; draws nothing when all rates are 0."""
        if not self._thresholds:
            return None
        roll = self._faults.random()
        for threshold, fault in self._thresholds:
            if roll < threshold:
                return fault
        return None

    def delay_s(self) -> float:
        """Seconds to wait before answering: latency plus or minus jitter, never negative."""
        latency_ms = self.settings.latency_ms
        jitter_ms = self.settings.jitter_ms
        if jitter_ms:
            latency_ms += self._jitter.uniform(-jitter_ms, jitter_ms)
        return max(latency_ms, 0.0) / 1000


def _cumulative(rates: tuple[tuple[Fault, float], ...]) -> list[tuple[float, Fault]]:
    """Upper bounds of each fault's slice of [0, 1), leaving out faults that never happen."""
    thresholds: list[tuple[float, Fault]] = []
    total = 0.0
    for fault, rate in rates:
        total += rate
        if rate > 0:
            thresholds.append((total, fault))
    return thresholds
