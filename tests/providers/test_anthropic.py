"""The Anthropic adapter as pure functions: requests out, replies and errors in."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest

from modelyard.config import Deployment
from schemas.chat import ChatRequest, FunctionCall, ToolCall
from schemas.errors import ErrorKind, JobError
from schemas.results import Completion, ToolCallDelta, Usage
from workers.providers.anthropic import AnthropicAdapter
from workers.providers.base import (
    Adapter,
    AdapterError,
    HttpResponse,
    ProviderReply,
    StreamDelta,
)

ADAPTER: Adapter = AnthropicAdapter()
DEPLOYMENT = Deployment(provider="anthropic", model="claude-sonnet-4-5", pool="anthropic")
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
TIME_TOOL = {"type": "function", "function": {"name": "get_time"}}


def chat(messages: list[dict[str, Any]] | None = None, **fields: Any) -> ChatRequest:
    messages = messages or [{"role": "user", "content": "Hi"}]
    return msgspec.convert({"model": "claude", "messages": messages, **fields}, ChatRequest)


def body(request: ChatRequest, deployment: Deployment = DEPLOYMENT) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(ADAPTER.build_request(request, deployment, "sk").body)
    return result


def refusal(request: ChatRequest) -> JobError:
    with pytest.raises(AdapterError) as caught:
        ADAPTER.build_request(request, DEPLOYMENT, "sk")
    return caught.value.error


def response(
    payload: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None
) -> HttpResponse:
    return HttpResponse(status=status, headers=headers or {}, body=json.dumps(payload).encode())


def message(
    content: list[dict[str, Any]], stop_reason: str = "end_turn", **usage: int
) -> dict[str, Any]:
    return {
        "id": "msg_01",
        "type": "message",
        "role": "assistant",
        "model": "claude-sonnet-4-5-20250929",
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": {"input_tokens": 10, "output_tokens": 5, **usage},
    }


# --- requests ----------------------------------------------------------------


def test_request_url_headers_and_defaults() -> None:
    request = ADAPTER.build_request(chat(), DEPLOYMENT, "sk-ant")

    expected = (
        "POST",
        "https://api.anthropic.com/v1/messages",
        {
            "content-type": "application/json",
            "anthropic-version": "2023-06-01",
            "x-api-key": "sk-ant",
        },
        {
            "model": "claude-sonnet-4-5",
            "max_tokens": 4096,
            "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
        },
    )
    assert expected == (request.method, request.url, request.headers, json.loads(request.body))


def test_api_base_and_default_max_tokens_come_from_the_deployment() -> None:
    deployment = msgspec.structs.replace(
        DEPLOYMENT, api_base="http://proxy.local/", options={"default_max_tokens": 1024}
    )

    request = ADAPTER.build_request(chat(), deployment, None)

    expected = ("http://proxy.local/v1/messages", 1024)
    assert expected == (request.url, json.loads(request.body)["max_tokens"])
    assert "x-api-key" not in request.headers


@pytest.mark.parametrize(
    ("fields", "expected"),
    [({"max_tokens": 50}, 50), ({"max_completion_tokens": 70, "max_tokens": 50}, 70)],
)
def test_the_requested_output_limit_wins(fields: dict[str, Any], expected: int) -> None:
    assert expected == body(chat(**fields))["max_tokens"]


def test_system_and_developer_messages_are_hoisted() -> None:
    request = chat(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "developer", "content": [{"type": "text", "text": "Answer in French."}]},
            {"role": "assistant", "content": "Bonjour"},
        ]
    )

    sent = body(request)

    expected = (
        [{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Answer in French."}],
        ["user", "assistant"],
    )
    assert expected == (sent["system"], [turn["role"] for turn in sent["messages"]])


def test_consecutive_same_role_messages_are_merged() -> None:
    request = chat(
        [
            {"role": "user", "content": "One"},
            {"role": "user", "content": [{"type": "text", "text": "Two"}]},
            {"role": "assistant", "content": ""},  # empty: dropped, not a turn
            {"role": "user", "content": "Three"},
            {"role": "assistant", "content": "Four"},
        ]
    )

    expected = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "One"},
                {"type": "text", "text": "Two"},
                {"type": "text", "text": "Three"},
            ],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "Four"}]},
    ]
    assert expected == body(request)["messages"]


def test_images_by_url_and_by_data_uri() -> None:
    content = [
        {"type": "text", "text": "Compare"},
        {"type": "image_url", "image_url": {"url": "https://x.test/a.png", "detail": "high"}},
        {"type": "image_url", "image_url": {"url": "data:image/webp;base64,UklGRg=="}},
    ]

    sent = body(chat([{"role": "user", "content": content}]))

    expected = [
        {"type": "text", "text": "Compare"},
        {"type": "image", "source": {"type": "url", "url": "https://x.test/a.png"}},
        {
            "type": "image",
            "source": {"type": "base64", "media_type": "image/webp", "data": "UklGRg=="},
        },
    ]
    assert expected == sent["messages"][0]["content"]


@pytest.mark.parametrize(
    ("url", "wording"),
    [
        ("data:image/png,%89PNG", "base64"),
        ("data:image/bmp;base64,Qk0=", "image/bmp"),
    ],
)
def test_unusable_data_uris_are_refused(url: str, wording: str) -> None:
    content = [{"type": "image_url", "image_url": {"url": url}}]

    error = refusal(chat([{"role": "user", "content": content}]))

    expected = (ErrorKind.BAD_REQUEST, False, "$.request.messages[0].content[0]")
    assert expected == (error.kind, error.retryable, error.field)
    assert wording in error.message


def test_images_in_system_messages_are_refused() -> None:
    image = {"type": "image_url", "image_url": {"url": "https://x.test/a.png"}}

    error = refusal(
        chat([{"role": "system", "content": [image]}, {"role": "user", "content": "Hi"}])
    )

    assert "images" in error.message
    expected = "$.request.messages[0].content[0]"
    assert expected == error.field


def test_tools_are_sent_with_their_input_schema() -> None:
    sent = body(chat(tools=[WEATHER_TOOL, TIME_TOOL]))

    expected = [
        {
            "name": "get_weather",
            "description": "Weather for a city",
            "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
        {"name": "get_time", "input_schema": {"type": "object", "properties": {}}},
    ]
    assert expected == sent["tools"]
    assert sent["tool_choice"] == {"type": "auto"}


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"tool_choice": "auto"}, {"type": "auto"}),
        ({"tool_choice": "required"}, {"type": "any"}),
        ({"tool_choice": "none"}, {"type": "none"}),
        (
            {"tool_choice": {"type": "function", "function": {"name": "get_time"}}},
            {"type": "tool", "name": "get_time"},
        ),
        ({"parallel_tool_calls": False}, {"type": "auto", "disable_parallel_tool_use": True}),
        (
            {"tool_choice": "required", "parallel_tool_calls": False},
            {"type": "any", "disable_parallel_tool_use": True},
        ),
        ({"parallel_tool_calls": True}, {"type": "auto"}),
    ],
)
def test_tool_choice(fields: dict[str, Any], expected: dict[str, Any]) -> None:
    assert expected == body(chat(tools=[WEATHER_TOOL, TIME_TOOL], **fields))["tool_choice"]


def test_tool_choice_without_tools() -> None:
    assert "tool_choice" not in body(chat(tool_choice="none"))
    expected = "$.request.tool_choice"
    assert expected == refusal(chat(tool_choice="required")).field


def test_parallel_tool_calls_and_their_results() -> None:
    request = chat(
        [
            {"role": "user", "content": "Weather in Paris and the time?"},
            {
                "role": "assistant",
                "content": "Checking.",
                "tool_calls": [
                    {
                        "id": "toolu_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    },
                    {
                        "id": "toolu_2",
                        "type": "function",
                        "function": {"name": "get_time", "arguments": ""},
                    },
                ],
            },
            {"role": "tool", "tool_call_id": "toolu_1", "content": "18C"},
            {
                "role": "tool",
                "tool_call_id": "toolu_2",
                "content": [{"type": "text", "text": "09:00"}],
            },
            {"role": "user", "content": "Thanks"},
        ],
        tools=[WEATHER_TOOL, TIME_TOOL],
    )

    expected = [
        {"role": "user", "content": [{"type": "text", "text": "Weather in Paris and the time?"}]},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Checking."},
                {
                    "type": "tool_use",
                    "id": "toolu_1",
                    "name": "get_weather",
                    "input": {"city": "Paris"},
                },
                {"type": "tool_use", "id": "toolu_2", "name": "get_time", "input": {}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "18C"},
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_2",
                    "content": [{"type": "text", "text": "09:00"}],
                },
                {"type": "text", "text": "Thanks"},
            ],
        },
    ]
    assert expected == body(request)["messages"]


@pytest.mark.parametrize(
    ("arguments", "wording"), [("{oops", "valid JSON"), ("[1]", "JSON object")]
)
def test_unparseable_tool_call_arguments_are_refused(arguments: str, wording: str) -> None:
    call = {"id": "t", "type": "function", "function": {"name": "f", "arguments": arguments}}
    request = chat([{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [call]}])

    error = refusal(request)

    assert wording in error.message
    expected = "$.request.messages[1].tool_calls[0].function.arguments"
    assert expected == error.field


def test_json_schema_becomes_a_forced_tool() -> None:
    schema = {
        "type": "object",
        "properties": {"answer": {"type": "string"}},
        "required": ["answer"],
    }
    request = chat(
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "verdict", "schema": schema},
        }
    )

    sent = body(request)

    expected_tool = {
        "name": "json_response__verdict",
        "description": "Respond with JSON matching the verdict schema.",
        "input_schema": schema,
    }
    assert [expected_tool] == sent["tools"]
    expected = {"type": "tool", "name": "json_response__verdict"}
    assert expected == sent["tool_choice"]


def test_json_object_becomes_a_forced_permissive_tool() -> None:
    sent = body(chat(response_format={"type": "json_object"}))

    expected = [
        {
            "name": "json_response__object",
            "description": "Respond with a JSON object.",
            "input_schema": {"type": "object"},
        }
    ]
    assert expected == sent["tools"]
    assert sent["tool_choice"] == {"type": "tool", "name": "json_response__object"}


def test_text_response_format_changes_nothing() -> None:
    assert body(chat()) == body(chat(response_format={"type": "text"}))


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        (
            {"response_format": {"type": "json_object"}, "tools": [WEATHER_TOOL]},
            "$.request.response_format",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "list", "schema": {"type": "array"}},
                }
            },
            "$.request.response_format.json_schema.schema",
        ),
        (
            {"tools": [{"type": "function", "function": {"name": "json_response__x"}}]},
            "$.request.tools[0].function.name",
        ),
        ({"temperature": 1.5}, "$.request.temperature"),
    ],
)
def test_unmappable_requests_are_refused_naming_the_field(
    fields: dict[str, Any], field: str
) -> None:
    error = refusal(chat(**fields))

    assert (ErrorKind.BAD_REQUEST, field) == (error.kind, error.field)


def test_sampling_stop_user_and_stream() -> None:
    request = chat(temperature=0.2, top_p=0.9, stop="END", seed=7, user="u-42", stream=True)

    sent = body(request)

    expected = {
        "temperature": 0.2,
        "top_p": 0.9,
        "stop_sequences": ["END"],
        "metadata": {"user_id": "u-42"},
        "stream": True,
    }
    assert expected == {
        key: sent[key] for key in ("temperature", "top_p", "stop_sequences", "metadata", "stream")
    }
    assert "seed" not in sent  # best-effort in OpenAI, no Anthropic equivalent
    assert body(chat(stop=["a", "b"]))["stop_sequences"] == ["a", "b"]


# --- replies -----------------------------------------------------------------

TEXT_REPLY = message([{"type": "text", "text": "Hello!"}])
TOOL_REPLY = message(
    [
        {"type": "text", "text": "Let me check."},
        {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
        {"type": "tool_use", "id": "toolu_2", "name": "get_time", "input": {}},
    ],
    stop_reason="tool_use",
)
CACHED_REPLY = message(
    [{"type": "text", "text": "Cached."}],
    input_tokens=100,
    cache_read_input_tokens=1000,
    cache_creation_input_tokens=200,
    output_tokens=50,
)
JSON_REPLY = message(
    [
        {
            "type": "tool_use",
            "id": "toolu_9",
            "name": "json_response__verdict",
            "input": {"answer": "yes"},
        }
    ],
    stop_reason="tool_use",
)
THINKING_REPLY = message(
    [
        {"type": "thinking", "thinking": "Hmm.", "signature": "sig"},
        {"type": "text", "text": "42"},
    ],
)
REPLIES = [TEXT_REPLY, TOOL_REPLY, CACHED_REPLY, JSON_REPLY, THINKING_REPLY]


def parse(payload: dict[str, Any], request_id: str | None = None) -> ProviderReply:
    headers = {"request-id": request_id} if request_id else {}
    reply = ADAPTER.parse_response(response(payload, headers=headers))
    assert isinstance(reply, ProviderReply)
    return reply


def test_reply_fixtures_are_valid_sdk_messages() -> None:
    types = pytest.importorskip("anthropic.types")

    for payload in REPLIES:
        assert payload["id"] == types.Message.model_validate(payload).id


def test_text_reply() -> None:
    reply = parse(TEXT_REPLY, "req_1")

    expected = Completion(
        id="msg_01",
        model="claude-sonnet-4-5-20250929",
        content="Hello!",
        finish_reason="stop",
        provider_finish_reason="end_turn",
    )
    assert (expected, "req_1") == (reply.completion, reply.request_id)


def test_tool_use_reply() -> None:
    completion = parse(TOOL_REPLY).completion

    expected = (
        "Let me check.",
        [
            ToolCall(id="toolu_1", function=FunctionCall("get_weather", '{"city":"Paris"}')),
            ToolCall(id="toolu_2", function=FunctionCall("get_time", "{}")),
        ],
        "tool_calls",
        "tool_use",
    )
    actual = (
        completion.content,
        completion.tool_calls,
        completion.finish_reason,
        completion.provider_finish_reason,
    )
    assert expected == actual


def test_forced_response_tool_comes_back_as_content() -> None:
    completion = parse(JSON_REPLY).completion

    expected = ('{"answer":"yes"}', None, "stop", "tool_use")
    actual = (
        completion.content,
        completion.tool_calls,
        completion.finish_reason,
        completion.provider_finish_reason,
    )
    assert expected == actual


def test_thinking_blocks_are_not_content() -> None:
    expected = "42"
    assert expected == parse(THINKING_REPLY).completion.content


@pytest.mark.parametrize(
    ("stop_reason", "expected"),
    [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("max_tokens", "length"),
        ("refusal", "content_filter"),
        ("pause_turn", "stop"),
        ("model_context_window_exceeded", "length"),
    ],
)
def test_finish_reasons(stop_reason: str, expected: str) -> None:
    completion = parse(message([{"type": "text", "text": "x"}], stop_reason=stop_reason)).completion

    assert (expected, stop_reason) == (completion.finish_reason, completion.provider_finish_reason)


def test_usage_sums_the_disjoint_input_counters() -> None:
    reply = parse(CACHED_REPLY)

    expected = Usage(
        input_tokens=1300, output_tokens=50, cache_read_tokens=1000, cache_write_tokens=200
    )
    assert expected == reply.usage
    assert CACHED_REPLY["usage"] == reply.raw_usage


def test_thinking_tokens_are_reasoning_tokens() -> None:
    payload = message([{"type": "text", "text": "x"}], output_tokens=90)
    payload["usage"]["output_tokens_details"] = {"thinking_tokens": 60}

    assert Usage(input_tokens=10, output_tokens=90, reasoning_tokens=60) == parse(payload).usage


def test_unreadable_reply_is_a_retryable_server_error() -> None:
    error = ADAPTER.parse_response(HttpResponse(status=200, headers={}, body=b"{not json"))

    assert isinstance(error, JobError)
    expected = (ErrorKind.SERVER_ERROR, True)
    assert expected == (error.kind, error.retryable)


# --- errors ------------------------------------------------------------------


def error_body(kind: str, text: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": kind, "message": text}, "request_id": "req_x"}


@pytest.mark.parametrize(
    ("status", "kind", "text", "expected", "retryable"),
    [
        (529, "overloaded_error", "Overloaded", ErrorKind.OVERLOADED, True),
        (429, "rate_limit_error", "Slow down", ErrorKind.RATE_LIMITED, True),
        (
            400,
            "invalid_request_error",
            "prompt is too long: 210000 tokens > 200000 maximum",
            ErrorKind.CONTEXT_WINDOW_EXCEEDED,
            False,
        ),
        (400, "invalid_request_error", "messages: field required", ErrorKind.BAD_REQUEST, False),
        (401, "authentication_error", "invalid x-api-key", ErrorKind.AUTH, False),
        (403, "permission_error", "no access", ErrorKind.AUTH, False),
        (404, "not_found_error", "model: claude-9", ErrorKind.NOT_FOUND, False),
        (
            413,
            "request_too_large",
            "Request exceeds the maximum size",
            ErrorKind.CONTEXT_WINDOW_EXCEEDED,
            False,
        ),
        (500, "api_error", "Internal server error", ErrorKind.SERVER_ERROR, True),
        (504, "timeout_error", "Request timed out", ErrorKind.TIMEOUT, True),
        (402, "billing_error", "Credit balance is too low", ErrorKind.RATE_LIMITED, False),
    ],
)
def test_errors_by_status_and_type(
    status: int, kind: str, text: str, expected: ErrorKind, retryable: bool
) -> None:
    error = ADAPTER.parse_response(response(error_body(kind, text), status=status))

    assert (
        JobError(
            kind=expected,
            message=text,
            retryable=retryable,
            provider_status=status,
            provider_code=kind,
        )
        == error
    )


def test_rate_limit_carries_retry_after() -> None:
    error = ADAPTER.parse_response(
        response(
            error_body("rate_limit_error", "Slow down"), status=429, headers={"retry-after": "17"}
        )
    )

    assert isinstance(error, JobError)
    expected = 17.0
    assert expected == error.retry_after_s


def test_error_without_an_anthropic_body_falls_back_to_the_status() -> None:
    error = ADAPTER.parse_response(
        HttpResponse(status=502, headers={}, body=b"<html>Bad gateway</html>")
    )

    assert isinstance(error, JobError)
    expected = (ErrorKind.SERVER_ERROR, 502, "<html>Bad gateway</html>")
    assert expected == (
        error.kind,
        error.provider_status,
        error.message,
    )


def test_error_fixtures_are_valid_sdk_errors() -> None:
    shared = pytest.importorskip("anthropic.types.shared")

    payload = error_body("overloaded_error", "Overloaded")
    expected = "overloaded_error"
    assert expected == shared.ErrorResponse.model_validate(payload).error.type


# --- streaming ---------------------------------------------------------------


def sse(*events: dict[str, Any]) -> list[tuple[str, str]]:
    return [(event["type"], json.dumps(event)) for event in events]


def start(**usage: int) -> dict[str, Any]:
    start_message = message([])
    start_message["stop_reason"] = None
    start_message["usage"].update(usage, output_tokens=1)
    return {"type": "message_start", "message": start_message}


def block_start(index: int, block: dict[str, Any]) -> dict[str, Any]:
    return {"type": "content_block_start", "index": index, "content_block": block}


def text_delta(index: int, text: str) -> dict[str, Any]:
    return {
        "type": "content_block_delta",
        "index": index,
        "delta": {"type": "text_delta", "text": text},
    }


def json_delta(index: int, partial: str) -> dict[str, Any]:
    delta = {"type": "input_json_delta", "partial_json": partial}
    return {"type": "content_block_delta", "index": index, "delta": delta}


def block_stop(index: int) -> dict[str, Any]:
    return {"type": "content_block_stop", "index": index}


def end(stop_reason: str, output_tokens: int) -> list[dict[str, Any]]:
    delta = {
        "type": "message_delta",
        "delta": {"stop_reason": stop_reason, "stop_sequence": None},
        "usage": {"output_tokens": output_tokens},
    }
    return [delta, {"type": "message_stop"}]


def tool_block(tool_id: str, name: str) -> dict[str, Any]:
    return {"type": "tool_use", "id": tool_id, "name": name, "input": {}}


TOOL_STREAM = sse(
    start(),
    block_start(0, {"type": "text", "text": ""}),
    {"type": "ping"},
    text_delta(0, "Let me "),
    text_delta(0, "check."),
    block_stop(0),
    block_start(1, tool_block("toolu_1", "get_weather")),
    json_delta(1, ""),
    json_delta(1, '{"city": '),
    json_delta(1, '"Paris"}'),
    block_stop(1),
    block_start(2, tool_block("toolu_2", "get_time")),
    block_stop(2),
    *end("tool_use", 5),
)


def run(events: list[tuple[str, str]]) -> tuple[list[StreamDelta], ProviderReply | JobError]:
    decoder = ADAPTER.stream_decoder("req_1")
    deltas = [delta for event, data in events for delta in decoder.feed(event, data)]
    return deltas, decoder.finish()


def test_stream_events_are_valid_sdk_events() -> None:
    types = pytest.importorskip("anthropic.types")
    pydantic = pytest.importorskip("pydantic")
    adapter = pydantic.TypeAdapter(types.RawMessageStreamEvent)

    for event, data in TOOL_STREAM:
        if event != "ping":
            assert event == adapter.validate_json(data).type


def test_stream_deltas_use_openai_tool_call_indexes() -> None:
    deltas, _ = run(TOOL_STREAM)

    assert [
        StreamDelta(content="Let me "),
        StreamDelta(content="check."),
        StreamDelta(
            tool_calls=[ToolCallDelta(index=0, id="toolu_1", name="get_weather", arguments="")]
        ),
        StreamDelta(tool_calls=[ToolCallDelta(index=0, arguments='{"city": ')]),
        StreamDelta(tool_calls=[ToolCallDelta(index=0, arguments='"Paris"}')]),
        StreamDelta(
            tool_calls=[ToolCallDelta(index=1, id="toolu_2", name="get_time", arguments="")]
        ),
        StreamDelta(finish_reason="tool_calls"),
    ] == deltas


def test_stream_reassembles_the_same_reply_as_the_plain_call() -> None:
    _, streamed = run(TOOL_STREAM)

    assert parse(TOOL_REPLY, "req_1") == streamed


def test_stream_usage_combines_start_and_final_counters() -> None:
    events = sse(
        start(input_tokens=100, cache_read_input_tokens=1000, cache_creation_input_tokens=200),
        block_start(0, {"type": "text", "text": ""}),
        text_delta(0, "Cached."),
        block_stop(0),
        *end("end_turn", 50),
    )

    _, streamed = run(events)

    assert parse(CACHED_REPLY, "req_1") == streamed


def test_stream_of_the_forced_response_tool_is_content() -> None:
    events = sse(
        start(),
        block_start(0, tool_block("toolu_9", "json_response__verdict")),
        json_delta(0, '{"answer"'),
        json_delta(0, ': "yes"}'),
        block_stop(0),
        *end("tool_use", 5),
    )

    deltas, streamed = run(events)

    assert [
        StreamDelta(content='{"answer"'),
        StreamDelta(content=': "yes"}'),
        StreamDelta(finish_reason="stop"),
    ] == deltas
    assert parse(JSON_REPLY, "req_1") == streamed


def test_error_event_mid_stream_is_the_result() -> None:
    events = sse(
        start(),
        block_start(0, {"type": "text", "text": ""}),
        text_delta(0, "Hel"),
        {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
    )

    deltas, result = run(events)

    assert [StreamDelta(content="Hel")] == deltas
    assert (
        JobError(
            kind=ErrorKind.OVERLOADED,
            message="Overloaded",
            retryable=True,
            provider_code="overloaded_error",
        )
        == result
    )


def test_stream_cut_short_is_a_retryable_server_error() -> None:
    _, result = run(
        sse(start(), block_start(0, {"type": "text", "text": ""}), text_delta(0, "Hel"))
    )

    assert isinstance(result, JobError)
    expected = (ErrorKind.SERVER_ERROR, True)
    assert expected == (result.kind, result.retryable)
