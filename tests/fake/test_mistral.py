"""Mistral chat completions under /mistral/v1: Mistral's shapes, checked field by field.

The Mistral SDK is not a project dependency; where it is installed its types
and client are checked too, else those tests are skipped.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from pydantic import BaseModel, Field

from modelyard.fake import FakeSettings
from tests.fake.conftest import Answer, FakeServer, running, sse, tokens, user

KEY = "mistral-fake-0123456789abcdef"
MODEL = "mistral-small-latest"
PATH = "/mistral/v1/chat/completions"
HEADERS = {"Authorization": f"Bearer {KEY}"}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "days"],
        },
    },
}
CLOCK = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string"}},
            "required": ["zone"],
        },
    },
}
TOOL_CALL_ID = re.compile(r"[a-zA-Z0-9]{9}")


class Weather(BaseModel):
    city: str
    days: int = Field(ge=1, le=7)


def request(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [user("Hello")], **fields}


async def complete(server: FakeServer, **fields: Any) -> dict[str, Any]:
    answer = await server.post(PATH, request(**fields), HEADERS)
    assert answer.status == 200, answer.body
    body: dict[str, Any] = answer.json()
    assert_completion_shape(body)
    return body


def assert_completion_shape(body: dict[str, Any]) -> None:
    """Mistral's chat completion, key by key (no service_tier, no usage details)."""
    assert list(body) == ["id", "object", "created", "model", "choices", "usage"]
    assert re.fullmatch(r"[0-9a-f]{32}", body["id"])
    assert body["object"] == "chat.completion"
    [choice] = body["choices"]
    assert list(choice) == ["index", "message", "finish_reason"]
    assert list(choice["message"]) == ["role", "tool_calls", "content"]
    assert choice["finish_reason"] in ("stop", "length", "model_length", "error", "tool_calls")
    usage = body["usage"]
    assert list(usage) == ["prompt_tokens", "total_tokens", "completion_tokens"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def error_of(answer: Answer) -> tuple[int, Any, str, str | None]:
    body = answer.json()
    assert list(body) == ["object", "message", "type", "param", "code"]
    assert (body["object"], body["param"]) == ("error", None)
    return answer.status, body["message"], body["type"], body["code"]


def detail_of(answer: Answer) -> dict[str, Any]:
    status, message, type_, _ = error_of(answer)
    assert (status, type_) == (422, "invalid_request_error")
    [detail] = message["detail"]
    result: dict[str, Any] = detail
    return result


# Happy path -------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_completion_has_mistrals_shape_and_the_log_joins_on_its_id(
    server: FakeServer,
) -> None:
    answer = await server.post(PATH, request(random_seed=7), HEADERS)
    body = answer.json()
    [entry] = await server.log()

    assert_completion_shape(body)
    message = body["choices"][0]["message"]
    assert (message["role"], message["tool_calls"]) == ("assistant", None)
    assert body["usage"]["prompt_tokens"] == 2 + tokens("Hello")
    assert body["usage"]["completion_tokens"] == tokens(message["content"])
    assert answer.headers["mistral-correlation-id"] == body["id"] == entry["request_id"]
    assert int(answer.headers["x-ratelimit-remaining-req-minute"]) > 0
    assert (entry["provider"], entry["path"], entry["model"]) == ("mistral", PATH, MODEL)
    assert (entry["prompt_tokens"], entry["cached_tokens"]) == (body["usage"]["prompt_tokens"], 0)


@pytest.mark.asyncio
async def test_max_tokens_and_stop_end_the_answer(server: FakeServer) -> None:
    whole = (await complete(server))["choices"][0]["message"]["content"]
    word = whole.split()[2]

    short = await complete(server, max_tokens=2)
    stopped = await complete(server, stop=word)

    assert (short["choices"][0]["finish_reason"], short["usage"]["completion_tokens"]) == (
        "length",
        2,
    )
    assert stopped["choices"][0]["finish_reason"] == "stop"
    assert whole.startswith(stopped["choices"][0]["message"]["content"])


@pytest.mark.asyncio
async def test_repeated_prompts_are_not_reported_as_cached(server: FakeServer) -> None:
    manual = "Keep every queue durable and every ack late. " * 200
    for _ in range(2):
        await complete(server, messages=[{"role": "system", "content": manual}, user("Q?")])

    assert [e["cached_tokens"] for e in await server.log()] == [0, 0]


# Streaming --------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_stream_reassembles_and_ends_with_usage_and_done(server: FakeServer) -> None:
    answer = await server.post(PATH, request(stream=True), HEADERS)
    whole = await complete(server)

    data = [d for _, d in sse(answer.body)]
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert all(
        c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks
    )
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == whole["choices"][0]["message"]["content"]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + [
        "stop"
    ]
    assert ["usage" in c for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert chunks[-1]["usage"] == whole["usage"]


# Tools and JSON ---------------------------------------------------------------------


@pytest.mark.asyncio
async def test_tool_calls_have_nine_character_ids_and_fitting_arguments(server: FakeServer) -> None:
    body = await complete(server, tools=[WEATHER, CLOCK], tool_choice="any")

    choice = body["choices"][0]
    calls = choice["message"]["tool_calls"]
    assert (choice["finish_reason"], choice["message"]["content"]) == ("tool_calls", "")
    assert [c["function"]["name"] for c in calls] == ["get_weather", "get_time"]
    assert [c["index"] for c in calls] == [0, 1]
    assert all(TOOL_CALL_ID.fullmatch(c["id"]) for c in calls)
    Weather.model_validate_json(calls[0]["function"]["arguments"])


@pytest.mark.asyncio
async def test_named_tool_choice_and_parallel_switch(server: FakeServer) -> None:
    named = await complete(
        server,
        tools=[WEATHER, CLOCK],
        tool_choice={"type": "function", "function": {"name": "get_time"}},
    )
    single = await complete(server, tools=[WEATHER, CLOCK], parallel_tool_calls=False)
    none = await complete(server, tools=[WEATHER], tool_choice="none")

    assert [c["function"]["name"] for c in named["choices"][0]["message"]["tool_calls"]] == [
        "get_time"
    ]
    assert len(single["choices"][0]["message"]["tool_calls"]) == 1
    assert none["choices"][0]["message"]["tool_calls"] is None


@pytest.mark.asyncio
async def test_streamed_tool_calls_arrive_whole_in_the_last_chunk(server: FakeServer) -> None:
    answer = await server.post(
        PATH, request(stream=True, tools=[WEATHER], tool_choice="any"), HEADERS
    )
    whole = await complete(server, tools=[WEATHER], tool_choice="any")

    chunks = [json.loads(d) for _, d in sse(answer.body)[:-1]]
    last = chunks[-1]["choices"][0]
    assert last["finish_reason"] == "tool_calls"
    assert last["delta"]["tool_calls"] == whole["choices"][0]["message"]["tool_calls"]


@pytest.mark.asyncio
async def test_tool_results_get_a_text_answer(server: FakeServer) -> None:
    call = (await complete(server, tools=[WEATHER], tool_choice="any"))["choices"][0]["message"][
        "tool_calls"
    ][0]
    history = [
        user("Weather?"),
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call["id"], "name": "get_weather", "content": "Sunny"},
    ]

    body = await complete(server, tools=[WEATHER], messages=history)

    assert body["choices"][0]["finish_reason"] == "stop"


@pytest.mark.asyncio
async def test_json_schema_response_format_gives_matching_json(server: FakeServer) -> None:
    schema = {"name": "weather", "schema": Weather.model_json_schema(), "strict": True}
    typed = await complete(server, response_format={"type": "json_schema", "json_schema": schema})
    free = await complete(server, response_format={"type": "json_object"})

    Weather.model_validate_json(typed["choices"][0]["message"]["content"])
    assert isinstance(json.loads(free["choices"][0]["message"]["content"]), dict)


# Validation and auth -------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        (
            {"seed": 7},
            {
                "type": "extra_forbidden",
                "loc": ["body", "seed"],
                "msg": "Extra inputs are not permitted",
                "input": 7,
            },
        ),
        (
            {"stream_options": {"include_usage": True}},
            {
                "type": "extra_forbidden",
                "loc": ["body", "stream_options"],
                "msg": "Extra inputs are not permitted",
                "input": {"include_usage": True},
            },
        ),
        (
            {"messages": [{"role": "user", "content": "Hi", "name": "ann"}]},
            {
                "type": "extra_forbidden",
                "loc": ["body", "messages", 0, "user", "name"],
                "msg": "Extra inputs are not permitted",
                "input": "ann",
            },
        ),
        (
            {"max_tokens": "many"},
            {
                "type": "int_type",
                "loc": ["body", "max_tokens"],
                "msg": "Input should be a valid integer",
                "input": "many",
            },
        ),
        (
            {"model": None},
            {
                "type": "missing",
                "loc": ["body", "model"],
                "msg": "Field required",
                "input": {"messages": [user("Hello")]},
            },
        ),
    ],
)
async def test_schema_problems_are_pydantic_422s(
    server: FakeServer, fields: dict[str, Any], expected: dict[str, Any]
) -> None:
    body = {key: value for key, value in request(**fields).items() if value is not None}

    answer = await server.post(PATH, body, HEADERS)

    assert detail_of(answer) == expected


@pytest.mark.asyncio
async def test_unknown_role_and_tool_choice_are_422s(server: FakeServer) -> None:
    role = await server.post(PATH, request(messages=[{"role": "bot", "content": "Hi"}]), HEADERS)
    choice = await server.post(PATH, request(tools=[WEATHER], tool_choice="sometimes"), HEADERS)

    assert detail_of(role)["type"] == "union_tag_invalid"
    assert detail_of(role)["loc"] == ["body", "messages", 0]
    assert detail_of(choice) == {
        "type": "enum",
        "loc": ["body", "tool_choice"],
        "msg": "Input should be 'auto', 'none', 'any' or 'required'",
        "input": "sometimes",
        "ctx": {"expected": "'auto', 'none', 'any' or 'required'"},
    }


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("messages", "message"),
    [
        (
            [user("Hi"), {"role": "assistant", "content": "Yo"}],
            "Expected last role User or Tool (or Assistant with prefix True) for serving but got"
            " assistant",
        ),
        (
            [
                user("Hi"),
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [
                        {"id": "abc123XYZ", "function": {"name": "f", "arguments": "{}"}}
                    ],
                },
                {"role": "tool", "tool_call_id": "abc123XYZ", "content": "ok"},
                user("And?"),
            ],
            "Unexpected role 'user' after role 'tool'",
        ),
    ],
)
async def test_message_order_is_checked_like_mistrals_template(
    server: FakeServer, messages: list[dict[str, Any]], message: str
) -> None:
    answer = await server.post(PATH, request(messages=messages), HEADERS)

    assert error_of(answer) == (400, message, "invalid_request_message_order", "3230")


@pytest.mark.asyncio
async def test_prefix_assistant_is_served_and_bad_tool_call_ids_are_refused(
    server: FakeServer,
) -> None:
    prefixed = await server.post(
        PATH,
        request(messages=[user("Hi"), {"role": "assistant", "content": "Well", "prefix": True}]),
        HEADERS,
    )
    bad_id = [
        user("Hi"),
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"id": "call_abc", "function": {"name": "f", "arguments": {}}}],
        },
        {"role": "tool", "tool_call_id": "call_abc", "content": "ok"},
    ]
    refused = await server.post(PATH, request(messages=bad_id), HEADERS)

    assert prefixed.status == 200
    assert error_of(refused) == (
        400,
        "Tool call id was call_abc but must be a-z, A-Z, 0-9, with a length of 9.",
        "invalid_request_error",
        None,
    )


@pytest.mark.asyncio
async def test_bearer_key_is_checked() -> None:
    async with running(FakeSettings(api_key=KEY)) as server:
        wrong = await server.post(PATH, request(), {"Authorization": "Bearer nope"})
        right = await server.post(PATH, request(), HEADERS)

    assert (wrong.status, wrong.json()) == (401, {"message": "Unauthorized"})
    assert right.status == 200


# Faults and refusals ------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        ("rate_429", (429, "Rate limit exceeded", "rate_limited", "1300")),
        ("rate_quota", (429, "Monthly usage limit exceeded", "usage_limit_exceeded", None)),
        ("rate_500", (500, "Internal server error", "internal_server_error", None)),
        (
            "rate_503",
            (503, "Service tier capacity exceeded for this model.", "invalid_request_error", None),
        ),
    ],
)
async def test_faults_have_mistrals_bodies(
    server: FakeServer, setting: str, expected: tuple[int, str, str, str | None]
) -> None:
    await server.configure(**{setting: 1.0})

    answer = await server.post(PATH, request(), HEADERS)

    assert error_of(answer) == expected
    assert "retry-after" not in answer.headers


@pytest.mark.asyncio
async def test_malformed_stream_breaks_off_without_done(server: FakeServer) -> None:
    await server.configure(rate_malformed=1.0)

    answer = await server.post(PATH, request(stream=True), HEADERS)

    assert answer.status == 200
    events = answer.body.decode().split("\n\n")
    assert "data: [DONE]" not in events
    with pytest.raises(json.JSONDecodeError):
        json.loads(events[-1].removeprefix("data: "))


@pytest.mark.asyncio
async def test_content_policy_and_context_window_are_400s(server: FakeServer) -> None:
    policy = await server.post(PATH, request(messages=[user("forbidden-content")]), HEADERS)
    await server.configure(context_window=5)
    long = await server.post(PATH, request(messages=[user("one two three four five six")]), HEADERS)

    assert error_of(policy) == (
        400,
        "Prompt was blocked by the moderation policy.",
        "invalid_request_error",
        None,
    )
    assert error_of(long) == (
        400,
        "Prompt contains 8 tokens and 0 draft tokens, too large for model with 5 maximum context"
        " length",
        "invalid_request_error",
        None,
    )


# The SDK, where installed ----------------------------------------------------------------


@pytest.mark.asyncio
async def test_mistral_sdk_types_validate_bodies_and_chunks(server: FakeServer) -> None:
    models = pytest.importorskip("mistralai.client.models")
    body = await complete(server, tools=[WEATHER], tool_choice="any")
    answer = await server.post(PATH, request(stream=True), HEADERS)

    response = models.ChatCompletionResponse.model_validate(body)
    chunks = [models.CompletionChunk.model_validate_json(d) for _, d in sse(answer.body)[:-1]]

    assert (
        response.choices[0].message.tool_calls[0].id
        == body["choices"][0]["message"]["tool_calls"][0]["id"]
    )
    assert chunks[-1].usage.total_tokens > 0


@pytest.mark.asyncio
async def test_mistral_sdk_client_completes_and_streams() -> None:
    client_module = pytest.importorskip("mistralai.client")
    messages = [{"role": "user", "content": "Hello"}]
    async with running(FakeSettings(api_key=KEY)) as server:
        sdk = client_module.Mistral(api_key=KEY, server_url=f"{server.base}/mistral")
        async with sdk:
            whole = await sdk.chat.complete_async(model=MODEL, messages=messages, random_seed=1)
            stream = await sdk.chat.stream_async(model=MODEL, messages=messages)
            chunks = [event.data async for event in stream]

    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
