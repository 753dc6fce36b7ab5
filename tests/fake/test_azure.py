"""Azure OpenAI: the official SDK's AzureOpenAI client and types see a real Azure deployment."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest
import pytest_asyncio
from openai import AsyncAzureOpenAI
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from modelyard.fake import FakeSettings
from tests.fake.conftest import Answer, FakeServer, running, sse, tokens, user
from tests.fake.test_tools import WEATHER

KEY = "azure-fake-0123456789abcdef"
DEPLOYMENT = "gpt-4o-prod"
VERSION = "2024-10-21"
PATH = f"/openai/deployments/{DEPLOYMENT}/chat/completions"
URL = f"{PATH}?api-version={VERSION}"
HEADERS = {"api-key": KEY}
MANUAL = "The operator manual says: " + "keep every queue durable and every ack late. " * 210
SAFE = {"filtered": False, "severity": "safe"}


@pytest_asyncio.fixture
async def guarded() -> AsyncIterator[FakeServer]:
    async with running(FakeSettings(api_key=KEY)) as server:
        yield server


def client(server: FakeServer, key: str = KEY) -> AsyncAzureOpenAI:
    return AsyncAzureOpenAI(
        api_key=key, api_version=VERSION, azure_endpoint=server.base, max_retries=0
    )


def request(**fields: Any) -> dict[str, Any]:
    return {"messages": [user("Hello")], **fields}


async def complete(server: FakeServer, **fields: Any) -> dict[str, Any]:
    answer = await server.post(URL, request(**fields), HEADERS)
    assert answer.status == 200, answer.body
    body: dict[str, Any] = answer.json()
    return body


def error_of(answer: Answer) -> dict[str, Any]:
    error: dict[str, Any] = answer.json()["error"]
    return error


# Happy path ---------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_sdk_completion_names_the_deployment_and_carries_filter_results(
    guarded: FakeServer,
) -> None:
    async with client(guarded) as sdk:
        raw = await sdk.chat.completions.with_raw_response.create(
            model=DEPLOYMENT, messages=[{"role": "user", "content": "Hello"}]
        )
    completion = raw.parse()
    [entry] = await guarded.log()

    assert completion.model == DEPLOYMENT
    assert completion.choices[0].message.content
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == 4 + tokens("Hello") + 3
    assert raw.headers["apim-request-id"] == raw.headers["x-request-id"] == entry["request_id"]
    assert "x-ms-region" in raw.headers
    assert (entry["provider"], entry["path"], entry["model"]) == ("azure", PATH, DEPLOYMENT)
    extra = completion.model_extra or {}
    [prompt_filter] = extra["prompt_filter_results"]
    assert prompt_filter["content_filter_results"]["jailbreak"] == {
        "filtered": False,
        "detected": False,
    }
    choice_filter = (completion.choices[0].model_extra or {})["content_filter_results"]
    assert choice_filter["violence"] == SAFE


@pytest.mark.asyncio
async def test_body_keys_are_in_azures_alphabetical_order(server: FakeServer) -> None:
    body = await complete(server)

    assert list(body) == sorted(body)
    assert list(body["choices"][0]) == sorted(body["choices"][0])
    assert "service_tier" not in body
    ChatCompletion.model_validate(body)


@pytest.mark.asyncio
async def test_model_in_the_body_is_ignored_for_the_deployment(server: FakeServer) -> None:
    body = await complete(server, model="something-else")

    assert body["model"] == DEPLOYMENT


# Streaming ----------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_stream_opens_with_prompt_filters_and_reassembles(server: FakeServer) -> None:
    answer = await server.post(
        URL, request(stream=True, stream_options={"include_usage": True}), HEADERS
    )
    whole = ChatCompletion.model_validate(await complete(server))

    data = [d for _, d in sse(answer.body)]
    assert data[-1] == "[DONE]"
    first = json.loads(data[0])
    assert (first["choices"], first["id"], first["model"], first["object"]) == ([], "", "", "")
    assert first["prompt_filter_results"][0]["prompt_index"] == 0
    chunks = [ChatCompletionChunk.model_validate_json(d) for d in data[1:-1]]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage == whole.usage
    content_chunk = json.loads(data[2])["choices"][0]
    assert content_chunk["content_filter_results"]["hate"] == SAFE


@pytest.mark.asyncio
async def test_sdk_stream_skips_the_filter_chunk(guarded: FakeServer) -> None:
    async with client(guarded) as sdk:
        stream = await sdk.chat.completions.create(
            model=DEPLOYMENT, messages=[{"role": "user", "content": "Hi"}], stream=True
        )
        pieces = [c async for c in stream]
        whole = await sdk.chat.completions.create(
            model=DEPLOYMENT, messages=[{"role": "user", "content": "Hi"}]
        )

    text = "".join(c.choices[0].delta.content or "" for c in pieces if c.choices)
    assert text == whole.choices[0].message.content


# Tools and caching --------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_tool_calls_come_back_in_openai_shape_without_choice_filters(
    server: FakeServer,
) -> None:
    body = await complete(server, tools=[WEATHER])

    completion = ChatCompletion.model_validate(body)
    [call] = completion.choices[0].message.tool_calls or []
    assert call.type == "function"
    assert call.function.name == "get_weather"
    assert body["choices"][0]["content_filter_results"] == {}


@pytest.mark.asyncio
async def test_long_prefixes_are_cached_as_on_openai(server: FakeServer) -> None:
    system = {"role": "system", "content": MANUAL}
    await complete(server, messages=[system, user("First?")])
    second = await complete(server, messages=[system, user("Second?")])

    assert (
        second["usage"]["prompt_tokens_details"]["cached_tokens"]
        == (4 + tokens(MANUAL)) // 128 * 128
    )


# Auth, routing and validation ----------------------------------------------------------------


@pytest.mark.asyncio
async def test_api_key_header_is_checked(guarded: FakeServer) -> None:
    wrong = await guarded.post(URL, request(), {"api-key": "nope"})
    right = await guarded.post(URL, request(), HEADERS)

    assert wrong.status == 401
    assert error_of(wrong) == {
        "code": "401",
        "message": "Access denied due to invalid subscription key or wrong API endpoint. Make sure"
        " to provide a valid key for an active subscription and use a correct regional API"
        " endpoint for your resource.",
    }
    assert right.status == 200
    async with client(guarded, key="nope") as sdk:
        with pytest.raises(openai.AuthenticationError):
            await sdk.chat.completions.create(
                model=DEPLOYMENT, messages=[{"role": "user", "content": "Hi"}]
            )


@pytest.mark.asyncio
async def test_api_version_is_required_as_azure_requires_it(server: FakeServer) -> None:
    missing = await server.post(PATH, request(), HEADERS)
    malformed = await server.post(f"{PATH}?api-version=yesterday", request(), HEADERS)
    preview = await server.post(f"{PATH}?api-version=2025-04-01-preview", request(), HEADERS)

    assert (missing.status, error_of(missing)) == (
        404,
        {"code": "404", "message": "Resource not found"},
    )
    assert (malformed.status, error_of(malformed)["code"]) == (400, "BadRequest")
    assert preview.status == 200


@pytest.mark.asyncio
async def test_openai_validation_applies(server: FakeServer) -> None:
    answer = await server.post(URL, {"messages": []}, HEADERS)

    assert answer.status == 400
    assert error_of(answer)["code"] == "empty_array"


# Faults and refusals ----------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_rate_limit_is_azures_429_with_retry_hints(server: FakeServer) -> None:
    await server.configure(rate_429=1.0, retry_after_s=6)

    answer = await server.post(URL, request(), HEADERS)

    assert answer.status == 429
    assert error_of(answer) == {
        "code": "429",
        "message": "Requests to the ChatCompletions_Create Operation under Azure OpenAI API version"
        f" {VERSION} have exceeded call rate limit of your current OpenAI S0 pricing tier. Please"
        " retry after 6 seconds. Please go here: https://aka.ms/oai/quotaincrease if you would"
        " like to further increase the default rate limit.",
    }
    assert (answer.headers["retry-after"], answer.headers["retry-after-ms"]) == ("6", "6000")


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("setting", "status", "type_"),
    [
        ("rate_quota", 429, "insufficient_quota"),
        ("rate_500", 500, "server_error"),
        ("rate_503", 503, "server_error"),
    ],
)
async def test_service_faults_keep_openais_shape(
    server: FakeServer, setting: str, status: int, type_: str
) -> None:
    await server.configure(**{setting: 1.0})

    answer = await server.post(URL, request(), HEADERS)

    assert (answer.status, error_of(answer)["type"]) == (status, type_)


@pytest.mark.asyncio
async def test_malformed_answer_is_cut(server: FakeServer) -> None:
    await server.configure(rate_malformed=1.0)

    answer = await server.post(URL, request(), HEADERS)

    assert answer.status == 200
    with pytest.raises(json.JSONDecodeError):
        json.loads(answer.body)


@pytest.mark.asyncio
async def test_forbidden_content_is_azures_content_filter_400(guarded: FakeServer) -> None:
    answer = await guarded.post(URL, request(messages=[user("say forbidden-content")]), HEADERS)

    error = error_of(answer)
    assert (answer.status, error["code"], error["param"], error["status"]) == (
        400,
        "content_filter",
        "prompt",
        400,
    )
    assert error["innererror"]["code"] == "ResponsibleAIPolicyViolation"
    assert error["innererror"]["content_filter_result"]["violence"]["filtered"] is True
    async with client(guarded) as sdk:
        with pytest.raises(openai.BadRequestError) as raised:
            await sdk.chat.completions.create(
                model=DEPLOYMENT, messages=[{"role": "user", "content": "forbidden-content"}]
            )
    assert raised.value.code == "content_filter"


@pytest.mark.asyncio
async def test_prompt_over_the_context_window_is_context_length_exceeded(
    server: FakeServer,
) -> None:
    await server.configure(context_window=10)

    answer = await server.post(
        URL, request(messages=[user("one two three four five six seven")]), HEADERS
    )

    assert answer.status == 400
    assert error_of(answer)["code"] == "context_length_exceeded"
    assert error_of(answer)["message"].startswith(
        "This model's maximum context length is 10 tokens. However, your messages resulted in 14"
    )
