"""Anthropic Messages: the official SDK and its types see a real Anthropic API."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any, Literal

import anthropic
import pytest
import pytest_asyncio
from anthropic.types import Message, RawMessageStreamEvent
from anthropic.types.shared import ErrorResponse
from pydantic import BaseModel, Field, TypeAdapter

from modelyard.fake import FakeSettings
from tests.fake.conftest import Answer, FakeServer, running, sse, tokens, user

KEY = "sk-ant-fake-0123456789abcdef"
MODEL = "claude-haiku-4-5"
PATH = "/v1/messages"
HEADERS = {"x-api-key": KEY, "anthropic-version": "2023-06-01"}
MANUAL = "The operator manual says: " + "keep every queue durable and every ack late. " * 210
EVENTS: TypeAdapter[RawMessageStreamEvent] = TypeAdapter(RawMessageStreamEvent)


class Weather(BaseModel):
    city: str
    days: int = Field(ge=1, le=7)
    unit: Literal["celsius", "fahrenheit"]


WEATHER = {
    "name": "get_weather",
    "description": "Weather for a city",
    "input_schema": {
        "type": "object",
        "properties": {
            "city": {"type": "string"},
            "days": {"type": "integer", "minimum": 1, "maximum": 7},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        },
        "required": ["city", "days", "unit"],
    },
}
CLOCK = {
    "name": "get_time",
    "input_schema": {"type": "object", "properties": {"zone": {"type": "string"}}},
}


@pytest_asyncio.fixture
async def guarded() -> AsyncIterator[FakeServer]:
    async with running(FakeSettings(api_key=KEY)) as server:
        yield server


def client(server: FakeServer, key: str = KEY) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(api_key=key, base_url=server.base, max_retries=0)


def request(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "max_tokens": 200, "messages": [user("Hello")], **fields}


async def create(server: FakeServer, **fields: Any) -> Message:
    answer = await server.post(PATH, request(**fields), HEADERS)
    assert answer.status == 200, answer.body
    return Message.model_validate(answer.json())


def error_of(answer: Answer) -> tuple[int, str, str]:
    body = ErrorResponse.model_validate(answer.json())
    return answer.status, body.error.type, body.error.message


def text_of(message: anthropic.types.Message) -> str:
    return "".join(block.text for block in message.content if block.type == "text")


# Happy path ---------------------------------------------------------------------


@pytest.mark.asyncio
async def test_sdk_message_has_anthropics_shape_headers_and_log(guarded: FakeServer) -> None:
    async with client(guarded) as sdk:
        raw = await sdk.messages.with_raw_response.create(
            model=MODEL, max_tokens=200, messages=[{"role": "user", "content": "Hello"}]
        )
    message = await raw.parse()
    [entry] = await guarded.log()

    assert message.id.startswith("msg_01")
    assert (message.role, message.model, message.stop_reason) == ("assistant", MODEL, "end_turn")
    assert message.stop_sequence is None
    assert [block.type for block in message.content] == ["text"]
    assert message.usage.input_tokens == 4 + tokens("Hello") + 3
    assert message.usage.output_tokens == tokens(text_of(message))
    assert (message.usage.cache_read_input_tokens, message.usage.cache_creation_input_tokens) == (
        0,
        0,
    )
    assert message.usage.service_tier == "standard"
    assert raw.headers["request-id"] == entry["request_id"]
    assert entry["request_id"].startswith("req_01")
    assert int(raw.headers["anthropic-ratelimit-requests-remaining"]) > 0
    assert raw.headers["anthropic-ratelimit-tokens-reset"].endswith("Z")
    assert (entry["provider"], entry["path"], entry["model"], entry["status"]) == (
        "anthropic",
        PATH,
        MODEL,
        200,
    )
    assert (entry["prompt_tokens"], entry["completion_tokens"]) == (8, message.usage.output_tokens)


@pytest.mark.asyncio
async def test_answers_are_deterministic_and_system_prompts_count(server: FakeServer) -> None:
    first = await create(server, system="Be brief.")
    again = await create(server, system=[{"type": "text", "text": "Be brief."}])
    other = await create(server)

    assert text_of(first) == text_of(again) != text_of(other)
    assert first.usage.input_tokens == other.usage.input_tokens + 4 + tokens("Be brief.")


@pytest.mark.asyncio
async def test_max_tokens_and_stop_sequences_end_the_answer(server: FakeServer) -> None:
    whole = text_of(await create(server))
    word = whole.split()[3]

    short = await create(server, max_tokens=3)
    stopped = await create(server, stop_sequences=["zzz", word])

    assert (short.stop_reason, short.usage.output_tokens) == ("max_tokens", 3)
    assert (stopped.stop_reason, stopped.stop_sequence) == ("stop_sequence", word)
    assert whole.startswith(text_of(stopped))
    assert word not in text_of(stopped)


# Streaming ----------------------------------------------------------------------


@pytest.mark.asyncio
async def test_stream_events_validate_and_reassemble_to_the_message(server: FakeServer) -> None:
    answer = await server.post(PATH, request(stream=True), HEADERS)
    events = sse(answer.body)
    expected = await create(server)

    assert answer.headers["Content-Type"] == "text/event-stream; charset=utf-8"
    names = [name for name, _ in events]
    assert names[:3] == ["message_start", "content_block_start", "ping"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    parsed = [EVENTS.validate_python(json.loads(data)) for name, data in events if name != "ping"]
    assert all(
        event.type == name for event, name in zip(parsed, names[:2] + names[3:], strict=True)
    )
    text = "".join(
        e.delta.text
        for e in parsed
        if e.type == "content_block_delta" and e.delta.type == "text_delta"
    )
    assert text == text_of(expected)
    start, delta = parsed[0], parsed[-2]
    assert start.type == "message_start"
    assert delta.type == "message_delta"
    assert start.message.usage.input_tokens == expected.usage.input_tokens
    assert start.message.usage.output_tokens == 1
    assert delta.delta.stop_reason == "end_turn"
    assert delta.usage.output_tokens == expected.usage.output_tokens


@pytest.mark.asyncio
async def test_sdk_stream_accumulates_to_the_same_message(guarded: FakeServer) -> None:
    messages: list[anthropic.types.MessageParam] = [{"role": "user", "content": "Stream this"}]
    async with client(guarded) as sdk:
        async with sdk.messages.stream(model=MODEL, max_tokens=200, messages=messages) as stream:
            streamed = await stream.get_final_message()
        whole = await sdk.messages.create(model=MODEL, max_tokens=200, messages=messages)

    assert [b.type for b in streamed.content] == [b.type for b in whole.content] == ["text"]
    assert text_of(streamed) == text_of(whole)
    assert streamed.stop_reason == whole.stop_reason
    assert streamed.usage.output_tokens == whole.usage.output_tokens
    assert [e["stream"] for e in await guarded.log()] == [True, False]


# Tools and structured output -----------------------------------------------------


@pytest.mark.asyncio
async def test_forced_tool_is_called_with_input_that_fits_its_schema(server: FakeServer) -> None:
    message = await create(
        server, tools=[WEATHER, CLOCK], tool_choice={"type": "tool", "name": "get_weather"}
    )

    [call] = message.content
    assert call.type == "tool_use"
    assert call.id.startswith("toolu_01")
    assert call.name == "get_weather"
    assert message.stop_reason == "tool_use"
    Weather.model_validate(call.input)


@pytest.mark.asyncio
async def test_auto_tools_are_called_in_parallel_unless_disabled(server: FakeServer) -> None:
    both = await create(server, tools=[WEATHER, CLOCK])
    one = await create(
        server,
        tools=[WEATHER, CLOCK],
        tool_choice={"type": "any", "disable_parallel_tool_use": True},
    )
    none = await create(server, tools=[WEATHER, CLOCK], tool_choice={"type": "none"})

    assert [b.name for b in both.content if b.type == "tool_use"] == ["get_weather", "get_time"]
    assert [b.name for b in one.content if b.type == "tool_use"] == ["get_weather"]
    assert none.stop_reason == "end_turn"


@pytest.mark.asyncio
async def test_streamed_tool_input_arrives_as_json_pieces(server: FakeServer) -> None:
    fields = {"tools": [WEATHER], "tool_choice": {"type": "tool", "name": "get_weather"}}
    answer = await server.post(PATH, request(stream=True, **fields), HEADERS)
    whole = await create(server, **fields)

    parsed = [
        EVENTS.validate_python(json.loads(data))
        for name, data in sse(answer.body)
        if name != "ping"
    ]
    pieces = [
        e.delta.partial_json
        for e in parsed
        if e.type == "content_block_delta" and e.delta.type == "input_json_delta"
    ]
    [call] = whole.content
    assert call.type == "tool_use"
    assert pieces[0] == ""
    assert json.loads("".join(pieces)) == call.input


@pytest.mark.asyncio
async def test_tool_results_get_a_text_answer(server: FakeServer) -> None:
    first = await create(server, tools=[WEATHER])
    [call] = first.content
    assert call.type == "tool_use"
    history = [
        user("Weather in Paris?"),
        {"role": "assistant", "content": [call.model_dump()]},
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "Sunny"}],
        },
    ]

    answer = await create(server, tools=[WEATHER], messages=history)

    assert answer.stop_reason == "end_turn"
    assert text_of(answer)


@pytest.mark.asyncio
async def test_output_config_json_schema_gives_matching_json(server: FakeServer) -> None:
    schema = Weather.model_json_schema()
    message = await create(
        server, output_config={"format": {"type": "json_schema", "schema": schema}}
    )

    Weather.model_validate_json(text_of(message))


# Validation -----------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"max_tokens": None}, "max_tokens: Field required"),
        ({"messages": None}, "messages: Field required"),
        ({"max_tokens": 0}, "max_tokens: Input should be greater than or equal to 1"),
        ({"temperature": 1.5}, "temperature: Input should be less than or equal to 1"),
        ({"max_tokens": "many"}, "max_tokens: Input should be a valid integer"),
        ({"n": 2}, "n: Extra inputs are not permitted"),
        ({"messages": []}, "messages: at least one message is required"),
        (
            {"messages": [{"role": "system", "content": "Be brief."}, user("Hi")]},
            "messages.0.role: Input should be 'user' or 'assistant'",
        ),
        (
            {"messages": [{"role": "assistant", "content": "Hi"}, user("Hi")]},
            'messages: first message must use the "user" role',
        ),
        (
            {
                "messages": [
                    user("Hi"),
                    {"role": "assistant", "content": "Yo"},
                    {"role": "assistant", "content": "Yo"},
                ]
            },
            'messages: roles must alternate between "user" and "assistant", but found multiple'
            ' "assistant" roles in a row',
        ),
        (
            {
                "messages": [
                    user("Hi"),
                    {"role": "assistant", "content": "Yo"},
                    user([{"type": "tool_result", "tool_use_id": "toolu_01x"}]),
                ]
            },
            "messages.2.content.0: unexpected `tool_use_id` found in `tool_result` blocks:"
            " toolu_01x. Each `tool_result` block must have a corresponding `tool_use` block in"
            " the previous message.",
        ),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "tool", "name": "nope"}},
            "Tool 'nope' not found in provided tools",
        ),
        ({"tools": [{"name": "bare"}]}, "tools.0.custom.input_schema: Field required"),
    ],
)
async def test_invalid_requests_get_anthropics_400(
    server: FakeServer, fields: dict[str, Any], message: str
) -> None:
    body = {key: value for key, value in request(**fields).items() if value is not None}

    answer = await server.post(PATH, body, HEADERS)

    assert error_of(answer) == (400, "invalid_request_error", message)


@pytest.mark.asyncio
async def test_unanswered_tool_use_and_too_many_cache_marks_are_refused(server: FakeServer) -> None:
    call = {"type": "tool_use", "id": "toolu_01abc", "name": "get_weather", "input": {}}
    unanswered = request(
        messages=[user("Hi"), {"role": "assistant", "content": [call]}, user("And?")]
    )
    marked = {"type": "text", "text": "x", "cache_control": {"type": "ephemeral"}}
    crowded = request(system=[marked] * 5)

    first = await server.post(PATH, unanswered, HEADERS)
    second = await server.post(PATH, crowded, HEADERS)

    assert error_of(first)[2].startswith(
        "messages.2: `tool_use` ids were found without `tool_result` blocks immediately after:"
        " toolu_01abc."
    )
    assert error_of(second)[2] == (
        "A maximum of 4 blocks with cache_control may be provided. Found 5."
    )


@pytest.mark.asyncio
async def test_anthropic_version_header_is_required(server: FakeServer) -> None:
    answer = await server.post(PATH, request(), {"x-api-key": KEY})

    assert error_of(answer) == (
        400,
        "invalid_request_error",
        "anthropic-version: header is required",
    )


# Auth -----------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_x_api_key_is_checked(guarded: FakeServer) -> None:
    missing = await guarded.post(PATH, request(), {"anthropic-version": "2023-06-01"})
    wrong = await guarded.post(PATH, request(), {**HEADERS, "x-api-key": "sk-ant-wrong"})
    bearer = await guarded.post(
        PATH, request(), {"anthropic-version": "2023-06-01", "Authorization": f"Bearer {KEY}"}
    )

    assert error_of(missing) == (401, "authentication_error", "x-api-key header is required")
    assert error_of(wrong) == (401, "authentication_error", "invalid x-api-key")
    assert bearer.status == 200  # current SDKs send the key as a bearer token
    async with client(guarded, key="sk-ant-wrong") as sdk:
        with pytest.raises(anthropic.AuthenticationError):
            await sdk.messages.create(
                model=MODEL, max_tokens=5, messages=[{"role": "user", "content": "Hi"}]
            )


# Faults ---------------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("setting", "status", "type_"),
    [
        ("rate_429", 429, "rate_limit_error"),
        ("rate_quota", 402, "billing_error"),
        ("rate_500", 500, "api_error"),
        ("rate_503", 529, "overloaded_error"),
    ],
)
async def test_faults_have_anthropics_status_and_error_type(
    server: FakeServer, setting: str, status: int, type_: str
) -> None:
    await server.configure(**{setting: 1.0}, retry_after_s=2.5)

    answer = await server.post(PATH, request(), HEADERS)

    assert error_of(answer)[:2] == (status, type_)
    assert "request-id" in answer.headers
    assert ("retry-after" in answer.headers) == (status == 429)
    if status == 429:
        assert answer.headers["retry-after"] == "3"
        assert answer.headers["anthropic-ratelimit-requests-remaining"] == "0"


@pytest.mark.asyncio
async def test_sdk_raises_its_typed_errors_for_faults(guarded: FakeServer) -> None:
    messages: list[anthropic.types.MessageParam] = [{"role": "user", "content": "Hi"}]
    async with client(guarded) as sdk:
        await guarded.configure(rate_429=1.0)
        with pytest.raises(anthropic.RateLimitError):
            await sdk.messages.create(model=MODEL, max_tokens=5, messages=messages)
        await guarded.configure(rate_429=0.0, rate_503=1.0)
        with pytest.raises(anthropic.APIStatusError) as overloaded:
            await sdk.messages.create(model=MODEL, max_tokens=5, messages=messages)

    assert overloaded.value.status_code == 529


@pytest.mark.asyncio
async def test_malformed_body_is_cut_and_malformed_stream_ends_in_an_error_event(
    server: FakeServer,
) -> None:
    await server.configure(rate_malformed=1.0)

    body = await server.post(PATH, request(), HEADERS)
    stream = await server.post(PATH, request(stream=True), HEADERS)

    assert body.status == 200
    with pytest.raises(json.JSONDecodeError):
        json.loads(body.body)
    events = sse(stream.body)
    assert stream.status == 200
    assert any(name == "content_block_delta" for name, _ in events)
    assert "message_stop" not in [name for name, _ in events]
    assert events[-1][0] == "error"
    assert json.loads(events[-1][1]) == {
        "type": "error",
        "error": {"type": "overloaded_error", "message": "Overloaded"},
    }


# Caching ---------------------------------------------------------------------------


def cached_system() -> list[dict[str, Any]]:
    return [{"type": "text", "text": MANUAL, "cache_control": {"type": "ephemeral"}}]


@pytest.mark.asyncio
async def test_marked_prefix_is_written_then_read_with_disjoint_counters(
    server: FakeServer,
) -> None:
    prefix = 4 + tokens(MANUAL)
    first = await create(server, system=cached_system(), messages=[user("First question?")])
    second = await create(server, system=cached_system(), messages=[user("Another question?")])
    entries = await server.log()

    assert (first.usage.cache_creation_input_tokens, first.usage.cache_read_input_tokens) == (
        prefix,
        0,
    )
    assert (second.usage.cache_creation_input_tokens, second.usage.cache_read_input_tokens) == (
        0,
        prefix,
    )
    assert first.usage.input_tokens == 4 + tokens("First question?") + 3
    assert second.usage.input_tokens == 4 + tokens("Another question?") + 3
    assert first.usage.cache_creation is not None
    assert first.usage.cache_creation.ephemeral_5m_input_tokens == prefix
    normalized = [
        (e["prompt_tokens"], e["cached_tokens"], e["cache_write_tokens"]) for e in entries
    ]
    assert normalized == [
        (prefix + first.usage.input_tokens, 0, prefix),
        (prefix + second.usage.input_tokens, prefix, 0),
    ]


@pytest.mark.asyncio
async def test_a_growing_conversation_reads_its_last_mark_and_writes_the_rest(
    server: FakeServer,
) -> None:
    def marked(text: str) -> dict[str, Any]:
        return user([{"type": "text", "text": text, "cache_control": {"type": "ephemeral"}}])

    opening = [marked("First question?")]
    await create(server, system=cached_system(), messages=opening)
    longer = [*opening, {"role": "assistant", "content": "An answer."}, marked("And then?")]

    second = await create(server, system=cached_system(), messages=longer)

    read = 4 + tokens(MANUAL) + 4 + tokens("First question?")
    written = 4 + tokens("An answer.") + 4 + tokens("And then?")
    assert (second.usage.cache_read_input_tokens, second.usage.cache_creation_input_tokens) == (
        read,
        written,
    )
    assert second.usage.input_tokens == 3


@pytest.mark.asyncio
async def test_unmarked_and_short_prefixes_are_not_cached(server: FakeServer) -> None:
    short = [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}]
    for _ in range(2):
        plain = await create(server, system=MANUAL)
        brief = await create(server, system=short)

    assert (plain.usage.cache_read_input_tokens, plain.usage.cache_creation_input_tokens) == (0, 0)
    assert (brief.usage.cache_read_input_tokens, brief.usage.cache_creation_input_tokens) == (0, 0)


@pytest.mark.asyncio
async def test_top_level_cache_control_marks_the_last_block(server: FakeServer) -> None:
    fields = {"system": MANUAL, "cache_control": {"type": "ephemeral"}}
    first = await create(server, **fields)
    second = await create(server, **fields)

    whole = 4 + tokens(MANUAL) + 4 + tokens("Hello")
    assert first.usage.cache_creation_input_tokens == whole
    assert second.usage.cache_read_input_tokens == whole


# Refusals --------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_content_policy_is_a_refusal_that_bills_the_prompt(server: FakeServer) -> None:
    message = await create(server, messages=[user("Tell me forbidden-content please")])
    [entry] = await server.log()

    assert (message.stop_reason, message.content, message.usage.output_tokens) == ("refusal", [], 0)
    assert message.usage.input_tokens == 4 + tokens("Tell me forbidden-content please") + 3
    assert (entry["status"], entry["prompt_tokens"]) == (200, message.usage.input_tokens)


@pytest.mark.asyncio
async def test_content_policy_refusal_streams_without_blocks(server: FakeServer) -> None:
    answer = await server.post(
        PATH, request(stream=True, messages=[user("forbidden-content")]), HEADERS
    )

    events = sse(answer.body)
    assert [name for name, _ in events] == [
        "message_start",
        "ping",
        "message_delta",
        "message_stop",
    ]
    assert json.loads(events[2][1])["delta"]["stop_reason"] == "refusal"


@pytest.mark.asyncio
async def test_prompt_over_the_context_window_is_too_long(server: FakeServer) -> None:
    await server.configure(context_window=1000)

    answer = await server.post(PATH, request(system=MANUAL), HEADERS)

    prompt = 4 + tokens(MANUAL) + 4 + tokens("Hello") + 3
    assert error_of(answer) == (
        400,
        "invalid_request_error",
        f"prompt is too long: {prompt} tokens > 1000 maximum",
    )
