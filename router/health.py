"""The router's view of deployment health, and the cooldowns it decides.

Fed by workers' reports (`schemas.health`), each holding that worker's last
seconds of calls in one-second buckets; the view keeps the latest report of
every worker and adds them up. Every router is fed the same reports, so every
router cools the same deployments down at nearly the same moment, and one
that starts late knows what the others know after the next report.

A deployment's life here: usable; cooling (its recent calls failed too often
for reasons of its own, or the provider asked to be left alone) until a
time; then due for a probe, which this router sends with the next job it
would route there; then, on a success reported after the probe, usable again
with its failure history forgotten, or cooling again on a failure.

Clock-driven and broker-free: `observe` and the queries take `now`, so the
whole state machine is tested without a server.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Iterable
from typing import Literal

import msgspec
import structlog

from modelyard.config import HealthSettings
from schemas.health import DeploymentHealth, HealthReport

log = structlog.get_logger("modelyard.router.health")

Status = Literal["usable", "cooling", "probe"]


class Window(msgspec.Struct):
    """Calls summed over workers and recent seconds."""

    calls: int = 0
    ok: int = 0
    faults: int = 0
    latency_ms: float = 0.0


class _State:
    """One deployment's standing in this router."""

    def __init__(self) -> None:
        self.cooling_until = 0.0
        self.reason = ""
        self.probe_at: float | None = None  # when this router sent its probe
        self.asked = False  # the cooldown is the provider's own request to wait
        self.since = 0.0  # outcomes before this are forgotten (re-admitted)
        self.sent: list[float] = []  # when jobs were sent here since its last report


class HealthView:
    """Latest report per worker, and the cooldown state it leads to."""

    def __init__(self, settings: HealthSettings, deployments: Iterable[str]) -> None:
        self.settings = settings
        self._reports: dict[str, HealthReport] = {}
        self._state = {name: _State() for name in deployments}
        self._queued: dict[str, dict[str, int]] = {}  # pool -> source -> queued

    # Feeding.

    def observe(self, report: HealthReport, now: float) -> None:
        """Take a worker's report in, and update the cooldowns it touches."""
        stale = now - self.settings.window_s
        self._reports = {
            source: r
            for source, r in self._reports.items()
            if r.sent_at > stale and source != report.source
        }
        self._reports[report.source] = report
        self._queued.setdefault(report.pool, {})[report.source] = report.queued
        for view in report.deployments:
            state = self._state.get(view.deployment)
            if state is not None:
                state.sent.clear()
                self._update(view.deployment, state, now)

    def _update(self, name: str, state: _State, now: float) -> None:
        blocked = max((v.blocked_until or 0.0 for v in self._views(name)), default=0.0)
        if self.settings.honour_retry_after and blocked > max(now, state.cooling_until):
            self._cool(name, state, blocked, "the provider asked to wait (rate limited)", now)
            state.asked = True
            return
        if state.probe_at is not None:
            after = self.window(name, now, since=math.floor(state.probe_at))
            if after.ok:
                log.warning("deployment recovered", deployment=name)
                state.cooling_until, state.probe_at, state.since = 0.0, None, now
            elif after.faults:
                self._cool(name, state, now + self.settings.cooldown_s, "its probe failed", now)
            return
        if state.cooling_until:  # cooling down, or awaiting its probe
            return
        seen = self.window(name, now, since=state.since)
        if (
            seen.calls >= self.settings.min_calls
            and seen.faults >= self.settings.failure_rate * seen.calls
            # A deployment whose calls of the last `cooldown_s` all went
            # well is not cooled down on older failures: a router started
            # after another one's probe re-admitted it sees those failures
            # too, but not the cooldown that already answered them.
            and not self._recovered(name, now)
        ):
            reason = f"{seen.faults} of its last {seen.calls} calls failed"
            self._cool(name, state, now + self.settings.cooldown_s, reason, now)

    def _cool(self, name: str, state: _State, until: float, reason: str, now: float) -> None:
        if state.cooling_until <= now or state.probe_at is not None:  # not already cooling
            log.warning(
                "deployment cooling down", deployment=name, until=round(until, 3), reason=reason
            )
        state.cooling_until, state.reason, state.probe_at = until, reason, None
        state.asked = False
        state.since = until  # what it did before the cooldown is not held against it after

    # Reading.

    def _views(self, name: str) -> Iterable[DeploymentHealth]:
        for report in self._reports.values():
            for view in report.deployments:
                if view.deployment == name:
                    yield view

    def window(self, name: str, now: float, *, since: float = 0.0) -> Window:
        """Calls to `name` reported for the last `window_s` seconds (and not before `since`)."""
        start = max(math.floor(now) - self.settings.window_s, math.floor(since))
        total = Window()
        for view in self._views(name):
            for bucket in view.buckets:
                if bucket.second >= start:
                    total.calls += bucket.calls
                    total.ok += bucket.ok
                    total.faults += bucket.faults
                    total.latency_ms += bucket.latency_ms
        return total

    def _recovered(self, name: str, now: float) -> bool:
        """Whether `name`'s calls of the last `cooldown_s` seconds, over
        every worker's report, all went well (there were some, and none
        failed for a reason of its own)."""
        recent = self.window(name, now, since=now - self.settings.cooldown_s)
        return recent.ok > 0 and recent.faults == 0

    def status(self, name: str, now: float) -> Status:
        """`usable`; `cooling` (send it nothing: cooling down, or its probe
        is out and not yet answered); or `probe` (its cooldown is over: the
        next job sent there is its probe)."""
        state = self._state.get(name)
        if state is None or not state.cooling_until:
            return "usable"
        if state.cooling_until > now:
            return "cooling"
        if state.probe_at is None or now - state.probe_at >= self.settings.probe_timeout_s:
            return "probe"
        return "cooling"

    def sent(self, name: str, now: float) -> None:
        """A job was routed to `name` (its probe, if one was due)."""
        state = self._state.get(name)
        if state is None:
            return
        state.sent.append(now)
        if self.status(name, now) == "probe":
            log.info("deployment probed", deployment=name)
            state.probe_at = now

    def recovers_at(self, name: str) -> float:
        """When `name`'s cooldown ends (ended, for one awaiting its probe)."""
        state = self._state.get(name)
        return state.cooling_until if state is not None else 0.0

    def asked_until(self, name: str, now: float) -> float | None:
        """Until when the provider behind `name` asked not to be called (a
        429 with retry-after), if that is still ahead; None otherwise."""
        state = self._state.get(name)
        if state is None or not state.asked or state.cooling_until <= now:
            return None
        return state.cooling_until

    def reason(self, name: str) -> str:
        """Why `name` is cooling down."""
        state = self._state.get(name)
        return state.reason if state is not None else ""

    def latency_ms(self, name: str, now: float) -> float | None:
        """Mean latency of `name`'s successful calls in the window, or None
        when it had none (so it is tried, and a deployment left alone for a
        window is measured afresh)."""
        seen = self.window(name, now, since=self._since(name))
        return seen.latency_ms / seen.ok if seen.ok else None

    def busy(self, name: str, pool: str, now: float) -> int:
        """Calls in flight at `name` (as last reported), jobs waiting on its
        pool's queues, and the jobs this router sent it since that report
        that, at its usual latency, are not done yet."""
        in_flight = sum(v.in_flight for v in self._views(name))
        queued = sum(self._queued.get(pool, {}).values())
        state = self._state.get(name)
        if state is None:
            return in_flight + queued
        latency_ms = self.latency_ms(name, now)
        if latency_ms is None:
            return in_flight + queued + len(state.sent)
        running = len(state.sent) - bisect_left(state.sent, now - latency_ms / 1000)
        return in_flight + queued + running

    def _since(self, name: str) -> float:
        state = self._state.get(name)
        return state.since if state is not None else 0.0
