"""What happens to a job after a failed provider call: one pure decision.

`decide` looks only at the error, the job's attempt history, the model
group's retry policy, the deadline and the clock: retry the same deployment
after a delay (held by the broker), fall back to the next target of the
chain (the router picks it), or give up and answer the error.

- A retryable kind (rate limited, overloaded, timeout, server error) moves
  the job at once to another deployment of the same model it has not
  tried, when its group has one (that deployment need not wait for this
  one's trouble to pass). Otherwise it is retried on the same deployment
  `retries[kind]` times, waiting `backoff_s` doubled each time (up to
  `max_backoff_s`, give or take `jitter`) and never less than the
  provider's retry-after; then the job falls back.
- `context_window_exceeded` and `content_policy` follow their own chains.
- An account problem at one deployment (auth, not found, quota) falls back.
- A job at fault (invalid, bad request) is answered at once.
- A stream that already sent chunks is never run again, and a delay that
  would pass the deadline answers `deadline_exceeded` at once.
"""

from __future__ import annotations

import random
from datetime import datetime

import msgspec

from modelyard.config import RetryPolicy
from modelyard.topology import delay_step_ms
from schemas.errors import ErrorKind, JobError, job_error
from schemas.jobs import Attempt

# Failures that belong to a deployment (its key, its account, its model id),
# not to the job: another deployment may well serve it.
MOVE_ON = frozenset({ErrorKind.AUTH, ErrorKind.NOT_FOUND, ErrorKind.RATE_LIMITED})
# Refusals that only another model can get past: each has its own chain.
OWN_CHAIN = frozenset({ErrorKind.CONTEXT_WINDOW_EXCEEDED, ErrorKind.CONTENT_POLICY})


class Retry(msgspec.Struct, frozen=True):
    """Try the same deployment again after `delay_s` (a ladder step, `step_ms`)."""

    delay_s: float
    step_ms: int


class Fallback(msgspec.Struct, frozen=True):
    """Move on to the next untried target of the job's chain."""


class GiveUp(msgspec.Struct, frozen=True):
    """Answer the job with `error`."""

    error: JobError


Decision = Retry | Fallback | GiveUp


def decide(  # noqa: PLR0911  (a decision table reads best as early returns)
    error: JobError,
    attempts: list[Attempt],
    policy: RetryPolicy,
    *,
    deadline: datetime | None,
    now: float,
    targets_left: bool,
    sibling_left: bool = False,
    streamed: bool = False,
    rng: random.Random | None = None,
) -> Decision:
    """The next step for a job whose latest attempt (the last of `attempts`)
    failed with `error`. `targets_left` says whether the chain still has an
    untried deployment, `sibling_left` whether one of those serves the same
    model group as the failed one; `streamed` that chunks already reached
    the producer."""
    if streamed:
        return GiveUp(error)
    if error.kind in OWN_CHAIN or (not error.retryable and error.kind in MOVE_ON):
        return Fallback() if targets_left else GiveUp(error)
    if not error.retryable:
        return GiveUp(error)
    if sibling_left:
        return Fallback()
    failures = _failures_here(error.kind, attempts)
    if failures > policy.retries.get(error.kind.value, 0):
        return Fallback() if targets_left else GiveUp(error)
    delay = max(backoff_s(policy, failures, rng or random.Random()), error.retry_after_s or 0)
    step = delay_step_ms(delay)
    if step is None:  # longer than the broker holds jobs for
        return Fallback() if targets_left else GiveUp(error)
    if deadline is not None and now + step / 1000 >= deadline.timestamp():
        return GiveUp(_too_late(error, step))
    return Retry(delay_s=delay, step_ms=step)


def backoff_s(policy: RetryPolicy, failures: int, rng: random.Random) -> float:
    """The wait before retry number `failures`: exponential, capped, jittered."""
    base: float = min(policy.backoff_s * 2.0 ** (failures - 1), policy.max_backoff_s)
    return base * (1 + policy.jitter * rng.uniform(-1, 1))


def _failures_here(kind: ErrorKind, attempts: list[Attempt]) -> int:
    """How often the latest deployment failed with `kind` for this job."""
    if not attempts:
        return 1
    deployment = attempts[-1].deployment
    return sum(1 for a in attempts if a.deployment == deployment and a.error == kind)


def _too_late(error: JobError, step_ms: int) -> JobError:
    return job_error(
        ErrorKind.DEADLINE_EXCEEDED,
        f"a retry in {step_ms / 1000:g}s would pass the deadline; last error: "
        f"{error.kind.value}: {error.message}",
    )
