"""Routing choice: a requested model name to one deployment. Pure functions."""

from __future__ import annotations

import random
from bisect import bisect
from itertools import accumulate

import msgspec

from modelyard.config import Config, Deployment, ModelGroup, Target
from schemas.errors import ErrorKind
from schemas.jobs import CompletionJob, NextHop


class RouteTable(msgspec.Struct):
    """Every name a producer may ask for, resolved once at start-up."""

    groups: dict[str, ModelGroup]
    deployments: dict[str, Deployment]
    cumulative_weights: dict[str, list[float]]

    def resolve(self, requested: str) -> ModelGroup | None:
        """The model group for a name or alias, or None when unknown."""
        return self.groups.get(requested)

    def choose(self, group: ModelGroup, rng: random.Random) -> Deployment:
        """Pick one of the group's deployments in proportion to its weight."""
        targets = group.deployments
        if len(targets) == 1:
            return self.deployments[targets[0].deployment]
        weights = self.cumulative_weights[group.name]
        index = bisect(weights, rng.random() * weights[-1])
        return self.deployments[targets[min(index, len(targets) - 1)].deployment]

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

    def untried(self, job: CompletionJob, reason: ErrorKind, own: list[str] | None) -> list[Target]:
        """The first group of the job's chain with deployments the job has not
        tried yet: those deployments (empty when the chain is used up)."""
        group = self.resolve(job.request.model)
        if group is None:
            return []
        tried = {attempt.deployment for attempt in job.attempts}
        for candidate in self.chain(group, reason, own):
            left = [t for t in candidate.deployments if t.deployment not in tried]
            if left:
                return left
        return []

    def next_hop(
        self, job: CompletionJob, hop: NextHop, rng: random.Random, own: list[str] | None
    ) -> Deployment | None:
        """Where a job a worker sent on goes: the same deployment for a retry,
        else an untried deployment of its chain (by weight); None when the
        chain is used up."""
        if not hop.fallback and hop.deployment in self.deployments:
            return self.deployments[hop.deployment]
        left = self.untried(job, hop.reason, own)
        if not left:
            return None
        index = bisect(
            list(accumulate(t.weight for t in left)), rng.random() * sum(t.weight for t in left)
        )
        return self.deployments[left[min(index, len(left) - 1)].deployment]


def build_route_table(config: Config) -> RouteTable:
    """Index the config's model groups by name and alias."""
    groups: dict[str, ModelGroup] = {}
    for group in config.models.values():
        for label in (group.name, *group.aliases):
            groups[label] = group
    weights = {
        group.name: list(accumulate(t.weight for t in group.deployments))
        for group in config.models.values()
    }
    return RouteTable(groups=groups, deployments=config.deployments, cumulative_weights=weights)
