"""Prompt caching: a long shared prefix is billed as cached tokens on later calls."""

from __future__ import annotations

from typing import Any

import pytest

from modelyard.fake.cache import PromptCache
from modelyard.fake.conversation import Conversation, Turn
from tests.fake.conftest import FakeServer, tokens, user

MANUAL = "The operator manual says: " + "keep every queue durable and every ack late. " * 210
SYSTEM = {"role": "system", "content": MANUAL}


async def usage(server: FakeServer, messages: list[dict[str, Any]]) -> dict[str, Any]:
    answer = await server.chat({"model": "gpt-4o", "messages": messages})
    assert answer.status == 200
    result: dict[str, Any] = answer.json()["usage"]
    return result


@pytest.mark.asyncio
async def test_second_call_with_the_same_long_prefix_is_cached(server: FakeServer) -> None:
    first = await usage(server, [SYSTEM, user("First question?")])
    second = await usage(server, [SYSTEM, user("Another question?")])

    prefix_tokens = 4 + tokens(MANUAL)
    assert prefix_tokens == 1899  # not a multiple of 128, nor within 64 of one
    assert first["prompt_tokens_details"]["cached_tokens"] == 0
    assert second["prompt_tokens_details"]["cached_tokens"] == 1792
    assert second["prompt_tokens"] == prefix_tokens + 4 + tokens("Another question?") + 3


@pytest.mark.asyncio
async def test_a_growing_conversation_reuses_its_cached_start(server: FakeServer) -> None:
    opening = [SYSTEM, user("First question?")]
    await usage(server, opening)

    follow_up = [*opening, {"role": "assistant", "content": "An answer."}, user("And then?")]
    second = await usage(server, follow_up)

    cached_prefix = 4 + tokens(MANUAL) + 4 + tokens("First question?")
    assert second["prompt_tokens_details"]["cached_tokens"] == cached_prefix // 128 * 128


@pytest.mark.asyncio
async def test_short_prefixes_are_never_cached(server: FakeServer) -> None:
    short = {"role": "system", "content": "Be brief."}
    await usage(server, [short, user("One?")])

    second = await usage(server, [short, user("Two?")])

    assert second["prompt_tokens_details"]["cached_tokens"] == 0


@pytest.mark.asyncio
async def test_another_model_has_its_own_cache(server: FakeServer) -> None:
    await usage(server, [SYSTEM, user("First question?")])

    answer = await server.chat({"model": "gpt-4.1", "messages": [SYSTEM, user("Again?")]})

    assert answer.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


@pytest.mark.asyncio
async def test_cache_can_be_cleared(server: FakeServer) -> None:
    await usage(server, [SYSTEM, user("First question?")])

    async with server.session.delete(f"{server.base}/_fake/cache") as response:
        assert response.status == 204
    second = await usage(server, [SYSTEM, user("Another question?")])

    assert second["prompt_tokens_details"]["cached_tokens"] == 0


def test_cache_forgets_the_least_recently_used_prefix() -> None:
    cache = PromptCache(capacity=4, min_tokens=10, block=1)  # room for two conversations

    def conversation(system: str) -> Conversation:
        return Conversation("m", (Turn("system", system, 20), Turn("user", "q", 5)))

    for system in ("a", "b", "a", "c"):  # "a" is used again, so "b" is the one evicted
        cache.observe(conversation(system))

    assert cache.observe(conversation("a")) == 20
    assert cache.observe(conversation("b")) == 0
