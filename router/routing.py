"""Routing choice: a requested model name to one deployment. Pure functions."""

from __future__ import annotations

import random
from bisect import bisect
from itertools import accumulate

import msgspec

from modelyard.config import Config, Deployment, ModelGroup


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
