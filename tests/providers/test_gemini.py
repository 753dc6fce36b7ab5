"""The Gemini adapter as pure functions: requests out, replies and errors in."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest

from modelyard.config import Deployment
from schemas.chat import ChatRequest, FunctionCall, ToolCall
from schemas.errors import ErrorKind, JobError
from schemas.results import Completion, ToolCallDelta, Usage
from workers.providers.base import (
    Adapter,
    AdapterError,
    HttpResponse,
    ProviderReply,
    StreamDelta,
)
from workers.providers.gemini import GeminiAdapter, gemini_schema

ADAPTER: Adapter = GeminiAdapter()
DEPLOYMENT = Deployment(provider="gemini", model="gemini-2.5-flash", pool="gemini")
BASE = "https://generativelanguage.googleapis.com/v1beta/models"
PLACEHOLDER = "skip_thought_signature_validator"
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
TIME_TOOL = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
}


def chat(messages: list[dict[str, Any]] | None = None, **fields: Any) -> ChatRequest:
    messages = messages or [{"role": "user", "content": "Hi"}]
    return msgspec.convert({"model": "gemini", "messages": messages, **fields}, ChatRequest)


def body(request: ChatRequest, deployment: Deployment = DEPLOYMENT) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(ADAPTER.build_request(request, deployment, "key").body)
    return result


def refusal(request: ChatRequest) -> JobError:
    with pytest.raises(AdapterError) as caught:
        ADAPTER.build_request(request, DEPLOYMENT, "key")
    return caught.value.error


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "parts": [{"text": text}]}


def call(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


# --- requests ----------------------------------------------------------------


def test_request_url_headers_and_body() -> None:
    request = ADAPTER.build_request(chat(), DEPLOYMENT, "goog-key")

    assert ("POST", f"{BASE}/gemini-2.5-flash:generateContent") == (request.method, request.url)
    expected = {"content-type": "application/json", "x-goog-api-key": "goog-key"}
    assert expected == request.headers
    assert {"contents": [user("Hi")]} == json.loads(request.body)


def test_streaming_url_and_api_base() -> None:
    deployment = msgspec.structs.replace(
        DEPLOYMENT, model="models/gemini-2.5-pro", api_base="http://proxy.local/"
    )

    request = ADAPTER.build_request(chat(stream=True), deployment, None)

    expected = "http://proxy.local/v1beta/models/gemini-2.5-pro:streamGenerateContent?alt=sse"
    assert expected == request.url
    assert "x-goog-api-key" not in request.headers


def test_system_hoisting_roles_and_merging() -> None:
    request = chat(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "One"},
            {"role": "user", "content": [{"type": "text", "text": "Two"}]},
            {"role": "developer", "content": "Answer in French."},
            {"role": "assistant", "content": "Un"},
            {"role": "assistant", "content": "Deux"},
        ]
    )

    sent = body(request)

    expected = (
        {"parts": [{"text": "Be brief."}, {"text": "Answer in French."}]},
        [
            {"role": "user", "parts": [{"text": "One"}, {"text": "Two"}]},
            {"role": "model", "parts": [{"text": "Un"}, {"text": "Deux"}]},
        ],
    )
    assert expected == (sent["systemInstruction"], sent["contents"])


def test_images_inline_and_by_uri() -> None:
    content = [
        {"type": "text", "text": "Compare"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
        {"type": "image_url", "image_url": {"url": "https://x.test/b.webp?size=large"}},
        {"type": "image_url", "image_url": {"url": "https://x.test/photo"}},
    ]

    sent = body(chat([{"role": "user", "content": content}]))

    expected = [
        {"text": "Compare"},
        {"inlineData": {"mimeType": "image/png", "data": "iVBORw0KGgo="}},
        {"fileData": {"mimeType": "image/webp", "fileUri": "https://x.test/b.webp?size=large"}},
        {"fileData": {"mimeType": "image/jpeg", "fileUri": "https://x.test/photo"}},
    ]
    assert expected == sent["contents"][0]["parts"]


def test_non_base64_data_uri_is_refused() -> None:
    content = [{"type": "image_url", "image_url": {"url": "data:image/png,%89PNG"}}]

    error = refusal(chat([{"role": "user", "content": content}]))

    expected = (ErrorKind.BAD_REQUEST, "$.request.messages[0].content[0]")
    assert expected == (error.kind, error.field)


def test_tools_become_function_declarations() -> None:
    sent = body(chat(tools=[WEATHER_TOOL, TIME_TOOL]))

    expected = [
        {
            "functionDeclarations": [
                {
                    "name": "get_weather",
                    "description": "Weather for a city",
                    "parameters": {
                        "type": "object",
                        "properties": {"city": {"type": "string"}},
                        "required": ["city"],
                    },
                },
                {"name": "get_time"},  # Gemini rejects an object without properties
            ]
        }
    ]
    assert expected == sent["tools"]
    assert "toolConfig" not in sent


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ("auto", {"mode": "AUTO"}),
        ("required", {"mode": "ANY"}),
        ("none", {"mode": "NONE"}),
        (
            {"type": "function", "function": {"name": "get_time"}},
            {"mode": "ANY", "allowedFunctionNames": ["get_time"]},
        ),
    ],
)
def test_tool_choice(choice: Any, expected: dict[str, Any]) -> None:
    sent = body(chat(tools=[WEATHER_TOOL, TIME_TOOL], tool_choice=choice))

    assert {"functionCallingConfig": expected} == sent["toolConfig"]


def test_tool_choice_without_tools() -> None:
    assert "toolConfig" not in body(chat(tool_choice="none"))
    expected = "$.request.tool_choice"
    assert expected == refusal(chat(tool_choice="required")).field


TOOL_CONVERSATION: list[dict[str, Any]] = [
    {"role": "user", "content": "Weather in Paris and the time?"},
    {
        "role": "assistant",
        "content": "Checking.",
        "tool_calls": [
            call("call_0_get_weather", "get_weather", '{"city": "Paris"}'),
            call("call_1_get_time", "get_time", ""),
        ],
    },
    {"role": "tool", "tool_call_id": "call_0_get_weather", "content": '{"temp_c": 18}'},
    {"role": "tool", "tool_call_id": "call_1_get_time", "content": '"09:00"'},
    {"role": "user", "content": "Thanks"},
]


def test_tool_calls_and_results() -> None:
    sent = body(chat(TOOL_CONVERSATION, tools=[WEATHER_TOOL, TIME_TOOL]))

    assert [
        user("Weather in Paris and the time?"),
        {
            "role": "model",
            "parts": [
                {"text": "Checking."},
                {
                    "functionCall": {"name": "get_weather", "args": {"city": "Paris"}},
                    "thoughtSignature": PLACEHOLDER,
                },
                {"functionCall": {"name": "get_time", "args": {}}},
            ],
        },
        {
            "role": "user",
            "parts": [
                {"functionResponse": {"name": "get_weather", "response": {"temp_c": 18}}},
                {"functionResponse": {"name": "get_time", "response": {"result": "09:00"}}},
                {"text": "Thanks"},
            ],
        },
    ] == sent["contents"]


def test_thought_signature_placeholder_can_be_turned_off() -> None:
    deployment = msgspec.structs.replace(
        DEPLOYMENT, options={"thought_signature_placeholder": None}
    )

    parts = body(chat(TOOL_CONVERSATION), deployment)["contents"][1]["parts"]

    expected = [None, None, None]
    assert expected == [part.get("thoughtSignature") for part in parts]


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ('{"ok": true}', {"ok": True}),
        ("[1, 2]", {"result": [1, 2]}),
        ("sunny", {"result": "sunny"}),
        ([{"type": "text", "text": "sun"}, {"type": "text", "text": "ny"}], {"result": "sunny"}),
    ],
)
def test_tool_results_are_objects(content: Any, expected: dict[str, Any]) -> None:
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": "x"},
        {"role": "assistant", "tool_calls": [call("c1", "f", "{}")]},
        {"role": "tool", "tool_call_id": "c1", "content": content},
    ]

    parts = body(chat(messages))["contents"][2]["parts"]

    assert [{"functionResponse": {"name": "f", "response": expected}}] == parts


def test_tool_result_for_an_unknown_call_is_refused() -> None:
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": "x"},
        {"role": "tool", "tool_call_id": "nope", "content": "1"},
    ]

    expected = "$.request.messages[1].tool_call_id"
    assert expected == refusal(chat(messages)).field


def test_unparseable_tool_call_arguments_are_refused() -> None:
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": "x"},
        {"role": "assistant", "tool_calls": [call("c", "f", "{")]},
    ]

    expected = "$.request.messages[1].tool_calls[0].function.arguments"
    assert expected == refusal(chat(messages)).field


def test_generation_config() -> None:
    request = chat(
        temperature=1.4, top_p=0.9, max_completion_tokens=300, stop=["END"], seed=7, user="u-1"
    )

    expected = {
        "temperature": 1.4,
        "topP": 0.9,
        "maxOutputTokens": 300,
        "stopSequences": ["END"],
        "seed": 7,
    }
    assert expected == body(request)["generationConfig"]


def test_no_generation_config_when_nothing_is_set() -> None:
    assert "generationConfig" not in body(chat(response_format={"type": "text"}))


def test_json_object_sets_the_mime_type() -> None:
    sent = body(chat(response_format={"type": "json_object"}, stop="END"))

    expected = {"stopSequences": ["END"], "responseMimeType": "application/json"}
    assert expected == sent["generationConfig"]


def test_json_schema_is_reduced_to_gemini_dialect() -> None:
    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
        "properties": {
            "verdict": {"type": "string", "enum": ["yes", "no"]},
            "reason": {"type": ["string", "null"], "description": "Why"},
            "kind": {"const": "final"},
            "items": {"type": "array", "items": {"$ref": "#/$defs/Item"}, "minItems": 1},
            "either": {"oneOf": [{"type": "integer"}, {"type": "string"}]},
        },
        "required": ["verdict"],
        "additionalProperties": False,
        "$defs": {
            "Item": {
                "type": "object",
                "properties": {"n": {"type": "integer", "exclusiveMinimum": 0}},
            }
        },
    }
    request = chat(
        response_format={"type": "json_schema", "json_schema": {"name": "v", "schema": schema}}
    )

    config = body(request)["generationConfig"]

    expected = {
        "responseMimeType": "application/json",
        "responseSchema": {
            "type": "object",
            "properties": {
                "verdict": {"type": "string", "enum": ["yes", "no"]},
                "reason": {"type": "string", "nullable": True, "description": "Why"},
                "kind": {"enum": ["final"]},
                "items": {
                    "type": "array",
                    "minItems": 1,
                    "items": {"type": "object", "properties": {"n": {"type": "integer"}}},
                },
                "either": {"anyOf": [{"type": "integer"}, {"type": "string"}]},
            },
            "required": ["verdict"],
        },
    }
    assert expected == config


def test_unresolvable_and_recursive_schemas_are_refused() -> None:
    with pytest.raises(AdapterError) as unresolved:
        gemini_schema({"$ref": "https://x.test/schema.json"}, "$.s")
    recursive = {"$ref": "#/$defs/Node", "$defs": {"Node": {"$ref": "#/$defs/Node"}}}
    with pytest.raises(AdapterError) as looped:
        gemini_schema(recursive, "$.s")

    expected = ("$.s", "$.s")
    assert expected == (unresolved.value.error.field, looped.value.error.field)


def test_request_parts_match_sdk_types() -> None:
    types = pytest.importorskip("google.genai.types")
    schema = {"type": "object", "properties": {"r": {"type": ["string", "null"]}}}
    request = chat(
        [{"role": "system", "content": "Be brief."}, *TOOL_CONVERSATION],
        tools=[WEATHER_TOOL, TIME_TOOL],
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        response_format={"type": "json_schema", "json_schema": {"name": "v", "schema": schema}},
        temperature=0.5,
        stop="END",
    )

    sent = body(request)

    for content in sent["contents"]:
        types.Content.model_validate(content)
    types.Content.model_validate(sent["systemInstruction"])
    types.Tool.model_validate(sent["tools"][0])
    types.ToolConfig.model_validate(sent["toolConfig"])
    types.GenerationConfig.model_validate(sent["generationConfig"])


# --- replies -----------------------------------------------------------------


def reply_payload(
    parts: list[dict[str, Any]], finish: str | None = "STOP", **usage: int
) -> dict[str, Any]:
    candidate: dict[str, Any] = {"content": {"role": "model", "parts": parts}, "index": 0}
    if finish is not None:
        candidate["finishReason"] = finish
    return {
        "candidates": [candidate],
        "usageMetadata": {"promptTokenCount": 10, "candidatesTokenCount": 5, **usage},
        "modelVersion": "gemini-2.5-flash",
        "responseId": "resp_1",
    }


TEXT_REPLY = reply_payload([{"text": "Hello "}, {"text": "there!"}])
TOOL_REPLY = reply_payload(
    [
        {"text": "Checking."},
        {
            "functionCall": {"name": "get_weather", "args": {"city": "Paris"}},
            "thoughtSignature": "c2ln",
        },
        {"functionCall": {"name": "get_time", "args": {}}},
    ]
)
CACHED_REPLY = reply_payload(
    [{"text": "Thought about it.", "thought": True}, {"text": "42"}],
    promptTokenCount=1200,
    cachedContentTokenCount=1000,
    candidatesTokenCount=50,
    thoughtsTokenCount=30,
    totalTokenCount=1280,
)
BLOCKED_REPLY = {
    "promptFeedback": {"blockReason": "PROHIBITED_CONTENT"},
    "usageMetadata": {"promptTokenCount": 8, "totalTokenCount": 8},
    "modelVersion": "gemini-2.5-flash",
    "responseId": "resp_2",
}
REPLIES = [TEXT_REPLY, TOOL_REPLY, CACHED_REPLY, BLOCKED_REPLY]


def response(payload: dict[str, Any], status: int = 200, **headers: str) -> HttpResponse:
    return HttpResponse(status=status, headers=headers, body=json.dumps(payload).encode())


def parse(payload: dict[str, Any]) -> ProviderReply:
    reply = ADAPTER.parse_response(response(payload))
    assert isinstance(reply, ProviderReply)
    return reply


def test_reply_fixtures_are_valid_sdk_responses() -> None:
    types = pytest.importorskip("google.genai.types")

    for payload in REPLIES:
        assert (
            payload["responseId"]
            == types.GenerateContentResponse.model_validate(payload).response_id
        )


def test_text_reply() -> None:
    reply = parse(TEXT_REPLY)

    expected = Completion(
        id="resp_1",
        model="gemini-2.5-flash",
        content="Hello there!",
        finish_reason="stop",
        provider_finish_reason="STOP",
    )
    assert (expected, "resp_1") == (reply.completion, reply.request_id)


def test_function_calls_get_deterministic_ids() -> None:
    completion = parse(TOOL_REPLY).completion

    expected = (
        "Checking.",
        [
            ToolCall(
                id="call_0_get_weather", function=FunctionCall("get_weather", '{"city":"Paris"}')
            ),
            ToolCall(id="call_1_get_time", function=FunctionCall("get_time", "{}")),
        ],
        "tool_calls",
        "STOP",
    )
    actual = (
        completion.content,
        completion.tool_calls,
        completion.finish_reason,
        completion.provider_finish_reason,
    )
    assert expected == actual


def test_function_call_ids_from_gemini_are_kept() -> None:
    payload = reply_payload([{"functionCall": {"id": "fc-7", "name": "get_time", "args": {}}}])

    tool_calls = parse(payload).completion.tool_calls

    assert [ToolCall(id="fc-7", function=FunctionCall("get_time", "{}"))] == tool_calls


@pytest.mark.parametrize(
    ("finish", "expected"),
    [
        ("STOP", "stop"),
        ("MAX_TOKENS", "length"),
        ("SAFETY", "content_filter"),
        ("RECITATION", "content_filter"),
        ("BLOCKLIST", "content_filter"),
        ("PROHIBITED_CONTENT", "content_filter"),
        ("SPII", "content_filter"),
        ("MALFORMED_FUNCTION_CALL", "stop"),
        ("OTHER", "stop"),
    ],
)
def test_finish_reasons(finish: str, expected: str) -> None:
    completion = parse(reply_payload([{"text": "x"}], finish=finish)).completion

    assert (expected, finish) == (completion.finish_reason, completion.provider_finish_reason)


def test_usage_keeps_cached_tokens_inside_the_prompt() -> None:
    reply = parse(CACHED_REPLY)

    expected = Usage(
        input_tokens=1200, output_tokens=80, cache_read_tokens=1000, reasoning_tokens=30
    )
    assert expected == reply.usage
    assert CACHED_REPLY["usageMetadata"] == reply.raw_usage
    assert reply.completion.content == "42"  # the thought summary is not the answer


def test_blocked_prompt_is_a_content_policy_error() -> None:
    assert JobError(
        kind=ErrorKind.CONTENT_POLICY,
        message="prompt blocked: PROHIBITED_CONTENT",
        retryable=False,
        provider_status=200,
        provider_code="PROHIBITED_CONTENT",
    ) == ADAPTER.parse_response(response(BLOCKED_REPLY))


def test_safety_stop_without_content() -> None:
    payload = reply_payload([], finish="SAFETY")
    del payload["candidates"][0]["content"]

    completion = parse(payload).completion

    expected = (None, "content_filter")
    assert expected == (completion.content, completion.finish_reason)


# --- errors ------------------------------------------------------------------


def error_body(code: int, status: str, text: str, *details: dict[str, Any]) -> dict[str, Any]:
    error: dict[str, Any] = {"code": code, "message": text, "status": status}
    if details:
        error["details"] = list(details)
    return {"error": error}


@pytest.mark.parametrize(
    ("code", "status", "text", "expected", "retryable"),
    [
        (429, "RESOURCE_EXHAUSTED", "Quota exceeded", ErrorKind.RATE_LIMITED, True),
        (
            400,
            "INVALID_ARGUMENT",
            "The input token count (1200000) exceeds the maximum number of tokens allowed (1000).",
            ErrorKind.CONTEXT_WINDOW_EXCEEDED,
            False,
        ),
        (400, "INVALID_ARGUMENT", "Invalid JSON payload", ErrorKind.BAD_REQUEST, False),
        (
            400,
            "FAILED_PRECONDITION",
            "User location is not supported",
            ErrorKind.BAD_REQUEST,
            False,
        ),
        (403, "PERMISSION_DENIED", "Permission denied", ErrorKind.AUTH, False),
        (401, "UNAUTHENTICATED", "Missing credentials", ErrorKind.AUTH, False),
        (404, "NOT_FOUND", "models/gemini-9 is not found", ErrorKind.NOT_FOUND, False),
        (500, "INTERNAL", "An internal error has occurred", ErrorKind.SERVER_ERROR, True),
        (503, "UNAVAILABLE", "The model is overloaded", ErrorKind.OVERLOADED, True),
        (504, "DEADLINE_EXCEEDED", "Deadline exceeded", ErrorKind.TIMEOUT, True),
    ],
)
def test_errors_by_status(
    code: int, status: str, text: str, expected: ErrorKind, retryable: bool
) -> None:
    error = ADAPTER.parse_response(response(error_body(code, status, text), status=code))

    assert (
        JobError(
            kind=expected,
            message=text,
            retryable=retryable,
            provider_status=code,
            provider_code=status,
        )
        == error
    )


def test_invalid_api_key_is_auth_despite_the_400() -> None:
    info = {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID"}
    payload = error_body(400, "INVALID_ARGUMENT", "API key not valid.", info)

    error = ADAPTER.parse_response(response(payload, status=400))

    assert isinstance(error, JobError)
    expected = (ErrorKind.AUTH, False)
    assert expected == (error.kind, error.retryable)


def test_rate_limit_reads_retry_info_from_the_body() -> None:
    retry = {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "38s"}
    payload = error_body(429, "RESOURCE_EXHAUSTED", "Quota exceeded", retry)

    from_body = ADAPTER.parse_response(response(payload, status=429))
    from_header = ADAPTER.parse_response(response(payload, status=429, **{"retry-after": "5"}))

    assert isinstance(from_body, JobError)
    assert isinstance(from_header, JobError)
    expected = (38.0, 5.0)
    assert expected == (from_body.retry_after_s, from_header.retry_after_s)


def test_error_without_a_google_body_falls_back_to_the_status() -> None:
    error = ADAPTER.parse_response(HttpResponse(status=502, headers={}, body=b"Bad gateway"))

    assert isinstance(error, JobError)
    expected = (ErrorKind.SERVER_ERROR, 502, "Bad gateway")
    assert expected == (error.kind, error.provider_status, error.message)


# --- streaming ---------------------------------------------------------------


def chunk(parts: list[dict[str, Any]], finish: str | None = None, **usage: int) -> dict[str, Any]:
    payload = reply_payload(parts, finish=finish, **usage)
    if not usage:
        del payload["usageMetadata"]
    return payload


TOOL_STREAM = [
    chunk([{"text": "Check"}]),
    chunk([{"text": "ing."}]),
    chunk(
        [
            {
                "functionCall": {"name": "get_weather", "args": {"city": "Paris"}},
                "thoughtSignature": "c2ln",
            },
            {"functionCall": {"name": "get_time", "args": {}}},
        ],
        finish="STOP",
        promptTokenCount=10,
        candidatesTokenCount=5,
    ),
]


def run(chunks: list[dict[str, Any]]) -> tuple[list[StreamDelta], ProviderReply | JobError]:
    decoder = ADAPTER.stream_decoder(None)
    deltas = [delta for c in chunks for delta in decoder.feed(None, json.dumps(c))]
    return deltas, decoder.finish()


def test_stream_chunks_are_valid_sdk_responses() -> None:
    types = pytest.importorskip("google.genai.types")

    for payload in TOOL_STREAM:
        expected = "resp_1"
        assert expected == types.GenerateContentResponse.model_validate(payload).response_id


def test_stream_deltas() -> None:
    deltas, _ = run(TOOL_STREAM)

    weather = ToolCallDelta(
        index=0, id="call_0_get_weather", name="get_weather", arguments='{"city":"Paris"}'
    )
    time = ToolCallDelta(index=1, id="call_1_get_time", name="get_time", arguments="{}")
    assert [
        StreamDelta(content="Check"),
        StreamDelta(content="ing."),
        StreamDelta(tool_calls=[weather]),
        StreamDelta(tool_calls=[time]),
        StreamDelta(finish_reason="tool_calls"),
    ] == deltas


def test_stream_reassembles_the_same_reply_as_the_plain_call() -> None:
    _, streamed = run(TOOL_STREAM)

    assert parse(TOOL_REPLY) == streamed


def test_stream_usage_from_the_last_chunk() -> None:
    chunks = [
        chunk([{"text": "Thought about it.", "thought": True}], promptTokenCount=1200),
        chunk(
            [{"text": "42"}],
            finish="STOP",
            promptTokenCount=1200,
            cachedContentTokenCount=1000,
            candidatesTokenCount=50,
            thoughtsTokenCount=30,
            totalTokenCount=1280,
        ),
    ]

    deltas, streamed = run(chunks)

    assert [StreamDelta(content="42"), StreamDelta(finish_reason="stop")] == deltas
    assert parse(CACHED_REPLY) == streamed


def test_error_chunk_mid_stream_is_the_result() -> None:
    chunks = [chunk([{"text": "Hel"}]), error_body(503, "UNAVAILABLE", "The model is overloaded")]

    deltas, result = run(chunks)

    assert [StreamDelta(content="Hel")] == deltas
    assert (
        JobError(
            kind=ErrorKind.OVERLOADED,
            message="The model is overloaded",
            retryable=True,
            provider_status=503,
            provider_code="UNAVAILABLE",
        )
        == result
    )


def test_blocked_prompt_in_a_stream() -> None:
    _, result = run([BLOCKED_REPLY])

    assert isinstance(result, JobError)
    expected = ErrorKind.CONTENT_POLICY
    assert expected == result.kind


def test_stream_cut_short_is_a_retryable_server_error() -> None:
    _, result = run([chunk([{"text": "Hel"}])])

    assert isinstance(result, JobError)
    expected = (ErrorKind.SERVER_ERROR, True)
    assert expected == (result.kind, result.retryable)
