"""The mutable state one fake server shares between its routes."""

from __future__ import annotations

from aiohttp import web

from modelyard.fake.cache import PromptCache
from modelyard.fake.limits import RateLimits
from modelyard.fake.requestlog import RequestLog
from modelyard.fake.settings import FakeSettings, FaultDice


class FakeState:
    """Settings, dice, prompt cache, rate-limit usage and request log of one app."""

    def __init__(self, settings: FakeSettings) -> None:
        self.dice = FaultDice(settings)
        self.cache = PromptCache()
        self.limits = RateLimits()
        self.log = RequestLog()

    @property
    def settings(self) -> FakeSettings:
        """The settings in force."""
        return self.dice.settings

    def configure(self, settings: FakeSettings) -> None:
        """Apply new settings; the dice restart from the seed so runs replay."""
        self.dice = FaultDice(settings)


STATE = web.AppKey("modelyard.fake.state", FakeState)
