"""Non-streamed chat completions: shape, determinism, usage, limits."""

from __future__ import annotations

from typing import Any

import pytest
from openai.types.chat import ChatCompletion

from tests.fake.conftest import FakeServer, tokens, user

OPENAI_HEADERS = {
    "x-request-id",
    "openai-processing-ms",
    "x-ratelimit-limit-requests",
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-requests",
    "x-ratelimit-reset-tokens",
}


def keys(value: Any) -> Any:
    """The nested key structure of a JSON value, to compare shapes."""
    if isinstance(value, dict):
        return {k: keys(v) for k, v in value.items()}
    if isinstance(value, list):
        return [keys(v) for v in value]
    return None


@pytest.mark.asyncio
async def test_answer_is_a_complete_chat_completion(server: FakeServer) -> None:
    answer = await server.chat({"model": "gpt-4o-mini", "messages": [user("Hello!")]})

    body = answer.json()
    parsed = ChatCompletion.model_validate(body)
    assert answer.status == 200
    assert answer.headers["Content-Type"] == "application/json"
    assert keys(parsed.model_dump(mode="json", exclude_unset=True)) == keys(body)
    assert keys(body) == {
        "id": None,
        "object": None,
        "created": None,
        "model": None,
        "choices": [
            {
                "index": None,
                "message": {"role": None, "content": None, "refusal": None, "annotations": []},
                "logprobs": None,
                "finish_reason": None,
            }
        ],
        "usage": {
            "prompt_tokens": None,
            "completion_tokens": None,
            "total_tokens": None,
            "prompt_tokens_details": {"cached_tokens": None, "audio_tokens": None},
            "completion_tokens_details": {
                "reasoning_tokens": None,
                "audio_tokens": None,
                "accepted_prediction_tokens": None,
                "rejected_prediction_tokens": None,
            },
        },
        "service_tier": None,
        "system_fingerprint": None,
    }
    assert parsed.id.startswith("chatcmpl-")
    assert parsed.object == "chat.completion"
    assert parsed.model == "gpt-4o-mini"
    assert parsed.choices[0].message.role == "assistant"
    assert parsed.choices[0].message.refusal is None
    assert parsed.choices[0].logprobs is None
    assert parsed.choices[0].finish_reason == "stop"
    assert parsed.choices[0].message.content


@pytest.mark.asyncio
async def test_headers_are_openais(server: FakeServer) -> None:
    first = await server.chat({"model": "gpt-4o", "messages": [user("Hi")]})
    second = await server.chat({"model": "gpt-4o", "messages": [user("Hi")]})

    sent = {name.lower() for name in first.headers}
    assert sent >= OPENAI_HEADERS
    assert first.headers["x-request-id"].startswith("req_")
    assert first.headers["x-request-id"] != second.headers["x-request-id"]
    assert first.headers["x-ratelimit-limit-requests"] == "10000"
    assert int(first.headers["x-ratelimit-remaining-requests"]) == 9999
    assert first.json()["id"] != second.json()["id"]


@pytest.mark.asyncio
async def test_same_request_same_answer_other_prompt_other_answer(server: FakeServer) -> None:
    request = {"model": "gpt-4o", "messages": [user("What is a ledger?")]}

    first = (await server.chat(request)).json()["choices"][0]["message"]["content"]
    again = (await server.chat(request)).json()["choices"][0]["message"]["content"]
    other = await server.chat({"model": "gpt-4o", "messages": [user("What is a broker?")]})

    assert first == again
    assert other.json()["choices"][0]["message"]["content"] != first


@pytest.mark.asyncio
async def test_usage_is_computed_from_the_text(server: FakeServer) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        user("Hello, world!"),
    ]

    usage = (await server.chat({"model": "gpt-4o", "messages": messages})).json()["usage"]
    content = (await server.chat({"model": "gpt-4o", "messages": messages})).json()["choices"][0][
        "message"
    ]["content"]

    # 4 tokens per message (template + role), 3 to prime the reply
    expected_prompt = (4 + tokens("Be brief.")) + (4 + tokens("Hello, world!")) + 3
    assert usage["prompt_tokens"] == expected_prompt == 18
    assert usage["completion_tokens"] == tokens(content)
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["prompt_tokens_details"] == {"cached_tokens": 0, "audio_tokens": 0}
    assert usage["completion_tokens_details"]["reasoning_tokens"] == 0


@pytest.mark.asyncio
async def test_max_tokens_truncates_with_finish_reason_length(server: FakeServer) -> None:
    request: dict[str, Any] = {"model": "gpt-4o", "messages": [user("Tell me everything.")]}
    full = (await server.chat(request)).json()["choices"][0]["message"]["content"]

    for limit_field in ("max_tokens", "max_completion_tokens"):
        body = (await server.chat({**request, limit_field: 5})).json()

        content = body["choices"][0]["message"]["content"]
        assert body["choices"][0]["finish_reason"] == "length"
        assert body["usage"]["completion_tokens"] == 5
        assert tokens(content) == 5
        assert full.startswith(content)
        assert len(content) < len(full)


@pytest.mark.asyncio
async def test_large_max_tokens_changes_nothing(server: FakeServer) -> None:
    request: dict[str, Any] = {"model": "gpt-4o", "messages": [user("Tell me everything.")]}

    full = (await server.chat(request)).json()["choices"][0]
    roomy = (await server.chat({**request, "max_tokens": 4096})).json()["choices"][0]

    assert roomy == full


@pytest.mark.asyncio
async def test_stop_sequence_cuts_before_it(server: FakeServer) -> None:
    request: dict[str, Any] = {"model": "gpt-4o", "messages": [user("Say something long.")]}
    full = (await server.chat(request)).json()["choices"][0]["message"]["content"]
    words = full.split()
    stop = " " + words[len(words) // 2]

    body = (await server.chat({**request, "stop": [stop, "never-appears"]})).json()

    assert body["choices"][0]["message"]["content"] == full[: full.index(stop)]
    assert body["choices"][0]["finish_reason"] == "stop"


@pytest.mark.asyncio
async def test_reasoning_models_bill_reasoning_inside_completion(server: FakeServer) -> None:
    body = (await server.chat({"model": "o3-mini", "messages": [user("Think.")]})).json()

    usage = body["usage"]
    reasoning = usage["completion_tokens_details"]["reasoning_tokens"]
    assert reasoning > 0
    assert usage["completion_tokens"] == reasoning + tokens(
        body["choices"][0]["message"]["content"]
    )


@pytest.mark.asyncio
async def test_reasoning_can_use_up_the_whole_budget(server: FakeServer) -> None:
    request = {"model": "o1", "messages": [user("Think.")], "max_completion_tokens": 10}

    body = (await server.chat(request)).json()

    assert body["choices"][0]["message"]["content"] == ""
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 10
    assert body["usage"]["completion_tokens_details"]["reasoning_tokens"] == 10


@pytest.mark.asyncio
async def test_non_reasoning_models_named_like_o_words_do_not_reason(server: FakeServer) -> None:
    body = (await server.chat({"model": "omni-fake", "messages": [user("Hi")]})).json()

    assert body["usage"]["completion_tokens_details"]["reasoning_tokens"] == 0


@pytest.mark.asyncio
async def test_multi_part_content_counts_its_text(server: FakeServer) -> None:
    parts = [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]

    usage = (await server.chat({"model": "gpt-4o", "messages": [user(parts)]})).json()["usage"]

    assert usage["prompt_tokens"] == 4 + 2 + 3
