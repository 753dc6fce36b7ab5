"""Refusals every wire format shares: the context window and the content-policy trigger."""

from __future__ import annotations

import msgspec
import openai
import pytest

from modelyard.fake.cache import PromptCache
from modelyard.fake.conversation import CachePoint, Conversation, Turn
from modelyard.fake.screen import POLICY_TRIGGER, ContentPolicy, ContextWindow, screen
from modelyard.fake.text import cut_at_stop
from modelyard.fake.validation import Problem, problem
from tests.fake.conftest import FakeServer, tokens, user


class Inner(msgspec.Struct):
    c: int


class Outer(msgspec.Struct, forbid_unknown_fields=True):
    a: int
    b: list[Inner] | None = None


def conversation(*texts: str) -> Conversation:
    return Conversation("m", tuple(Turn("user", text, tokens(text)) for text in texts))


def test_screen_checks_the_length_before_the_policy() -> None:
    long_and_forbidden = conversation(f"{POLICY_TRIGGER} " + "word " * 20)

    assert screen(conversation("fine"), 100) is None
    assert screen(conversation("so", f"it is {POLICY_TRIGGER}"), 100) == ContentPolicy()
    assert screen(long_and_forbidden, 10) == ContextWindow(23, 10)


@pytest.mark.asyncio
async def test_openai_content_policy_is_a_400_with_its_code(server: FakeServer) -> None:
    answer = await server.chat({"model": "gpt-4o", "messages": [user("forbidden-content")]})

    assert answer.status == 400
    assert answer.json()["error"] == {
        "message": "Your request was rejected as a result of our safety system. Your prompt may"
        " contain text that is not allowed by our safety system.",
        "type": "invalid_request_error",
        "param": None,
        "code": "content_policy_violation",
    }
    [entry] = await server.log()
    assert (entry["status"], entry["fault"], entry["prompt_tokens"]) == (400, None, 0)


@pytest.mark.asyncio
async def test_openai_context_window_is_context_length_exceeded(server: FakeServer) -> None:
    await server.configure(context_window=10)

    answer = await server.chat({"model": "gpt-4o", "messages": [user("a b c d")]})

    assert answer.status == 400
    assert answer.json()["error"] == {
        "message": "This model's maximum context length is 10 tokens. However, your messages"
        " resulted in 11 tokens. Please reduce the length of the messages.",
        "type": "invalid_request_error",
        "param": "messages",
        "code": "context_length_exceeded",
    }


@pytest.mark.asyncio
async def test_refusals_do_not_roll_the_fault_dice(server: FakeServer) -> None:
    await server.configure(rate_500=1.0)

    answer = await server.chat({"model": "gpt-4o", "messages": [user("forbidden-content")]})

    assert answer.status == 400


@pytest.mark.asyncio
async def test_the_sdk_sees_typed_refusals(server: FakeServer) -> None:
    async with openai.AsyncOpenAI(api_key="k", base_url=f"{server.base}/v1", max_retries=0) as sdk:
        with pytest.raises(openai.BadRequestError) as refused:
            await sdk.chat.completions.create(
                model="gpt-4o", messages=[{"role": "user", "content": "forbidden-content"}]
            )

    assert refused.value.code == "content_policy_violation"


def test_marked_cache_reads_the_longest_seen_mark_and_writes_to_the_last() -> None:
    cache = PromptCache(min_tokens=10)

    def marked(*points: tuple[int, int]) -> Conversation:
        return Conversation("m", (), cache_points=tuple(CachePoint(k, t) for k, t in points))

    assert cache.observe_marked(marked((1, 20))) == (0, 20)
    assert cache.observe_marked(marked((1, 20), (2, 50))) == (20, 30)
    assert cache.observe_marked(marked((1, 20), (2, 50))) == (50, 0)
    assert cache.observe_marked(marked((3, 5))) == (0, 0)  # below the minimum: ignored


def test_cut_at_stop_names_the_earliest_stop() -> None:
    assert cut_at_stop("one two three", ("three", "two")) == ("one ", "two")
    assert cut_at_stop("one two", ("four", "")) == ("one two", None)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b'{"a": "x"}', Problem("type", ("a",), "Expected `int`, got `str`", "int", "str")),
        (b"{}", Problem("missing", ("a",), "Object missing required field `a`")),
        (b'{"a": 1, "z": 0}', Problem("unknown", ("z",), "Object contains unknown field `z`")),
        (
            b'{"a": 1, "b": [{"c": 1}, {"c": null}]}',
            Problem("type", ("b", 1, "c"), "Expected `int`, got `null`", "int", "null"),
        ),
    ],
)
def test_validation_problems_are_read_from_msgspec(raw: bytes, expected: Problem) -> None:
    with pytest.raises(msgspec.ValidationError) as raised:
        msgspec.json.decode(raw, type=Outer)

    assert problem(raised.value) == expected
