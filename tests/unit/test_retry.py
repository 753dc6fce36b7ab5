"""The retry decision: pure, over the error, the history, the policy and the clock."""

from __future__ import annotations

import random
from datetime import UTC, datetime

import pytest

from modelyard.config import RetryPolicy
from schemas.errors import ErrorKind, job_error
from schemas.jobs import Attempt
from workers.retry import Fallback, GiveUp, Retry, backoff_s, decide

NOW = 1_800_000_000.0
POLICY = RetryPolicy(retries={"rate_limited": 2, "server_error": 1}, backoff_s=1.0, jitter=0.0)


def failed(kind: ErrorKind, deployment: str = "a", times: int = 1) -> list[Attempt]:
    return [
        Attempt(
            deployment=deployment,
            provider="openai",
            started_at=NOW,
            finished_at=NOW,
            outcome="error",
            error=kind,
        )
        for _ in range(times)
    ]


def run(kind: ErrorKind, history: list[Attempt], **kwargs: object) -> object:
    error = job_error(kind, "boom", retry_after_s=kwargs.pop("retry_after_s", None))  # type: ignore[arg-type]
    options = {"deadline": None, "now": NOW, "targets_left": True, **kwargs}
    return decide(error, history, POLICY, rng=random.Random(0), **options)  # type: ignore[arg-type]


def test_a_retryable_failure_waits_doubling_then_falls_back() -> None:
    limited = ErrorKind.RATE_LIMITED
    assert run(limited, failed(limited, times=1)) == Retry(delay_s=1.0, step_ms=1000)
    assert run(limited, failed(limited, times=2)) == Retry(delay_s=2.0, step_ms=2000)
    assert run(limited, failed(limited, times=3)) == Fallback()
    assert run(limited, failed(limited, times=3), targets_left=False) == GiveUp(
        job_error(limited, "boom")
    )


def test_never_sooner_than_the_provider_asks() -> None:
    decision = run(ErrorKind.RATE_LIMITED, failed(ErrorKind.RATE_LIMITED), retry_after_s=5.0)
    assert decision == Retry(delay_s=5.0, step_ms=6000)  # rounded up to the ladder, never down


def test_a_retry_after_longer_than_the_ladder_falls_back() -> None:
    decision = run(ErrorKind.RATE_LIMITED, failed(ErrorKind.RATE_LIMITED), retry_after_s=3600.0)
    assert decision == Fallback()


def test_failures_are_counted_per_deployment_and_kind() -> None:
    history = [*failed(ErrorKind.SERVER_ERROR, "b", times=5), *failed(ErrorKind.SERVER_ERROR)]
    assert run(ErrorKind.SERVER_ERROR, history) == Retry(delay_s=1.0, step_ms=1000)


@pytest.mark.parametrize(
    "kind",
    [ErrorKind.BAD_REQUEST, ErrorKind.INVALID_JOB, ErrorKind.UNKNOWN_MODEL],
)
def test_a_job_at_fault_is_answered_at_once(kind: ErrorKind) -> None:
    assert isinstance(run(kind, failed(kind)), GiveUp)


@pytest.mark.parametrize(
    "kind",
    [ErrorKind.CONTEXT_WINDOW_EXCEEDED, ErrorKind.CONTENT_POLICY, ErrorKind.AUTH],
)
def test_refusals_only_another_target_can_pass_fall_back_never_retry(kind: ErrorKind) -> None:
    assert run(kind, failed(kind)) == Fallback()
    assert isinstance(run(kind, failed(kind), targets_left=False), GiveUp)


def test_quota_exhausted_is_not_retried_but_moves_on() -> None:
    error = job_error(ErrorKind.RATE_LIMITED, "quota", retryable=False)
    history = failed(ErrorKind.RATE_LIMITED)
    options = {"deadline": None, "now": NOW, "targets_left": True}
    assert decide(error, history, POLICY, **options) == Fallback()  # type: ignore[arg-type]


def test_a_stream_that_sent_chunks_is_never_run_again() -> None:
    limited = ErrorKind.SERVER_ERROR
    assert isinstance(run(limited, failed(limited), streamed=True), GiveUp)


def test_a_retry_that_would_pass_the_deadline_is_answered_now() -> None:
    deadline = datetime.fromtimestamp(NOW + 2, UTC)
    decision = run(
        ErrorKind.RATE_LIMITED, failed(ErrorKind.RATE_LIMITED), retry_after_s=5.0, deadline=deadline
    )
    assert isinstance(decision, GiveUp)
    assert decision.error.kind == ErrorKind.DEADLINE_EXCEEDED
    assert "rate_limited" in decision.error.message


def test_backoff_is_capped_and_jittered_within_bounds() -> None:
    policy = RetryPolicy(backoff_s=1.0, max_backoff_s=8.0, jitter=0.25)
    rng = random.Random(7)
    waits = [backoff_s(policy, n, rng) for n in range(1, 8) for _ in range(50)]
    assert min(waits) >= 0.75
    assert max(waits) <= 10.0
    assert len({round(w, 3) for w in waits}) > 10  # jitter spreads them


def test_the_config_knows_the_longest_delay_the_broker_holds() -> None:
    from modelyard.config import MAX_RETRY_DELAY_S  # noqa: PLC0415
    from modelyard.topology import RETRY_DELAYS_MS  # noqa: PLC0415

    assert RETRY_DELAYS_MS[-1] == MAX_RETRY_DELAY_S * 1000


def test_without_retry_after_a_rate_limit_reset_is_what_the_provider_asked() -> None:
    """A 429 with no retry-after but rate-limit headers saying a bucket is
    empty: the time that bucket takes to have room for the call again (its
    reset is the time to refill completely), the longer of the two."""
    from schemas.results import RateLimits  # noqa: PLC0415
    from workers.ratelimit import exhausted_reset_s  # noqa: PLC0415

    # 600 requests a minute: one more in 0.1 s; 10,000 tokens refilled in
    # 60 s: this call's 1,000 in 6 s.
    both_empty = RateLimits(
        limit_requests=600,
        remaining_requests=0,
        reset_requests_s=60.0,
        limit_tokens=10_000,
        remaining_tokens=0,
        reset_tokens_s=60.0,
    )
    assert exhausted_reset_s(both_empty, tokens=1_000) == pytest.approx(6.0)
    assert exhausted_reset_s(both_empty, tokens=50_000) == pytest.approx(60.0)  # at most a reset
    requests_only = RateLimits(limit_requests=600, remaining_requests=0, reset_requests_s=60.0)
    assert exhausted_reset_s(requests_only) == pytest.approx(0.1)
    assert exhausted_reset_s(RateLimits(remaining_requests=3, reset_requests_s=2.0)) is None
    assert exhausted_reset_s(None) is None
    decision = run(
        ErrorKind.RATE_LIMITED,
        failed(ErrorKind.RATE_LIMITED),
        retry_after_s=exhausted_reset_s(both_empty, tokens=1_000),
    )
    assert decision == Retry(delay_s=6.0, step_ms=6000)
