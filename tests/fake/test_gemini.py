"""Google Gemini: the official google-genai SDK and its types see a real Generative Language API."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any, Literal

import pytest
import pytest_asyncio
from google import genai
from google.genai import errors as genai_errors
from google.genai import types
from pydantic import BaseModel, Field

from modelyard.fake import FakeSettings
from tests.fake.conftest import Answer, FakeServer, running, sse, tokens

KEY = "AIzaFake0123456789abcdef"
MODEL = "gemini-2.0-flash"
GENERATE = f"/v1beta/models/{MODEL}:generateContent"
STREAM = f"/v1beta/models/{MODEL}:streamGenerateContent"
HEADERS = {"x-goog-api-key": KEY}
MANUAL = "The operator manual says: " + "keep every queue durable and every ack late. " * 210
WEATHER = {
    "name": "get_weather",
    "description": "Weather for a city",
    "parameters": {
        "type": "OBJECT",
        "properties": {
            "city": {"type": "STRING"},
            "days": {"type": "INTEGER", "minimum": 1, "maximum": 7},
            "unit": {"type": "STRING", "enum": ["celsius", "fahrenheit"]},
        },
        "required": ["city", "days", "unit"],
    },
}
CLOCK = {
    "name": "get_time",
    "parameters": {
        "type": "OBJECT",
        "properties": {"zone": {"type": "STRING"}},
        "required": ["zone"],
    },
}


class Weather(BaseModel):
    city: str
    days: int = Field(ge=1, le=7)
    unit: Literal["celsius", "fahrenheit"]


# google-genai subclasses aiohttp's ClientSession for its async client, which aiohttp warns about.
sdk_warnings = pytest.mark.filterwarnings(
    "ignore:Inheritance class AiohttpClientSession:DeprecationWarning"
)


@pytest_asyncio.fixture
async def guarded() -> AsyncIterator[FakeServer]:
    async with running(FakeSettings(api_key=KEY)) as server:
        yield server


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "parts": [{"text": text}]}


def request(**fields: Any) -> dict[str, Any]:
    return {"contents": [user("Hello")], **fields}


async def generate(
    server: FakeServer, path: str = GENERATE, **fields: Any
) -> types.GenerateContentResponse:
    answer = await server.post(path, request(**fields), HEADERS)
    assert answer.status == 200, answer.body
    return types.GenerateContentResponse.model_validate(answer.json())


def error_of(answer: Answer) -> tuple[int, str, str]:
    assert answer.headers["Content-Type"] == "application/json; charset=UTF-8"
    error = answer.json()["error"]
    assert error["code"] == answer.status
    return error["code"], error["status"], error["message"]


def text_of(response: types.GenerateContentResponse) -> str:
    return "".join(
        p.text or ""
        for c in response.candidates or ()
        for p in (c.content and c.content.parts) or ()
    )


# Happy path ---------------------------------------------------------------------


@pytest.mark.asyncio
@sdk_warnings
async def test_sdk_response_validates_and_the_log_joins_on_response_id(guarded: FakeServer) -> None:
    sdk = genai.Client(api_key=KEY, http_options=types.HttpOptions(base_url=guarded.base))
    try:
        response = await sdk.aio.models.generate_content(model=MODEL, contents="Hello")
    finally:
        await sdk.aio.aclose()
    [entry] = await guarded.log()

    assert response.text
    [candidate] = response.candidates or []
    assert (candidate.finish_reason, candidate.index) == (types.FinishReason.STOP, 0)
    assert candidate.content is not None
    assert candidate.content.role == "model"
    usage = response.usage_metadata
    assert usage is not None
    assert usage.prompt_token_count == tokens("Hello")
    assert usage.candidates_token_count == tokens(response.text)
    assert usage.total_token_count == usage.prompt_token_count + usage.candidates_token_count
    assert usage.cached_content_token_count is None
    assert response.model_version == MODEL
    assert (entry["provider"], entry["model"]) == ("gemini", MODEL)
    assert entry["path"].endswith(f"/models/{MODEL}:generateContent")  # v1 or v1beta by SDK
    assert entry["request_id"] == response.response_id
    assert (entry["prompt_tokens"], entry["completion_tokens"]) == (1, usage.candidates_token_count)


@pytest.mark.asyncio
async def test_system_instruction_and_model_turns_are_part_of_the_prompt(
    server: FakeServer,
) -> None:
    history = [user("Hi"), {"role": "model", "parts": [{"text": "Hello there."}]}, user("And?")]
    plain = await generate(server, contents=history)
    instructed = await generate(
        server, contents=history, systemInstruction={"parts": [{"text": "Be brief."}]}
    )

    assert plain.usage_metadata is not None
    assert instructed.usage_metadata is not None
    prompt = tokens("Hi") + tokens("Hello there.") + tokens("And?")
    assert plain.usage_metadata.prompt_token_count == prompt
    assert instructed.usage_metadata.prompt_token_count == prompt + tokens("Be brief.")
    assert text_of(plain) != text_of(instructed)


@pytest.mark.asyncio
async def test_max_output_tokens_and_stop_sequences_are_honoured(server: FakeServer) -> None:
    whole = text_of(await generate(server))
    word = whole.split()[3]

    short = await generate(server, generationConfig={"maxOutputTokens": 3})
    stopped = await generate(server, generationConfig={"stopSequences": [word]})

    assert short.candidates
    assert short.candidates[0].finish_reason == types.FinishReason.MAX_TOKENS
    assert short.usage_metadata
    assert short.usage_metadata.candidates_token_count == 3
    assert stopped.candidates
    assert stopped.candidates[0].finish_reason == types.FinishReason.STOP
    assert whole.startswith(text_of(stopped))
    assert word not in text_of(stopped)


@pytest.mark.asyncio
async def test_thinking_models_report_thoughts_outside_candidates(server: FakeServer) -> None:
    thinking = await generate(server, path="/v1beta/models/gemini-2.5-flash:generateContent")
    no_budget = await generate(
        server,
        path="/v1beta/models/gemini-2.5-flash:generateContent",
        generationConfig={"thinkingConfig": {"thinkingBudget": 0}},
    )

    usage = thinking.usage_metadata
    assert usage is not None
    assert usage.thoughts_token_count
    assert usage.candidates_token_count == tokens(text_of(thinking))
    parts = (usage.prompt_token_count, usage.candidates_token_count, usage.thoughts_token_count)
    assert usage.total_token_count == sum(part or 0 for part in parts)
    assert no_budget.usage_metadata is not None
    assert no_budget.usage_metadata.thoughts_token_count is None


# Streaming ----------------------------------------------------------------------


@pytest.mark.asyncio
async def test_sse_stream_reassembles_to_the_whole_response(server: FakeServer) -> None:
    answer = await server.post(f"{STREAM}?alt=sse", request(), HEADERS)
    whole = await generate(server)

    assert answer.headers["Content-Type"] == "text/event-stream"
    assert b"\r\n\r\n" in answer.body
    chunks = [
        types.GenerateContentResponse.model_validate_json(data) for _, data in sse(answer.body)
    ]
    assert len(chunks) > 1
    assert "".join(text_of(c) for c in chunks) == text_of(whole)
    finishes = [c.candidates[0].finish_reason for c in chunks if c.candidates]
    assert finishes == [None] * (len(chunks) - 1) + [types.FinishReason.STOP]
    assert chunks[-1].usage_metadata == whole.usage_metadata
    assert len({c.response_id for c in chunks}) == 1


@pytest.mark.asyncio
async def test_stream_without_alt_sse_is_a_json_array(server: FakeServer) -> None:
    answer = await server.post(STREAM, request(), HEADERS)
    whole = await generate(server)

    chunks = [types.GenerateContentResponse.model_validate(c) for c in answer.json()]
    assert "".join(text_of(c) for c in chunks) == text_of(whole)


@pytest.mark.asyncio
@sdk_warnings
async def test_sdk_stream_agrees_with_the_whole_response(guarded: FakeServer) -> None:
    sdk = genai.Client(api_key=KEY, http_options=types.HttpOptions(base_url=guarded.base))
    try:
        pieces = [
            c
            async for c in await sdk.aio.models.generate_content_stream(model=MODEL, contents="Hi")
        ]
        whole = await sdk.aio.models.generate_content(model=MODEL, contents="Hi")
    finally:
        await sdk.aio.aclose()

    assert "".join(p.text or "" for p in pieces) == whole.text
    assert pieces[-1].usage_metadata == whole.usage_metadata


# Tools and structured output ------------------------------------------------------


@pytest.mark.asyncio
async def test_mode_any_with_one_allowed_function_calls_it(server: FakeServer) -> None:
    response = await generate(
        server,
        tools=[{"functionDeclarations": [WEATHER, CLOCK]}],
        toolConfig={"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["get_time"]}},
    )

    assert response.function_calls is not None
    [call] = response.function_calls
    assert call.name == "get_time"
    assert isinstance((call.args or {}).get("zone"), str)
    assert response.candidates
    assert response.candidates[0].finish_reason == types.FinishReason.STOP


@pytest.mark.asyncio
async def test_function_args_fit_the_declared_schema(server: FakeServer) -> None:
    response = await generate(server, tools=[{"functionDeclarations": [WEATHER]}])

    [call] = response.function_calls or []
    assert call.name == "get_weather"
    Weather.model_validate(call.args)


@pytest.mark.asyncio
async def test_mode_none_and_function_responses_get_text(server: FakeServer) -> None:
    declared: dict[str, Any] = {"tools": [{"functionDeclarations": [WEATHER]}]}
    none = await generate(
        server, toolConfig={"functionCallingConfig": {"mode": "NONE"}}, **declared
    )
    answered = await generate(
        server,
        contents=[
            user("Weather in Paris?"),
            {
                "role": "model",
                "parts": [{"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}}],
            },
            {
                "role": "user",
                "parts": [
                    {"functionResponse": {"name": "get_weather", "response": {"sky": "clear"}}}
                ],
            },
        ],
        **declared,
    )

    assert none.function_calls is None
    assert text_of(none)
    assert answered.function_calls is None
    assert text_of(answered)


@pytest.mark.asyncio
async def test_json_mime_type_with_response_schema_gives_matching_json(server: FakeServer) -> None:
    schema = WEATHER["parameters"]
    typed = await generate(
        server, generationConfig={"responseMimeType": "application/json", "responseSchema": schema}
    )
    json_schema = await generate(
        server,
        generationConfig={
            "responseMimeType": "application/json",
            "responseJsonSchema": Weather.model_json_schema(),
        },
    )
    free = await generate(server, generationConfig={"responseMimeType": "application/json"})

    Weather.model_validate_json(text_of(typed))
    Weather.model_validate_json(text_of(json_schema))
    assert isinstance(json.loads(text_of(free)), dict)


# Validation and auth ----------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({}, "* GenerateContentRequest.contents: contents is not specified\n"),
        (
            {"contents": [{"role": "system", "parts": [{"text": "Be brief."}]}]},
            "Please use a valid role: user, model.",
        ),
        (
            {"contents": [{"role": "user", "parts": []}]},
            "* GenerateContentRequest.contents[0].parts: contents.parts must not be empty.\n",
        ),
        (
            {"contents": [user("Hi")], "generationConfig": {"maxOutputTokens": "many"}},
            "Invalid value at 'generation_config.max_output_tokens' (TYPE_INT32), \"many\"",
        ),
        (
            {
                "contents": [user("Hi")],
                "toolConfig": {"functionCallingConfig": {"mode": "SOMETIMES"}},
            },
            "Invalid value at 'tool_config.function_calling_config.mode'"
            " (type.googleapis.com/google.ai.generativelanguage.v1beta.FunctionCallingConfig.Mode),"
            ' "SOMETIMES"',
        ),
        (
            {"contents": [user("Hi")], "generationConfig": {"responseMimeType": "text/html"}},
            "* GenerateContentRequest.generation_config.response_mime_type: allowed mimetypes are"
            " `text/plain`, `application/json`, `application/xml`, `application/yaml` and"
            " `text/x.enum`.\n",
        ),
        (
            {"contents": [user("Hi")], "tools": [{"functionDeclarations": [{"description": "x"}]}]},
            "* GenerateContentRequest.tools[0].function_declarations[0].name:"
            " Name cannot be empty.\n",
        ),
    ],
)
async def test_invalid_requests_get_googles_400(
    server: FakeServer, body: dict[str, Any], message: str
) -> None:
    answer = await server.post(GENERATE, body, HEADERS)

    assert error_of(answer) == (400, "INVALID_ARGUMENT", message)


@pytest.mark.asyncio
@sdk_warnings
async def test_api_key_in_header_or_query(guarded: FakeServer) -> None:
    header = await guarded.post(GENERATE, request(), HEADERS)
    query = await guarded.post(f"{GENERATE}?key={KEY}", request())
    wrong = await guarded.post(GENERATE, request(), {"x-goog-api-key": "AIzaWrong"})
    missing = await guarded.post(GENERATE, request())

    assert (header.status, query.status) == (200, 200)
    assert error_of(wrong) == (
        400,
        "INVALID_ARGUMENT",
        "API key not valid. Please pass a valid API key.",
    )
    assert wrong.json()["error"]["details"][0]["reason"] == "API_KEY_INVALID"
    assert error_of(missing)[:2] == (403, "PERMISSION_DENIED")
    sdk = genai.Client(api_key="AIzaWrong", http_options=types.HttpOptions(base_url=guarded.base))
    try:
        with pytest.raises(genai_errors.ClientError) as raised:
            await sdk.aio.models.generate_content(model=MODEL, contents="Hi")
    finally:
        await sdk.aio.aclose()
    assert (raised.value.code, raised.value.status) == (400, "INVALID_ARGUMENT")


@pytest.mark.asyncio
async def test_unknown_method_is_not_found(server: FakeServer) -> None:
    answer = await server.post(f"/v1beta/models/{MODEL}:predict", request(), HEADERS)

    assert error_of(answer)[:2] == (404, "NOT_FOUND")


# Faults -----------------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("setting", "status", "code"),
    [
        ("rate_429", 429, "RESOURCE_EXHAUSTED"),
        ("rate_quota", 429, "RESOURCE_EXHAUSTED"),
        ("rate_500", 500, "INTERNAL"),
        ("rate_503", 503, "UNAVAILABLE"),
    ],
)
async def test_faults_have_googles_status(
    server: FakeServer, setting: str, status: int, code: str
) -> None:
    await server.configure(**{setting: 1.0}, retry_after_s=7)

    answer = await server.post(GENERATE, request(), HEADERS)

    assert error_of(answer)[:2] == (status, code)
    details = answer.json()["error"].get("details", [])
    delays = [d["retryDelay"] for d in details if d["@type"].endswith("RetryInfo")]
    assert delays == (["7s"] if setting == "rate_429" else [])
    assert "retry-after" not in answer.headers


@pytest.mark.asyncio
@sdk_warnings
async def test_sdk_raises_client_and_server_errors_for_faults(guarded: FakeServer) -> None:
    sdk = genai.Client(api_key=KEY, http_options=types.HttpOptions(base_url=guarded.base))
    try:
        await guarded.configure(rate_429=1.0)
        with pytest.raises(genai_errors.ClientError) as limited:
            await sdk.aio.models.generate_content(model=MODEL, contents="Hi")
        await guarded.configure(rate_429=0.0, rate_503=1.0)
        with pytest.raises(genai_errors.ServerError) as overloaded:
            await sdk.aio.models.generate_content(model=MODEL, contents="Hi")
    finally:
        await sdk.aio.aclose()

    assert (limited.value.code, overloaded.value.code) == (429, 503)


@pytest.mark.asyncio
async def test_malformed_breaks_the_body_and_the_stream(server: FakeServer) -> None:
    await server.configure(rate_malformed=1.0)

    body = await server.post(GENERATE, request(), HEADERS)
    stream = await server.post(f"{STREAM}?alt=sse", request(), HEADERS)

    assert (body.status, stream.status) == (200, 200)
    with pytest.raises(json.JSONDecodeError):
        json.loads(body.body)
    last = stream.body.decode().rstrip("\r\n").split("\r\n\r\n")[-1]
    with pytest.raises(json.JSONDecodeError):
        json.loads(last.removeprefix("data: "))


# Caching and refusals ---------------------------------------------------------------


@pytest.mark.asyncio
async def test_repeated_long_prefix_is_reported_as_cached_content(server: FakeServer) -> None:
    system = {"parts": [{"text": MANUAL}]}
    first = await generate(server, systemInstruction=system, contents=[user("First question?")])
    second = await generate(server, systemInstruction=system, contents=[user("Another question?")])

    assert first.usage_metadata is not None
    assert second.usage_metadata is not None
    assert first.usage_metadata.cached_content_token_count is None
    cached = second.usage_metadata.cached_content_token_count
    assert cached == tokens(MANUAL) // 128 * 128
    assert second.usage_metadata.prompt_token_count == tokens(MANUAL) + tokens("Another question?")
    assert second.usage_metadata.cache_tokens_details is not None
    [entry] = (await server.log())[1:]
    assert (entry["prompt_tokens"], entry["cached_tokens"]) == (
        second.usage_metadata.prompt_token_count,
        cached,
    )


@pytest.mark.asyncio
async def test_content_policy_blocks_the_prompt_with_no_candidates(server: FakeServer) -> None:
    response = await generate(server, contents=[user("Say forbidden-content")])
    stream = await server.post(
        f"{STREAM}?alt=sse", request(contents=[user("forbidden-content")]), HEADERS
    )

    assert response.candidates is None
    assert response.prompt_feedback is not None
    assert response.prompt_feedback.block_reason == types.BlockedReason.SAFETY
    assert response.usage_metadata is not None
    assert response.usage_metadata.prompt_token_count == tokens("Say forbidden-content")
    [(_, data)] = sse(stream.body)
    assert json.loads(data)["promptFeedback"]["blockReason"] == "SAFETY"


@pytest.mark.asyncio
async def test_prompt_over_the_context_window_is_refused(server: FakeServer) -> None:
    await server.configure(context_window=100)

    answer = await server.post(GENERATE, request(contents=[user(MANUAL)]), HEADERS)

    assert error_of(answer) == (
        400,
        "INVALID_ARGUMENT",
        f"The input token count ({tokens(MANUAL)}) exceeds the maximum number of tokens allowed"
        " (100).",
    )
