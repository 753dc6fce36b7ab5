"""Invalid requests get OpenAI's 400 with its exact message, param and code."""

from __future__ import annotations

from typing import Any

import pytest

from tests.fake.conftest import CHAT, FakeServer, user

HELLO = [user("Hello")]
WEATHER_TOOL = {"type": "function", "function": {"name": "weather", "parameters": {}}}


def error(message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {
        "error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}
    }


CASES: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    (
        "missing model",
        {"messages": HELLO},
        error("you must provide a model parameter"),
    ),
    (
        "missing messages",
        {"model": "gpt-4o"},
        error("Missing required parameter: 'messages'.", "messages", "missing_required_parameter"),
    ),
    (
        "empty messages",
        {"model": "gpt-4o", "messages": []},
        error(
            "Invalid 'messages': empty array. Expected an array with minimum length 1, but got"
            " an empty array instead.",
            "messages",
            "empty_array",
        ),
    ),
    (
        "unknown role",
        {"model": "gpt-4o", "messages": [user("a"), {"role": "robot", "content": "b"}]},
        error(
            "Invalid value: 'robot'. Supported values are: 'system', 'assistant', 'user',"
            " 'function', 'tool', and 'developer'.",
            "messages[1].role",
            "invalid_value",
        ),
    ),
    (
        "message without role",
        {"model": "gpt-4o", "messages": [{"content": "b"}]},
        error(
            "Missing required parameter: 'messages[0].role'.",
            "messages[0].role",
            "missing_required_parameter",
        ),
    ),
    (
        "content of the wrong type",
        {"model": "gpt-4o", "messages": [user(3)]},  # type: ignore[arg-type]
        error(
            "Invalid type for 'messages[0].content': expected `str | array | null`, got `int`.",
            "messages[0].content",
            "invalid_type",
        ),
    ),
    (
        "user message without content",
        {"model": "gpt-4o", "messages": [{"role": "user"}]},
        error("Invalid value for 'content': expected a string, got null.", "messages[0].content"),
    ),
    (
        "tool message without a tool call before it",
        {"model": "gpt-4o", "messages": [{"role": "tool", "tool_call_id": "x", "content": "1"}]},
        error(
            "Invalid parameter: messages with role 'tool' must be a response to a preceeding"
            " message with 'tool_calls'.",
            "messages[0].role",
        ),
    ),
    (
        "n above 1",
        {"model": "gpt-4o", "messages": HELLO, "n": 2},
        error("Invalid 'n': the fake provider only supports n=1, got 2.", "n", "unsupported_value"),
    ),
    (
        "max_tokens on a reasoning model",
        {"model": "o3-mini", "messages": HELLO, "max_tokens": 10},
        error(
            "Unsupported parameter: 'max_tokens' is not supported with this model. Use"
            " 'max_completion_tokens' instead.",
            "max_tokens",
            "unsupported_parameter",
        ),
    ),
    (
        "max_tokens below 1",
        {"model": "gpt-4o", "messages": HELLO, "max_tokens": 0},
        error(
            "Invalid 'max_tokens': integer below minimum value. Expected a value >= 1, but got"
            " 0 instead.",
            "max_tokens",
            "integer_below_min_value",
        ),
    ),
    (
        "stream_options without stream",
        {"model": "gpt-4o", "messages": HELLO, "stream_options": {"include_usage": True}},
        error(
            "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
            "stream_options",
        ),
    ),
    (
        "tool_choice without tools",
        {"model": "gpt-4o", "messages": HELLO, "tool_choice": "auto"},
        error(
            "Invalid value for 'tool_choice': 'tool_choice' is only allowed when 'tools' are"
            " specified.",
            "tool_choice",
        ),
    ),
    (
        "unknown tool_choice",
        {"model": "gpt-4o", "messages": HELLO, "tools": [WEATHER_TOOL], "tool_choice": "any"},
        error(
            "Invalid value: 'any'. Supported values are: 'none', 'auto', and 'required'.",
            "tool_choice",
            "invalid_value",
        ),
    ),
    (
        "unknown response_format",
        {"model": "gpt-4o", "messages": HELLO, "response_format": {"type": "yaml"}},
        error(
            "Invalid value: 'yaml'. Supported values are: 'text', 'json_object', and"
            " 'json_schema'.",
            "response_format.type",
            "invalid_value",
        ),
    ),
    (
        "json_schema without its schema",
        {"model": "gpt-4o", "messages": HELLO, "response_format": {"type": "json_schema"}},
        error(
            "Missing required parameter: 'response_format.json_schema'.",
            "response_format.json_schema",
            "missing_required_parameter",
        ),
    ),
    (
        "json_object without the word json",
        {"model": "gpt-4o", "messages": HELLO, "response_format": {"type": "json_object"}},
        error(
            "'messages' must contain the word 'json' in some form, to use 'response_format' of"
            " type 'json_object'.",
            "messages",
        ),
    ),
]


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("request_body", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
async def test_invalid_request_is_rejected_like_openai(
    server: FakeServer, request_body: dict[str, Any], expected: dict[str, Any]
) -> None:
    answer = await server.chat(request_body)

    assert (answer.status, answer.json()) == (400, expected)
    assert answer.headers["Content-Type"] == "application/json"
    assert answer.headers["x-request-id"].startswith("req_")


@pytest.mark.asyncio
@pytest.mark.parametrize("body", [b'{"model": "gpt-4o", "messa', b"[]"], ids=["cut", "array"])
async def test_body_that_is_not_a_json_object_is_rejected(server: FakeServer, body: bytes) -> None:
    answer = await server.post_raw(CHAT, body, {"Content-Type": "application/json"})

    assert answer.status == 400
    assert answer.json()["error"]["message"].startswith(
        "We could not parse the JSON body of your request."
    )
    assert (answer.json()["error"]["param"], answer.json()["error"]["code"]) == (None, None)


@pytest.mark.asyncio
async def test_error_body_is_pretty_printed_like_openais(server: FakeServer) -> None:
    answer = await server.chat({"messages": HELLO})

    assert answer.body.decode() == (
        "{\n"
        '    "error": {\n'
        '        "message": "you must provide a model parameter",\n'
        '        "type": "invalid_request_error",\n'
        '        "param": null,\n'
        '        "code": null\n'
        "    }\n"
        "}\n"
    )


@pytest.mark.asyncio
async def test_rejected_requests_are_logged_with_their_status(server: FakeServer) -> None:
    await server.chat({"model": "gpt-4o", "messages": []})

    [entry] = await server.log()

    assert (entry["status"], entry["model"], entry["prompt_tokens"]) == (400, "gpt-4o", 0)
