"""Routing choice: a requested model name to one deployment. Pure functions
of the config, the job, the health view and the clock."""

from __future__ import annotations

import math
import random
from bisect import bisect
from collections.abc import Callable
from decimal import Decimal
from itertools import accumulate
from typing import NamedTuple

import msgspec

from modelyard.config import Config, Deployment, ModelGroup, Target
from modelyard.prices import PriceCard, estimated_cost, estimated_tokens, price_card
from router.health import HealthView
from schemas.errors import ErrorKind
from schemas.jobs import CompletionJob, Constraints, NextHop

# `lowest_latency` spreads work over every deployment within this share of
# the fastest, so one fast deployment is not buried under the whole load.
LATENCY_TOLERANCE = 0.1


class Choice(NamedTuple):
    """A deployment for the job, the model group it serves the job for, and
    what to tell the producer about the choice; `wait_until`: not before
    then (its provider asked us to wait, and no other deployment may take
    the job)."""

    deployment: Deployment
    model: str
    note: str | None = None
    wait_until: float | None = None


class RouteTable(msgspec.Struct):
    """Every name a producer may ask for, resolved once at start-up."""

    groups: dict[str, ModelGroup]
    deployments: dict[str, Deployment]
    prices: dict[str, PriceCard]

    def resolve(self, requested: str) -> ModelGroup | None:
        """The model group for a name or alias, or None when unknown."""
        return self.groups.get(requested)

    def choose(
        self,
        group: ModelGroup,
        job: CompletionJob,
        rng: random.Random,
        *,
        health: HealthView | None = None,
        now: float = 0.0,
    ) -> Choice | None:
        """One of the group's deployments the job's constraints allow, by
        the group's strategy among those not cooling down; None when the
        constraints allow none."""
        targets = self.allowed(group.deployments, job.constraints)
        if not targets:
            return None
        return self._pick(group, targets, job, rng, health=health, now=now)

    def allowed(self, targets: list[Target], constraints: Constraints | None) -> list[Target]:
        """The targets a job's constraints leave."""
        if constraints is None:
            return targets
        return [t for t in targets if self._fits(self.deployments[t.deployment], constraints)]

    def _fits(self, deployment: Deployment, c: Constraints) -> bool:
        if c.providers is not None and deployment.provider not in c.providers:
            return False
        if c.deployments is not None and deployment.name not in c.deployments:
            return False
        if c.tags is not None and not set(c.tags) & set(deployment.tags):
            return False
        card = self.prices[deployment.name]
        for cap, rate in ((c.max_input_per_mtok, card.input), (c.max_output_per_mtok, card.output)):
            if cap is not None and (rate is None or rate.base > Decimal(repr(cap))):
                return False
        return True

    def _pick(
        self,
        group: ModelGroup,
        targets: list[Target],
        job: CompletionJob,
        rng: random.Random,
        *,
        health: HealthView | None,
        now: float,
    ) -> Choice:
        """Health first (a due probe, never a deployment cooling down unless
        all are), then the group's strategy."""
        if health is not None:
            status = {t.deployment: health.status(t.deployment, now) for t in targets}
            probe = next((t for t in targets if status[t.deployment] == "probe"), None)
            if probe is not None:
                return Choice(self.deployments[probe.deployment], group.name)
            usable = [t for t in targets if status[t.deployment] == "usable"]
            if not usable:
                first = min(targets, key=lambda t: health.recovers_at(t.deployment))
                note = (
                    f"every deployment {group.name!r} may use here was cooling down; "
                    f"sent to {first.deployment!r}, the first to recover "
                    f"({health.reason(first.deployment)})"
                )
                wait = health.asked_until(first.deployment, now)
                return Choice(self.deployments[first.deployment], group.name, note, wait)
            targets = usable
        if len(targets) > 1 and group.strategy != "weighted":
            targets = self._best(group, targets, job, health, now)
        return Choice(self.deployments[_by_weight(targets, rng).deployment], group.name)

    def _best(
        self,
        group: ModelGroup,
        targets: list[Target],
        job: CompletionJob,
        health: HealthView | None,
        now: float,
    ) -> list[Target]:
        """The targets the strategy ranks first (ties broken by weight later)."""
        score: Callable[[Target], float]
        tolerance = 0.0
        if group.strategy == "lowest_cost":
            tokens = estimated_tokens(job.request)

            def score(t: Target) -> float:
                cost = estimated_cost(self.prices[t.deployment], *tokens)
                return math.inf if cost is None else float(cost)

        elif health is None:
            return targets
        elif group.strategy == "least_busy":

            def score(t: Target) -> float:
                return health.busy(t.deployment, self.deployments[t.deployment].pool, now)

        else:  # lowest_latency; never measured (lately) comes first, to be measured
            tolerance = LATENCY_TOLERANCE

            def score(t: Target) -> float:
                latency = health.latency_ms(t.deployment, now)
                return -1.0 if latency is None else latency

        scores = {t.deployment: score(t) for t in targets}
        best = min(scores.values())
        limit = best * (1 + tolerance) if best > 0 else best
        return [t for t in targets if scores[t.deployment] <= limit]

    def chain(
        self, group: ModelGroup, reason: ErrorKind, own: list[str] | None = None
    ) -> list[ModelGroup]:
        """The model groups a failed job may move to, in order. A context
        window or content policy refusal follows its own chain (never the same
        model again); anything else tries the group's other deployments, then
        its fallbacks (each followed by its own), or the job's `own` list."""
        if reason == ErrorKind.CONTEXT_WINDOW_EXCEEDED:
            return self._expand(group.context_window_fallbacks, "context_window_fallbacks")
        if reason == ErrorKind.CONTENT_POLICY:
            return self._expand(group.content_policy_fallbacks, "content_policy_fallbacks")
        if own is not None:
            return [group, *(g for label in own if (g := self.resolve(label)) is not None)]
        return [group, *self._expand(group.fallbacks, "fallbacks", {group.name})]

    def remaining_chain(
        self, job: CompletionJob, group: ModelGroup, reason: ErrorKind, own: list[str] | None
    ) -> list[ModelGroup]:
        """Where a job now served for `group` may go after a `reason`
        failure: `group`'s own chain, then the rest of the chain the job was
        moved along to get here (so a flat `fallbacks: [y, z]` reaches `z`
        after `y` failed too). That chain starts at the model the job asked
        for, or, for a context window or content policy move, at the model
        whose call first failed for that reason."""
        out = self.chain(group, reason, own)
        origin = self.resolve(_chain_origin(job, reason))
        if origin is None or origin.name == group.name:
            return out
        along = self.chain(origin, reason, own)
        names = [g.name for g in along]
        if group.name not in names:
            return out  # not moved along that chain (another chain brought it here)
        have = {g.name for g in out}
        for later in along[names.index(group.name) + 1 :]:
            if later.name not in have:
                out.append(later)
                have.add(later.name)
        return out

    def _expand(
        self, labels: list[str], chain: str, seen: set[str] | None = None
    ) -> list[ModelGroup]:
        """Depth first, each group once (the config refused loops)."""
        seen = set() if seen is None else seen
        out: list[ModelGroup] = []
        for label in labels:
            group = self.resolve(label)
            if group is None or group.name in seen:
                continue
            seen.add(group.name)
            out += [group, *self._expand(getattr(group, chain), chain, seen)]
        return out

    def untried(
        self, job: CompletionJob, reason: ErrorKind, own: list[str] | None
    ) -> tuple[ModelGroup, list[Target]] | None:
        """The first group of the job's chain (from the model it is served
        for now) with deployments the job has not tried yet and its
        constraints allow: it and those deployments; None when the chain is
        used up."""
        group = self.resolve(current_model(job))
        if group is None:
            return None
        tried = {attempt.deployment for attempt in job.attempts}
        # A model that refused the prompt itself (too long, or against its
        # policy) refuses it on any of its deployments: never again.
        refused = {a.model for a in job.attempts if a.error in _MODEL_REFUSALS and a.model}
        for candidate in self.remaining_chain(job, group, reason, own):
            if candidate.name in refused:
                continue
            targets = self.allowed(candidate.deployments, job.constraints)
            left = [t for t in targets if t.deployment not in tried]
            if left:
                return candidate, left
        return None

    def next_hop(
        self,
        job: CompletionJob,
        hop: NextHop,
        rng: random.Random,
        own: list[str] | None,
        *,
        health: HealthView | None = None,
        now: float = 0.0,
    ) -> Choice | None:
        """Where a job a worker sent on goes: the same deployment for a
        retry, unless it is cooling down and an untried deployment of the
        chain is not; else an untried deployment of its chain, by that
        group's strategy; None when the chain is used up."""
        same = self.deployments.get(hop.deployment or "") if not hop.fallback else None
        if same is not None and (health is None or health.status(same.name, now) != "cooling"):
            return Choice(same, current_model(job))
        left = self.untried(job, hop.reason, own)
        if left is None:
            return self._wait_for(job, same, health, now) if same is not None else None
        group, targets = left
        if (
            same is not None
            and health is not None
            and all(health.status(t.deployment, now) == "cooling" for t in targets)
        ):
            return self._wait_for(job, same, health, now)  # no better place to go
        return self._pick(group, targets, job, rng, health=health, now=now)

    @staticmethod
    def _wait_for(
        job: CompletionJob, deployment: Deployment, health: HealthView | None, now: float
    ) -> Choice:
        """The deployment a retry was meant for, once it may be called."""
        wait = health.asked_until(deployment.name, now) if health is not None else None
        return Choice(deployment, current_model(job), None, wait)


_MODEL_REFUSALS = (ErrorKind.CONTEXT_WINDOW_EXCEEDED, ErrorKind.CONTENT_POLICY)


def _chain_origin(job: CompletionJob, reason: ErrorKind) -> str:
    """The model a job's chain for `reason` starts at: for a context window
    or content policy refusal, the model of the first call refused for it;
    else the model the job asked for."""
    if reason in _MODEL_REFUSALS:
        for attempt in job.attempts:
            if attempt.error == reason and attempt.model:
                return attempt.model
    return job.request.model


def current_model(job: CompletionJob) -> str:
    """The model group the job is being served for now: the one it was last
    routed for (a fallback moves it on), else the one it asked for."""
    if job.route is not None and job.route.model:
        return job.route.model
    return job.request.model


def _by_weight(targets: list[Target], rng: random.Random) -> Target:
    """One target, drawn in proportion to its weight."""
    if len(targets) == 1:
        return targets[0]
    weights = list(accumulate(t.weight for t in targets))
    index = bisect(weights, rng.random() * weights[-1])
    return targets[min(index, len(targets) - 1)]


def build_route_table(config: Config) -> RouteTable:
    """Index the config's model groups by name and alias, and price every deployment."""
    groups: dict[str, ModelGroup] = {}
    for group in config.models.values():
        for label in (group.name, *group.aliases):
            groups[label] = group
    prices = {name: price_card(d) for name, d in config.deployments.items()}
    return RouteTable(groups=groups, deployments=config.deployments, prices=prices)
