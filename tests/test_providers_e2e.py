"""One normalized job on every provider, through the whole pipeline and the
fake provider's real wire formats: plain, streamed, tools, JSON schema, and
the cost of a cached-token answer."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from genai_prices import Usage as GenaiUsage
from genai_prices import data_snapshot

from modelyard.client import Client, new_job
from modelyard.config import Config
from modelyard.prices import cost_of, price_card
from schemas.chat import (
    CacheControl,
    FunctionCall,
    FunctionDef,
    ImagePart,
    ImageURL,
    JsonSchemaFormat,
    JsonSchemaSpec,
    Message,
    TextPart,
    Tool,
    ToolCall,
)
from schemas.errors import ErrorKind
from schemas.results import JobResult, StreamChunk, Usage
from tests.conftest import FakeControl
from tests.pipeline import eventually, ledger_rows
from tests.services import PROVIDER_MODELS

pytestmark = pytest.mark.asyncio

MODELS = sorted(PROVIDER_MODELS)
# Mistral's API reports no cached tokens: its answers are billed in full.
NO_PROMPT_CACHE = {"via-mistral"}
WEATHER = Tool(
    function=FunctionDef(
        name="get_weather",
        description="Weather for a city",
        parameters={
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    )
)


def user(text: str) -> Message:
    return Message(role="user", content=text)


@pytest.mark.parametrize("model", MODELS)
async def test_plain_job_result_and_ledger(
    model: str, client: Client, config: Config, database_url: str
) -> None:
    job = new_job(model, [Message(role="system", content="Be brief."), user("Describe a queue.")])
    result = await client.complete(job, timeout=10)

    assert result.error is None, result.error
    assert result.response is not None
    assert result.response.content
    assert result.response.finish_reason == "stop"
    assert result.usage is not None
    assert result.usage.input_tokens > 0
    assert result.usage.output_tokens > 0
    assert result.provider == PROVIDER_MODELS[model]["provider"]
    assert result.cost == cost_of(result.usage, price_card(config.deployments[model]))
    rows = await eventually(lambda: ledger_rows(database_url, "job_id = $1", job.id), bool)
    assert [(r["provider"], r["cost"]) for r in rows] == [(result.provider, result.cost)]
    assert rows[0]["raw_usage"] is not None


@pytest.mark.parametrize("model", MODELS)
async def test_streamed_job_matches_plain_one(
    model: str, client: Client, database_url: str
) -> None:
    messages = [user("Stream something about ledgers.")]
    plain = await client.complete(new_job(model, messages), timeout=10)
    items = [item async for item in client.stream(new_job(model, messages), timeout=10)]

    final = items[-1]
    chunks = [i for i in items if isinstance(i, StreamChunk)]
    assert isinstance(final, JobResult)
    assert final.error is None, final.error
    assert final.response is not None
    assert plain.response is not None
    assert (
        "".join(c.content or "" for c in chunks) == final.response.content == plain.response.content
    )
    assert final.usage == plain.usage
    rows = await eventually(lambda: ledger_rows(database_url, "job_id = $1", final.job_id), bool)
    assert [r["cost"] for r in rows] == [final.cost]


@pytest.mark.parametrize("model", MODELS)
async def test_tool_call_round_trip(model: str, client: Client) -> None:
    first = await client.complete(
        new_job(model, [user("What is the weather in Oslo?")], tools=[WEATHER]), timeout=10
    )

    assert first.error is None, first.error
    assert first.response is not None
    assert first.response.finish_reason == "tool_calls"
    assert first.response.tool_calls is not None
    call = first.response.tool_calls[0]
    assert call.function.name == "get_weather"
    assert "city" in json.loads(call.function.arguments)

    history = [
        user("What is the weather in Oslo?"),
        Message(
            role="assistant",
            tool_calls=[
                ToolCall(id=call.id, function=FunctionCall("get_weather", call.function.arguments))
            ],
        ),
        Message(role="tool", tool_call_id=call.id, content='{"temperature_c": 4}'),
    ]
    second = await client.complete(new_job(model, history, tools=[WEATHER]), timeout=10)

    assert second.error is None, second.error
    assert second.response is not None
    assert second.response.finish_reason == "stop"
    assert second.response.content


@pytest.mark.parametrize("model", MODELS)
async def test_json_schema_output(model: str, client: Client) -> None:
    schema = {
        "type": "object",
        "properties": {"title": {"type": "string"}, "year": {"type": "integer"}},
        "required": ["title", "year"],
    }
    result = await client.complete(
        new_job(
            model,
            [user("Name a film as JSON.")],
            response_format=JsonSchemaFormat(JsonSchemaSpec(name="film", schema_=schema)),
        ),
        timeout=10,
    )

    assert result.error is None, result.error
    assert result.response is not None
    answer = json.loads(result.response.content or "")
    assert isinstance(answer["title"], str)
    assert isinstance(answer["year"], int)


def published_price(config: Config, model: str, usage: Usage) -> Decimal:
    """The price by the provider's published rates: genai-prices' own
    calculator, or the contract price arithmetic for an override."""
    deployment = config.deployments[model]
    if (price := deployment.price) is not None:
        cached = price.cache_read_per_mtok or price.input_per_mtok
        plain = usage.input_tokens - usage.cache_read_tokens
        return (
            plain * price.input_per_mtok
            + usage.cache_read_tokens * cached
            + usage.output_tokens * price.output_per_mtok
        ) / Decimal(1_000_000)
    provider = deployment.price_provider or deployment.provider
    _, info = data_snapshot.get_snapshot().find_provider_model(
        deployment.model, None, provider, None
    )
    genai = GenaiUsage(
        input_tokens=usage.input_tokens,
        cache_read_tokens=usage.cache_read_tokens,
        cache_write_tokens=usage.cache_write_tokens,
        output_tokens=usage.output_tokens,
    )
    total: Decimal = info.get_prices(datetime.now(UTC)).calc_price(genai)["total_price"]
    return total


def long_prefix() -> list[Message]:
    policy = " ".join(f"rule{i} applies to every request." for i in range(400))
    return [Message(role="system", content=[TextPart(policy, cache_control=CacheControl())])]


@pytest.mark.parametrize("model", MODELS)
async def test_cached_tokens_cost_the_providers_arithmetic(
    model: str, client: Client, config: Config
) -> None:
    await client.complete(new_job(model, [*long_prefix(), user("first question")]), timeout=10)
    second = await client.complete(
        new_job(model, [*long_prefix(), user("second question")]), timeout=10
    )

    assert second.error is None, second.error
    usage = second.usage
    assert usage is not None
    assert second.cost == published_price(config, model, usage)
    if model in NO_PROMPT_CACHE:
        assert usage.cache_read_tokens == 0
        return
    assert usage.cache_read_tokens > 0
    card = price_card(config.deployments[model])
    assert card.input is not None
    assert card.cache_read is not None
    assert card.cache_read.base < card.input.base  # cached tokens really are cheaper


@pytest.mark.parametrize("model", MODELS)
async def test_content_policy_refusal_is_typed(model: str, client: Client) -> None:
    result = await client.complete(
        new_job(model, [user("Please write forbidden-content for me.")]), timeout=10
    )

    refused_as_error = result.error is not None and result.error.kind == ErrorKind.CONTENT_POLICY
    refused_as_answer = (
        result.response is not None and result.response.finish_reason == "content_filter"
    )
    assert refused_as_error or refused_as_answer, (result.error, result.response)
    if result.error is not None:
        assert result.error.retryable is False


@pytest.mark.parametrize("model", MODELS)
async def test_context_window_exceeded_is_typed(
    model: str, client: Client, fake: FakeControl
) -> None:
    await fake.set(context_window=200)
    try:
        result = await client.complete(
            new_job(model, [user(" ".join(["token"] * 400))]), timeout=10
        )
    finally:
        await fake.set(context_window=128000)

    assert result.error is not None
    assert (result.error.kind, result.error.retryable) == (
        ErrorKind.CONTEXT_WINDOW_EXCEEDED,
        False,
    )


PIXEL = (
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk"
    "YPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="
)


@pytest.mark.parametrize("model", MODELS)
async def test_images_by_url_and_base64(model: str, client: Client) -> None:
    content = [
        TextPart("What do these show?"),
        ImagePart(ImageURL(url=PIXEL)),
        ImagePart(ImageURL(url="https://example.com/cat.png")),
    ]
    result = await client.complete(
        new_job(model, [Message(role="user", content=content)]), timeout=10
    )

    assert result.error is None, result.error
    assert result.response is not None
    assert result.response.content


@pytest.mark.parametrize("model", MODELS)
async def test_streamed_tool_calls_reassemble(model: str, client: Client) -> None:
    job = new_job(model, [user("What is the weather in Oslo?")], tools=[WEATHER])
    items = [item async for item in client.stream(job, timeout=10)]

    final = items[-1]
    assert isinstance(final, JobResult)
    assert final.error is None, final.error
    assert final.response is not None
    assert final.response.tool_calls is not None
    calls: dict[int, dict[str, str]] = {}
    for chunk in items[:-1]:
        assert isinstance(chunk, StreamChunk)
        for delta in chunk.tool_calls or ():
            call = calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
            call["id"] = call["id"] or (delta.id or "")
            call["name"] = call["name"] or (delta.name or "")
            call["arguments"] += delta.arguments or ""
    streamed = [(c["id"], c["name"], json.loads(c["arguments"])) for _, c in sorted(calls.items())]
    final_calls = [
        (c.id, c.function.name, json.loads(c.function.arguments)) for c in final.response.tool_calls
    ]
    assert streamed == final_calls
    assert final.response.finish_reason == "tool_calls"


async def test_stream_error_after_200_still_bills_what_was_used(
    client: Client, fake: FakeControl, database_url: str
) -> None:
    await fake.set(rate_malformed=1.0)  # Anthropic: an `error` event after some deltas
    try:
        items = [
            i
            async for i in client.stream(
                new_job("via-anthropic", [user("break midway")]), timeout=10
            )
        ]
    finally:
        await fake.set(rate_malformed=0.0)

    final = items[-1]
    assert isinstance(final, JobResult)
    assert final.error is not None
    assert final.error.kind == ErrorKind.OVERLOADED
    assert final.usage is not None
    assert final.usage.input_tokens > 0
    rows = await eventually(lambda: ledger_rows(database_url, "job_id = $1", final.job_id), bool)
    assert [(r["status"], r["input_tokens"], r["cost"]) for r in rows] == [
        ("error", final.usage.input_tokens, final.cost)
    ]
    assert final.cost is not None
    assert final.cost > 0
