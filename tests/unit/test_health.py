"""Deployment health without a broker: workers' counting, the router's
cooldowns and probes, routing strategies and per-job constraints."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import pytest

from modelyard.client import new_job
from modelyard.config import HealthSettings, parse
from router.health import HealthView
from router.routing import RouteTable, build_route_table
from schemas.chat import Message
from schemas.errors import ErrorKind, job_error
from schemas.jobs import CompletionJob, Constraints, NextHop
from schemas.results import RateLimits
from workers.health import HealthRecorder
from workers.providers import PROVIDERS
from workers.retry import Fallback, Retry, decide

T0 = 1_800_000_000.0
SETTINGS = HealthSettings(window_s=10, min_calls=4, failure_rate=0.5, cooldown_s=5)


def recorder(*deployments: str, source: str = "w1") -> HealthRecorder:
    return HealthRecorder(source, "main", list(deployments), window_s=10)


def calls(
    rec: HealthRecorder,
    name: str,
    now: float,
    *,
    ok: int = 0,
    failed: int = 0,
    kind: ErrorKind = ErrorKind.SERVER_ERROR,
    latency_ms: float = 100.0,
) -> None:
    for _ in range(ok):
        rec.started(name)
        rec.finished(name, now=now, error=None, latency_ms=latency_ms, limits=None)
    for _ in range(failed):
        rec.started(name)
        rec.finished(name, now=now, error=job_error(kind, "x"), latency_ms=5.0, limits=None)


def test_a_report_holds_the_window_in_one_second_buckets() -> None:
    rec = recorder("a")
    calls(rec, "a", T0, ok=2, latency_ms=50)
    calls(rec, "a", T0 + 0.5, failed=1)
    calls(rec, "a", T0 + 0.7, failed=1, kind=ErrorKind.BAD_REQUEST)  # the job's fault
    calls(rec, "a", T0 + 3, ok=1)
    rec.started("a")  # one still running

    report = rec.report(T0 + 3.2)
    (view,) = report.deployments
    assert [(b.second, b.calls, b.ok, b.faults) for b in view.buckets] == [
        (int(T0), 4, 2, 1),
        (int(T0) + 3, 1, 1, 0),
    ]
    assert view.buckets[0].latency_ms == 100.0
    assert view.in_flight == 1
    # Ten seconds on, the old buckets are gone.
    assert [b.second for b in rec.report(T0 + 12.5).deployments[0].buckets] == [int(T0) + 3]


def test_a_429_with_retry_after_blocks_the_deployment_and_asks_for_a_report_now() -> None:
    rec = recorder("a")
    assert not rec.urgent.is_set()
    rec.started("a")
    rate_limited = job_error(ErrorKind.RATE_LIMITED, "slow down", retry_after_s=3.0)
    rec.finished("a", now=T0, error=rate_limited, latency_ms=1.0, limits=None)

    assert rec.urgent.is_set()
    assert rec.report(T0 + 1).deployments[0].blocked_until == T0 + 3.0
    assert rec.report(T0 + 3.5).deployments[0].blocked_until is None
    # Remaining requests at zero is headroom to report, not a wait: the
    # provider refills continuously, long before its full reset.
    rec.started("a")
    limits = RateLimits(remaining_requests=0, reset_requests_s=60.0)
    rec.finished("a", now=T0 + 4, error=None, latency_ms=1.0, limits=limits)
    view = rec.report(T0 + 4).deployments[0]
    assert view.blocked_until is None
    assert view.remaining_requests == 0


def test_failing_calls_cool_a_deployment_down_then_one_probe_readmits_it() -> None:
    rec = recorder("a", "b")
    view = HealthView(SETTINGS, ["a", "b"])
    calls(rec, "a", T0, ok=1, failed=3)
    calls(rec, "b", T0, ok=4)
    view.observe(rec.report(T0), T0)

    assert view.status("a", T0) == "cooling"
    assert view.status("b", T0) == "usable"
    assert view.status("a", T0 + 4.9) == "cooling"
    assert view.status("a", T0 + 5.1) == "probe"
    view.sent("a", T0 + 5.1)  # the probe goes out: nothing else meanwhile
    assert view.status("a", T0 + 5.2) == "cooling"

    calls(rec, "a", T0 + 6, ok=1)  # the probe succeeded
    view.observe(rec.report(T0 + 6.1), T0 + 6.1)
    assert view.status("a", T0 + 6.2) == "usable"
    # Its failures before the cooldown are not held against it any more.
    calls(rec, "a", T0 + 7, failed=1)
    view.observe(rec.report(T0 + 7), T0 + 7)
    assert view.status("a", T0 + 7) == "usable"


def test_a_failed_probe_cools_down_again_and_a_lost_one_is_sent_again() -> None:
    rec = recorder("a")
    view = HealthView(SETTINGS, ["a"])
    calls(rec, "a", T0, failed=4)
    view.observe(rec.report(T0), T0)
    view.sent("a", T0 + 6)
    calls(rec, "a", T0 + 6.5, failed=1)
    view.observe(rec.report(T0 + 6.6), T0 + 6.6)
    assert view.status("a", T0 + 7) == "cooling"
    assert view.recovers_at("a") == pytest.approx(T0 + 11.6)

    view.sent("a", T0 + 12)  # probe; it is never answered
    assert view.status("a", T0 + 12 + SETTINGS.probe_timeout_s - 1) == "cooling"
    assert view.status("a", T0 + 12 + SETTINGS.probe_timeout_s) == "probe"


def test_few_calls_or_job_faults_cool_nothing_down() -> None:
    rec = recorder("a")
    view = HealthView(SETTINGS, ["a"])
    calls(rec, "a", T0, failed=3)  # under min_calls
    calls(rec, "a", T0, failed=5, kind=ErrorKind.CONTENT_POLICY)
    calls(rec, "a", T0, ok=5)
    view.observe(rec.report(T0), T0)
    assert view.status("a", T0) == "usable"


def test_reports_of_several_workers_add_up_and_a_late_router_catches_up() -> None:
    one, two = recorder("a", source="w1"), recorder("a", source="w2")
    early = HealthView(SETTINGS, ["a"])
    calls(one, "a", T0, ok=2, failed=1)
    calls(two, "a", T0 + 1, ok=0, failed=2)
    early.observe(one.report(T0 + 1), T0 + 1)
    assert early.status("a", T0 + 1) == "usable"  # 1 of 3
    early.observe(two.report(T0 + 1), T0 + 1)
    assert early.status("a", T0 + 1) == "cooling"  # 3 of 5, across both workers

    late = HealthView(SETTINGS, ["a"])  # started after those calls
    late.observe(one.report(T0 + 2), T0 + 2)
    late.observe(two.report(T0 + 2), T0 + 2)
    assert late.status("a", T0 + 2) == "cooling"


def test_a_router_started_after_a_probe_readmitted_a_deployment_does_not_cool_it_again() -> None:
    """The late router sees the failures that cooled the deployment down in
    the others, still inside the window, but also that it works again."""
    rec = recorder("a")
    early = HealthView(SETTINGS, ["a"])
    calls(rec, "a", T0, ok=1, failed=3)
    early.observe(rec.report(T0), T0)
    assert early.status("a", T0) == "cooling"
    early.sent("a", T0 + 5.1)  # the probe
    calls(rec, "a", T0 + 5.2, ok=1)
    early.observe(rec.report(T0 + 5.5), T0 + 5.5)
    assert early.status("a", T0 + 5.5) == "usable"

    late = HealthView(SETTINGS, ["a"])
    late.observe(rec.report(T0 + 6), T0 + 6)
    assert late.status("a", T0 + 6) == "usable"
    # It still cools the deployment down when the failures come back.
    calls(rec, "a", T0 + 7, failed=4)
    late.observe(rec.report(T0 + 7), T0 + 7)
    assert late.status("a", T0 + 7) == "cooling"


def test_a_mostly_failing_deployment_cools_down_though_its_latest_second_went_well() -> None:
    rec = recorder("a")
    view = HealthView(SETTINGS, ["a"])
    calls(rec, "a", T0, ok=1, failed=4)
    calls(rec, "a", T0 + 1, ok=1)  # a lucky second
    view.observe(rec.report(T0 + 1.2), T0 + 1.2)
    assert view.status("a", T0 + 1.2) == "cooling"


def test_a_provider_asking_to_wait_cools_down_until_then_and_says_so() -> None:
    rec = recorder("a")
    view = HealthView(SETTINGS, ["a"])
    rec.started("a")
    error = job_error(ErrorKind.RATE_LIMITED, "slow down", retry_after_s=2.0)
    rec.finished("a", now=T0, error=error, latency_ms=1.0, limits=None)
    view.observe(rec.report(T0), T0)

    assert view.status("a", T0 + 1.9) == "cooling"
    assert view.asked_until("a", T0 + 1) == T0 + 2.0
    assert view.status("a", T0 + 2.1) == "probe"
    assert view.asked_until("a", T0 + 2.1) is None


# Routing with health, strategies and constraints.


def table(strategy: str = "weighted", **prices: tuple[str, str]) -> RouteTable:
    names = ("a", "b", "c")
    deployments: dict[str, Any] = {
        n: {"provider": "openai", "model": "gpt-4o-mini", "pool": "main"} for n in names
    }
    deployments["c"]["provider"] = "mistral"
    deployments["c"]["model"] = "in-house-finetune"  # no price known
    for name, (inp, out) in prices.items():
        deployments[name]["price"] = {"input_per_mtok": inp, "output_per_mtok": out}
    doc = {
        "deployments": deployments,
        "models": {
            "m": {"deployments": [{"deployment": n} for n in names], "strategy": strategy},
            "solo": {"deployments": [{"deployment": "a"}]},
        },
    }
    return build_route_table(parse(doc, {}, PROVIDERS))


def job(model: str = "m", **params: Any) -> CompletionJob:
    return new_job(model, [Message(role="user", content="hello " * 40)], **params)


def picks(
    routes: RouteTable, j: CompletionJob, view: HealthView | None, now: float
) -> Counter[str]:
    rng = random.Random(7)
    group = routes.resolve(j.request.model)
    assert group is not None
    out: Counter[str] = Counter()
    for _ in range(300):
        choice = routes.choose(group, j, rng, health=view, now=now)
        assert choice is not None
        out[choice.deployment.name] += 1
    return out


def cooled(view: HealthView, name: str, now: float) -> None:
    rec = recorder(name, source=f"cool-{name}")
    calls(rec, name, now, failed=4)
    view.observe(rec.report(now), now)


def test_routing_skips_a_deployment_cooling_down_and_sends_its_probe_once() -> None:
    routes = table()
    view = HealthView(SETTINGS, ["a", "b", "c"])
    cooled(view, "a", T0)
    assert set(picks(routes, job(), view, T0 + 1)) == {"b", "c"}

    # After the cooldown the next job is the probe; then nothing until it answers.
    group = routes.resolve("m")
    assert group is not None
    probe = routes.choose(group, job(), random.Random(1), health=view, now=T0 + 6)
    assert probe is not None
    assert probe.deployment.name == "a"
    view.sent("a", T0 + 6)
    assert set(picks(routes, job(), view, T0 + 6.5)) == {"b", "c"}


def test_when_every_deployment_cools_down_the_first_to_recover_is_used_and_said() -> None:
    routes = table()
    view = HealthView(SETTINGS, ["a", "b", "c"])
    cooled(view, "a", T0 + 2)
    cooled(view, "b", T0)
    cooled(view, "c", T0 + 1)
    group = routes.resolve("m")
    assert group is not None

    choice = routes.choose(group, job(), random.Random(1), health=view, now=T0 + 3)

    assert choice is not None
    assert choice.deployment.name == "b"
    assert choice.note is not None
    assert "'b', the first to recover" in choice.note
    assert choice.wait_until is None  # a cooldown of ours, not the provider's request


def test_when_every_deployment_asked_to_wait_the_job_waits_too() -> None:
    routes = table()
    view = HealthView(SETTINGS, ["a"])
    rec = recorder("a")
    rec.started("a")
    rec.finished(
        "a",
        now=T0,
        error=job_error(ErrorKind.RATE_LIMITED, "slow down", retry_after_s=4.0),
        latency_ms=1.0,
        limits=None,
    )
    view.observe(rec.report(T0), T0)
    group = routes.resolve("solo")
    assert group is not None

    choice = routes.choose(group, job("solo"), random.Random(1), health=view, now=T0 + 1)

    assert choice is not None
    assert choice.wait_until == T0 + 4.0


def test_least_busy_prefers_the_deployment_with_fewest_calls_in_flight() -> None:
    routes = table("least_busy")
    view = HealthView(SETTINGS, ["a", "b", "c"])
    rec = recorder("a", "b", "c")
    for _ in range(5):
        rec.started("a")
    for _ in range(3):
        rec.started("c")
    view.observe(rec.report(T0), T0)
    assert set(picks(routes, job(), None, T0)) == {"a", "b", "c"}  # no view: by weight

    group = routes.resolve("m")
    assert group is not None
    rng = random.Random(3)
    chosen = []
    for _ in range(6):
        choice = routes.choose(group, job(), rng, health=view, now=T0)
        assert choice is not None
        chosen.append(choice.deployment.name)
        view.sent(choice.deployment.name, T0)  # counted until the next report
    # b (0 in flight) takes jobs until it is as busy as c (3); then both.
    assert chosen[:3] == ["b", "b", "b"]
    assert set(chosen[3:]) <= {"b", "c"}


def test_lowest_latency_prefers_the_fastest_and_measures_the_unmeasured() -> None:
    routes = table("lowest_latency")
    view = HealthView(SETTINGS, ["a", "b", "c"])
    rec = recorder("a", "b", "c")
    calls(rec, "a", T0, ok=3, latency_ms=400)
    calls(rec, "b", T0, ok=3, latency_ms=50)
    view.observe(rec.report(T0), T0)
    assert set(picks(routes, job(), view, T0)) == {"c"}  # never measured: tried first

    calls(rec, "c", T0 + 1, ok=3, latency_ms=53)  # within 10% of b
    view.observe(rec.report(T0 + 1), T0 + 1)
    assert set(picks(routes, job(), view, T0 + 1)) == {"b", "c"}

    # Left alone for a whole window, a slow deployment is measured afresh.
    later = T0 + 20
    calls(rec, "b", later, ok=3, latency_ms=50)
    calls(rec, "c", later, ok=3, latency_ms=50)
    view.observe(rec.report(later), later)
    assert set(picks(routes, job(), view, later)) == {"a"}


def test_lowest_cost_uses_the_prices_and_the_jobs_estimated_tokens() -> None:
    # a: cheap input, dear output; b: the reverse; c: no price known.
    routes = table("lowest_cost", a=("0.10", "10.00"), b=("5.00", "0.50"))
    assert set(picks(routes, job(max_tokens=4000), None, T0)) == {"b"}
    assert set(picks(routes, job(max_tokens=1), None, T0)) == {"a"}


def test_constraints_narrow_the_deployments_and_can_leave_none() -> None:
    routes = table(a=("0.10", "0.40"), b=("3.00", "15.00"))
    only_mistral = job(constraints=Constraints(providers=["mistral"]))
    assert set(picks(routes, only_mistral, None, T0)) == {"c"}

    cheap = job(constraints=Constraints(max_output_per_mtok=1.0))  # c has no known price
    assert set(picks(routes, cheap, None, T0)) == {"a"}

    named = job(constraints=Constraints(deployments=["b"], providers=["openai"]))
    assert set(picks(routes, named, None, T0)) == {"b"}

    impossible = job(constraints=Constraints(providers=["anthropic"]))
    group = routes.resolve("m")
    assert group is not None
    assert routes.choose(group, impossible, random.Random(1)) is None


def test_a_retry_for_a_deployment_cooling_down_moves_to_a_healthy_one() -> None:
    routes = table()
    view = HealthView(SETTINGS, ["a", "b", "c"])
    j = job()
    hop = NextHop(reason=ErrorKind.SERVER_ERROR, deployment="a")
    assert (
        routes.next_hop(j, hop, random.Random(1), None, health=view, now=T0).deployment.name == "a"
    )  # type: ignore[union-attr]

    cooled(view, "a", T0)
    cooled(view, "b", T0)
    moved = routes.next_hop(j, hop, random.Random(1), None, health=view, now=T0 + 1)
    assert moved is not None
    assert moved.deployment.name == "c"


def test_a_retryable_failure_moves_at_once_to_another_deployment_of_the_model() -> None:
    from modelyard.config import RetryPolicy  # noqa: PLC0415

    error = job_error(ErrorKind.RATE_LIMITED, "slow down", retry_after_s=2.0)
    common: dict[str, Any] = {"deadline": None, "now": T0, "targets_left": True}
    assert decide(error, [], RetryPolicy(), sibling_left=True, **common) == Fallback()
    assert isinstance(decide(error, [], RetryPolicy(), sibling_left=False, **common), Retry)


def test_a_provider_with_no_requests_left_pauses_a_limited_deployment_for_one_refill() -> None:
    from workers.ratelimit import refill_wait  # noqa: PLC0415

    empty = RateLimits(limit_requests=600, remaining_requests=0, reset_requests_s=60.0)
    assert refill_wait(empty) == 0.1  # a 600-a-minute bucket refills one every 0.1 s
    assert (
        refill_wait(RateLimits(limit_requests=600, remaining_requests=3, reset_requests_s=1))
        is None
    )
    assert refill_wait(None) is None
