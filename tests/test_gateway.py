"""The HTTP gateway, driven by the official OpenAI and Anthropic SDKs, over
the real broker and database, with the fake provider behind it.

Two gateways run in this process on the session's pipeline: an open one
(no key required) and a guarded one (keys required, models approved)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import aiohttp
import anthropic
import msgspec
import openai
import pytest
import pytest_asyncio

from gateway.service import Gateway
from modelyard import broker, budgets
from modelyard.config import AccessSettings, Config, GatewaySettings
from modelyard.database import connect
from modelyard.ops import Readiness, database_check
from modelyard.prices import estimated_cost, price_card, token_bound
from router import approvals, keys
from schemas.chat import ChatRequest, Message
from schemas.codec import decode_job, encode
from schemas.results import Completion, JobResult, StreamChunk
from tests.conftest import FakeControl
from tests.pipeline import eventually, ledger_rows
from tests.services import free_port

pytestmark = pytest.mark.asyncio(loop_scope="session")

BODY_LIMIT = 4096


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def open_gateway(config: Config, pipeline: None) -> AsyncIterator[Gateway]:
    async with _Running(config, "test-gateway-open") as gateway:
        yield gateway


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def guarded_gateway(config: Config, pipeline: None) -> AsyncIterator[Gateway]:
    guarded = msgspec.structs.replace(
        config,
        access=AccessSettings(require_key=True, require_approval=True, cache_s=0.2),
        gateway=GatewaySettings(port=0, max_body_bytes=BODY_LIMIT),
    )
    async with _Running(guarded, "test-gateway-guarded") as gateway:
        yield gateway


class _Running:
    def __init__(self, config: Config, name: str) -> None:
        self.config, self.name = config, name

    async def __aenter__(self) -> Gateway:
        self.connection = await broker.connect(self.config.broker_url, self.name)
        self.gateway = Gateway(self.config, self.connection, port=0)
        await self.gateway.start()
        return self.gateway

    async def __aexit__(self, *_: object) -> None:
        await self.gateway.stop()
        await self.connection.close()


_opened: list[openai.AsyncOpenAI | anthropic.AsyncAnthropic] = []


@pytest_asyncio.fixture(autouse=True, loop_scope="session")
async def _close_clients() -> AsyncIterator[None]:
    yield
    while _opened:
        await _opened.pop().close()


def openai_client(gateway: Gateway, key: str = "sk-anything") -> openai.AsyncOpenAI:
    client = openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key=key, max_retries=0)
    _opened.append(client)
    return client


def anthropic_client(gateway: Gateway, key: str = "sk-anything") -> anthropic.AsyncAnthropic:
    client = anthropic.AsyncAnthropic(base_url=gateway.url, api_key=key, max_retries=0)
    _opened.append(client)
    return client


async def issue_key(config: Config, **options: Any) -> str:
    conn = await connect(config.database_url)
    try:
        issued = await keys.create(conn, team=options.pop("team", "gw-team"), **options)
    finally:
        await conn.close()
    return issued.secret


async def approve(config: Config, *models: str) -> None:
    conn = await connect(config.database_url)
    try:
        for model in models:
            await approvals.record(conn, model, "approve", actor="test")
    finally:
        await conn.close()


HELLO = [{"role": "user", "content": "hello gateway"}]


# --- OpenAI's API -------------------------------------------------------------


async def test_a_chat_completion_is_answered_and_billed(open_gateway: Gateway) -> None:
    client = openai_client(open_gateway)
    raw = await client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=HELLO
    )
    completion = raw.parse()

    assert completion.choices[0].message.content
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert completion.usage.prompt_tokens > 0
    job_id = raw.headers["x-request-id"]
    assert raw.headers["x-modelyard-deployment"] == "mini"
    assert raw.headers["x-modelyard-provider"] == "openai"
    rows = await eventually(
        lambda: ledger_rows(open_gateway.config.database_url, "job_id = $1", job_id),
        lambda r: len(r) == 1,
    )
    assert [r["cost"] for r in rows] == [Decimal(raw.headers["x-modelyard-cost"])]
    assert rows[0]["input_tokens"] == completion.usage.prompt_tokens


async def test_a_stream_ends_with_usage_when_asked(open_gateway: Gateway) -> None:
    client = openai_client(open_gateway)
    stream = await client.chat.completions.create(
        model="gpt-4o-mini",
        messages=HELLO,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]

    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert text
    assert reasons[-1] == "stop"
    assert reasons.count("stop") == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    assert not chunks[-1].choices  # the usage chunk has no choices
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens > 0


async def test_a_stream_without_usage_has_none(open_gateway: Gateway) -> None:
    stream = await openai_client(open_gateway).chat.completions.create(
        model="gpt-4o-mini", messages=HELLO, stream=True
    )
    chunks = [chunk async for chunk in stream]
    assert chunks
    assert all(c.usage is None and c.choices for c in chunks)


async def test_tool_calls_come_back(open_gateway: Gateway) -> None:
    tool = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
    completion = await openai_client(open_gateway).chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "weather in Paris?"}],
        tools=[tool],  # type: ignore[list-item]
        tool_choice="required",
    )
    calls = completion.choices[0].message.tool_calls
    assert completion.choices[0].finish_reason == "tool_calls"
    assert calls
    assert calls[0].function.name == "get_weather"
    json.loads(calls[0].function.arguments)  # type: ignore[union-attr]


async def test_a_json_schema_answer_is_json(open_gateway: Gateway) -> None:
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}},
        "required": ["name"],
    }
    completion = await openai_client(open_gateway).chat.completions.create(
        model="gpt-4o-mini",
        messages=HELLO,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "person", "schema": schema, "strict": True},
        },
    )
    answer = json.loads(completion.choices[0].message.content or "")
    assert isinstance(answer, dict)
    assert isinstance(answer["name"], str)


async def test_an_empty_message_list_is_a_bad_request_naming_it(open_gateway: Gateway) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await openai_client(open_gateway).chat.completions.create(model="gpt-4o-mini", messages=[])
    assert caught.value.status_code == 400
    assert caught.value.param == "messages"  # type: ignore[attr-defined]


async def test_a_wrong_type_is_a_bad_request_naming_the_field(open_gateway: Gateway) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await openai_client(open_gateway).chat.completions.create(
            model="gpt-4o-mini",
            messages=HELLO,
            temperature="hot",  # type: ignore[arg-type]
        )
    assert caught.value.param == "temperature"  # type: ignore[attr-defined]
    assert "Expected `float" in caught.value.message


async def test_invalid_json_is_a_400_and_nothing_reaches_a_provider(
    open_gateway: Gateway, fake: FakeControl
) -> None:
    before = len(await fake.requests())
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{open_gateway.url}/v1/chat/completions", data=b"{not json") as response,
    ):
        body = await response.json()
    assert response.status == 400
    assert body["error"]["type"] == "invalid_request_error"
    assert "not valid JSON" in body["error"]["message"]
    assert len(await fake.requests()) == before


async def test_an_unknown_model_is_not_found(open_gateway: Gateway) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        await openai_client(open_gateway).chat.completions.create(
            model="no-such-model", messages=HELLO
        )
    assert "no-such-model" in caught.value.message


async def test_exhausted_deployments_are_a_bad_gateway(open_gateway: Gateway) -> None:
    # `badkey`'s only deployment holds a key the provider refuses.
    with pytest.raises(openai.InternalServerError) as caught:
        await openai_client(open_gateway).chat.completions.create(model="badkey", messages=HELLO)
    assert caught.value.status_code == 502


async def test_a_deadline_already_gone_is_a_gateway_timeout(open_gateway: Gateway) -> None:
    client = openai_client(open_gateway)
    with pytest.raises(openai.APIStatusError) as caught:
        await client.chat.completions.create(
            model="gpt-4o-mini",
            messages=HELLO,
            extra_headers={"x-modelyard-timeout": "0.000001"},
        )
    assert caught.value.status_code == 504


async def test_a_body_over_the_limit_is_413(guarded_gateway: Gateway) -> None:
    client = openai_client(guarded_gateway, await issue_key(guarded_gateway.config))
    with pytest.raises(openai.APIStatusError) as caught:
        await client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "x" * BODY_LIMIT}]
        )
    assert caught.value.status_code == 413


async def test_an_unknown_key_is_unauthorized(guarded_gateway: Gateway) -> None:
    with pytest.raises(openai.AuthenticationError) as caught:
        await openai_client(guarded_gateway, "my-" + "x" * 32).chat.completions.create(
            model="gpt-4o-mini", messages=HELLO
        )
    assert "not a key this gateway issued" in caught.value.message


async def test_an_unapproved_model_is_forbidden(guarded_gateway: Gateway) -> None:
    client = openai_client(guarded_gateway, await issue_key(guarded_gateway.config))
    with pytest.raises(openai.PermissionDeniedError) as caught:
        await client.chat.completions.create(model="priced", messages=HELLO)
    assert "modelyard models approve priced" in caught.value.message


async def test_a_model_the_key_may_not_use_is_forbidden(guarded_gateway: Gateway) -> None:
    await approve(guarded_gateway.config, "gpt-4o-mini", "via-anthropic")
    key = await issue_key(guarded_gateway.config, allowed_models=["via-anthropic"])
    with pytest.raises(openai.PermissionDeniedError) as caught:
        await openai_client(guarded_gateway, key).chat.completions.create(
            model="gpt-4o-mini", messages=HELLO
        )
    assert "may not use 'gpt-4o-mini'" in caught.value.message


async def test_models_lists_what_the_key_may_use(guarded_gateway: Gateway) -> None:
    await approve(guarded_gateway.config, "gpt-4o-mini", "via-anthropic")
    key = await issue_key(guarded_gateway.config, allowed_models=["via-anthropic", "priced"])
    client = openai_client(guarded_gateway, key)
    await asyncio.sleep(0.3)  # the approval cache

    listed = [model.id async for model in client.models.list()]
    assert listed == ["via-anthropic"]  # `priced` is allowed but never approved
    assert (await client.models.retrieve("via-anthropic")).id == "via-anthropic"
    with pytest.raises(openai.NotFoundError):
        await client.models.retrieve("gpt-4o-mini")


async def test_a_key_over_its_rate_limit_is_told_when_to_come_back(
    guarded_gateway: Gateway,
) -> None:
    await approve(guarded_gateway.config, "gpt-4o-mini")
    client = openai_client(guarded_gateway, await issue_key(guarded_gateway.config, rpm=1))
    await client.chat.completions.create(model="gpt-4o-mini", messages=HELLO)
    with pytest.raises(openai.RateLimitError) as caught:
        await client.chat.completions.create(model="gpt-4o-mini", messages=HELLO)
    assert int(caught.value.response.headers["retry-after"]) >= 1


async def test_a_spent_budget_is_a_rate_limit_naming_the_budget(guarded_gateway: Gateway) -> None:
    config = guarded_gateway.config
    await approve(config, "priced")
    conn = await connect(config.database_url)
    try:
        issued = await keys.create(conn, team="gw-budget")
        await budgets.set_budget(
            conn, "key", issued.record.id, period="none", limit=Decimal("0.000001")
        )
    finally:
        await conn.close()
    await asyncio.sleep(0.3)  # the budget cache
    with pytest.raises(openai.RateLimitError) as caught:
        await openai_client(guarded_gateway, issued.secret).chat.completions.create(
            model="priced", messages=HELLO, max_tokens=100
        )
    assert "budget" in caught.value.message
    assert caught.value.response.headers["retry-after"]


# --- Anthropic's API ----------------------------------------------------------


@pytest.mark.parametrize("model", ["gpt-4o-mini", "via-anthropic"])
async def test_messages_are_answered_by_any_provider(open_gateway: Gateway, model: str) -> None:
    client = anthropic_client(open_gateway)
    message = await client.messages.create(
        model=model,
        max_tokens=100,
        system="be brief",
        messages=[{"role": "user", "content": "hello gateway"}],
    )
    assert message.type == "message"
    assert message.role == "assistant"
    assert message.content[0].type == "text"
    assert message.content[0].text
    assert message.stop_reason == "end_turn"
    assert message.usage.output_tokens > 0


@pytest.mark.parametrize("model", ["gpt-4o-mini", "via-anthropic"])
async def test_messages_stream_as_anthropic_events(open_gateway: Gateway, model: str) -> None:
    client = anthropic_client(open_gateway)
    async with client.messages.stream(
        model=model, max_tokens=100, messages=[{"role": "user", "content": "hello gateway"}]
    ) as stream:
        kinds = [event.type async for event in stream]
        final = await stream.get_final_message()

    assert kinds[0] == "message_start"
    assert kinds[-1] == "message_stop"
    assert "content_block_delta" in kinds
    assert final.content[0].type == "text"
    assert final.content[0].text
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens > 0


async def test_messages_tool_use_round_trip(open_gateway: Gateway) -> None:
    client = anthropic_client(open_gateway)
    tools = [
        {
            "name": "get_weather",
            "description": "weather for a city",
            "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
        }
    ]
    first = await client.messages.create(
        model="gpt-4o-mini",
        max_tokens=100,
        tools=tools,  # type: ignore[arg-type]
        tool_choice={"type": "any"},
        messages=[{"role": "user", "content": "weather in Paris?"}],
    )
    use = first.content[-1]
    assert first.stop_reason == "tool_use"
    assert use.type == "tool_use"
    assert isinstance(use.input, dict)
    second = await client.messages.create(
        model="gpt-4o-mini",
        max_tokens=100,
        tools=tools,  # type: ignore[arg-type]
        messages=[
            {"role": "user", "content": "weather in Paris?"},
            {"role": "assistant", "content": [use.model_dump()]},  # type: ignore[list-item]
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "sunny"}],
            },
        ],
    )
    assert second.content[0].type == "text"


async def test_messages_errors_come_in_anthropics_shape(guarded_gateway: Gateway) -> None:
    with pytest.raises(anthropic.AuthenticationError):
        await anthropic_client(guarded_gateway, "my-" + "y" * 32).messages.create(
            model="gpt-4o-mini", max_tokens=10, messages=[{"role": "user", "content": "hi"}]
        )
    client = anthropic_client(guarded_gateway, await issue_key(guarded_gateway.config))
    with pytest.raises(anthropic.BadRequestError) as caught:
        await client.messages.create(
            model="gpt-4o-mini",
            max_tokens=10,
            messages=[{"role": "user", "content": [{"type": "video", "url": "x"}]}],  # type: ignore[list-item]
        )
    assert caught.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    assert "messages[0].content" in caught.value.message
    with pytest.raises(anthropic.NotFoundError):
        await client.messages.create(
            model="no-such-model", max_tokens=10, messages=[{"role": "user", "content": "hi"}]
        )


# --- operations -----------------------------------------------------------------


async def test_health_readiness_metrics_and_the_openapi_document(open_gateway: Gateway) -> None:
    await openai_client(open_gateway).chat.completions.create(model="fast", messages=HELLO)
    async with aiohttp.ClientSession(open_gateway.url) as session:
        async with session.get("/healthz") as alive:
            assert alive.status == 200
        async with session.get("/readyz") as ready:
            report = await ready.json()
        async with session.get("/metrics") as scraped:
            metrics = await scraped.text()
        async with session.get("/openapi.json") as described:
            document = await described.json()

    assert ready.status == 200
    assert report["checks"] == {"broker": "ok", "database": "ok", "topology": "ok"}
    assert (
        'modelyard_http_requests_total{model="gpt-4o-mini",route="/v1/chat/completions",'
        'status="200"}' in metrics
    )
    assert "modelyard_http_request_duration_seconds_bucket" in metrics
    assert 'modelyard_tokens_total{direction="output",model="fast"}' in metrics
    assert {"/v1/chat/completions", "/v1/messages", "/v1/models"} <= set(document["paths"])
    assert "ChatRequest" in document["components"]["schemas"]


async def test_a_client_leaving_mid_stream_leaves_nothing_waiting(
    open_gateway: Gateway, fake: FakeControl
) -> None:
    await fake.set(stream_gap_ms=50)
    try:
        async with aiohttp.ClientSession() as session:
            response = await session.post(
                f"{open_gateway.url}/v1/chat/completions",
                json={"model": "gpt-4o-mini", "messages": HELLO, "stream": True},
            )
            job_id = response.headers["x-request-id"]
            await response.content.readline()  # the first event
            response.close()
        waiting = await eventually(
            lambda: _async(open_gateway.inbox.waiting()), lambda n: n == 0, timeout=30
        )
        rows = await eventually(
            lambda: ledger_rows(open_gateway.config.database_url, "job_id = $1", job_id),
            lambda r: len(r) == 1,
            timeout=30,
        )
    finally:
        await fake.set(stream_gap_ms=0)  # settings are merged: put it back
    assert waiting == 0
    assert len(rows) == 1  # what the provider billed is in the ledger


async def _async(value: int) -> int:
    return value


async def _job_waiting_on(config: Config, queue: str) -> Any:
    """The job a gateway put on a pool queue nobody consumes (taken off it)."""
    connection = await broker.connect(config.broker_url, "test-stand-in-worker")
    try:
        channel = await connection.channel()
        source = await channel.get_queue(queue)
        message = await eventually(lambda: source.get(fail=False), lambda m: m is not None)
        assert message is not None
        await message.ack()
        return decode_job(message.body)
    finally:
        await connection.close()


async def _as_a_worker(config: Config, job: Any, *replies: Any) -> None:
    """Publish what a worker would, on the job's reply queue."""
    connection = await broker.connect(config.broker_url, "test-stand-in-worker")
    try:
        facade = broker.Broker(connection)
        for reply in replies:
            await facade.reply(job.reply_to, encode(reply), correlation_id=job.id)
        await facade.close()
    finally:
        await connection.close()


async def test_a_stream_run_again_after_chunks_went_out_ends_in_an_error(
    open_gateway: Gateway,
) -> None:
    # Nothing consumes the `crash` pool here: a stand-in worker answers.
    async with aiohttp.ClientSession() as session:
        call = asyncio.ensure_future(
            session.post(
                f"{open_gateway.url}/v1/chat/completions",
                json={"model": "crash", "messages": HELLO, "stream": True},
            )
        )
        job = await _job_waiting_on(open_gateway.config, "worker.crash")
        first = StreamChunk(job_id=job.id, seq=0, content="Hel")
        again = StreamChunk(job_id=job.id, seq=0, content="Hel", redelivered=True)
        await _as_a_worker(open_gateway.config, job, first, again)
        response = await call
        events = (await response.read()).decode().strip().split("\n\n")

    assert json.loads(events[0].removeprefix("data: "))["choices"][0]["delta"]["content"] == "Hel"
    error = json.loads(events[-1].removeprefix("data: "))["error"]
    assert "cannot be taken back" in error["message"]
    assert len(events) == 2  # no [DONE]: the stream ended in an error


async def test_a_stream_run_again_before_any_chunk_went_out_is_served(
    open_gateway: Gateway,
) -> None:
    client = openai_client(open_gateway)
    call = asyncio.ensure_future(
        client.chat.completions.create(model="crash", messages=HELLO, stream=True)
    )
    job = await _job_waiting_on(open_gateway.config, "worker.crash")
    again = StreamChunk(job_id=job.id, seq=0, content="Hello", redelivered=True)
    done = StreamChunk(job_id=job.id, seq=1, finish_reason="stop", redelivered=True)
    result = JobResult(
        job_id=job.id,
        status="ok",
        response=Completion(id="c", model="gpt-4o-mini", content="Hello"),
        redelivered=True,
    )
    await _as_a_worker(open_gateway.config, job, again, done, result)
    chunks = [chunk async for chunk in await call]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Hello"
    assert chunks[-1].choices[0].finish_reason == "stop"


# --- the Batch API --------------------------------------------------------------


def batch_file(lines: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


def chat_line(custom_id: str, text: str, model: str = "gpt-4o-mini") -> dict[str, Any]:
    body = {"model": model, "messages": [{"role": "user", "content": text}]}
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}


async def finished(client: openai.AsyncOpenAI, batch_id: str, timeout: float = 60) -> Any:
    return await eventually(
        lambda: client.batches.retrieve(batch_id),
        lambda b: b.status in ("completed", "failed", "cancelled"),
        timeout=timeout,
    )


async def test_a_batch_runs_on_the_batch_lane_and_every_line_is_answered(
    open_gateway: Gateway,
) -> None:
    client = openai_client(open_gateway)
    lines = [chat_line(f"q-{i}", f"question {i}") for i in range(40)]
    lines.append(chat_line("bad", "x", model="no-such-model"))
    lines.append({"custom_id": "broken", "method": "POST", "url": "/v1/chat/completions"})
    uploaded = await client.files.create(file=("in.jsonl", batch_file(lines)), purpose="batch")
    assert (await client.files.retrieve(uploaded.id)).bytes == len(batch_file(lines))
    batch = await client.batches.create(
        input_file_id=uploaded.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"run": "nightly"},
    )
    assert batch.status == "validating"

    done = await finished(client, batch.id)
    assert done.status == "completed"
    assert done.request_counts is not None
    assert (done.request_counts.total, done.request_counts.completed) == (42, 40)
    assert done.request_counts.failed == 2
    assert done.metadata == {"run": "nightly"}
    output = (await client.files.content(done.output_file_id or "")).content
    errors = (await client.files.content(done.error_file_id or "")).content
    answered = [json.loads(line) for line in output.splitlines()]
    assert [a["custom_id"] for a in answered] == [f"q-{i}" for i in range(40)]
    assert all(a["response"]["status_code"] == 200 for a in answered)
    failed = {json.loads(line)["custom_id"]: json.loads(line) for line in errors.splitlines()}
    assert set(failed) == {"bad", "broken"}
    assert failed["bad"]["response"]["status_code"] == 404
    rows = await eventually(
        lambda: ledger_rows(open_gateway.config.database_url, "batch_id = $1", batch.id),
        lambda r: len(r) == 40,
    )
    cost = Decimal((done.model_extra or {})["modelyard"]["cost"])
    assert len(rows) == 40
    assert cost == sum(r["cost"] for r in rows) > 0
    assert {r["custom_id"] for r in rows} == {f"q-{i}" for i in range(40)}
    listed = await client.batches.list(limit=5)
    assert batch.id in [b.id for b in listed.data]


async def test_files_and_batches_belong_to_their_key(guarded_gateway: Gateway) -> None:
    await approve(guarded_gateway.config, "gpt-4o-mini")
    mine = openai_client(guarded_gateway, await issue_key(guarded_gateway.config))
    theirs = openai_client(guarded_gateway, await issue_key(guarded_gateway.config))
    uploaded = await mine.files.create(
        file=("in.jsonl", batch_file([chat_line("only", "hi")])), purpose="batch"
    )
    with pytest.raises(openai.NotFoundError):
        await theirs.files.retrieve(uploaded.id)
    with pytest.raises(openai.NotFoundError):
        await theirs.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
    batch = await mine.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    assert (await finished(mine, batch.id)).status == "completed"
    with pytest.raises(openai.NotFoundError):
        await theirs.batches.retrieve(batch.id)
    assert (await mine.files.delete(uploaded.id)).deleted
    with pytest.raises(openai.NotFoundError):
        await mine.files.retrieve(uploaded.id)


async def test_a_rotated_key_keeps_its_files_and_batches(guarded_gateway: Gateway) -> None:
    config = guarded_gateway.config
    await approve(config, "gpt-4o-mini")
    conn = await connect(config.database_url)
    try:
        first = await keys.create(conn, team="gw-team")
        old = openai_client(guarded_gateway, first.secret)
        uploaded = await old.files.create(
            file=("in.jsonl", batch_file([chat_line("one", "hi")])), purpose="batch"
        )
        batch = await old.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        second = await keys.rotate(conn, first.record.id, grace_s=60)
        assert second is not None
        third = await keys.rotate(conn, second.record.id)  # the second one stops at once
        assert third is not None
    finally:
        await conn.close()
    new = openai_client(guarded_gateway, third.secret)
    assert (await finished(new, batch.id)).status == "completed"
    assert (await new.files.retrieve(uploaded.id)).id == uploaded.id
    assert batch.id in [b.id for b in (await new.batches.list()).data]
    assert (await old.batches.retrieve(batch.id)).status == "completed"  # still in its grace
    with pytest.raises(openai.AuthenticationError):
        await openai_client(guarded_gateway, second.secret).files.retrieve(uploaded.id)


async def test_a_file_that_is_not_a_batch_fails_it(open_gateway: Gateway) -> None:
    client = openai_client(open_gateway)
    lines = [chat_line("same", "one"), chat_line("same", "two")]
    uploaded = await client.files.create(file=("in.jsonl", batch_file(lines)), purpose="batch")
    batch = await client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    done = await finished(client, batch.id)
    assert done.status == "failed"
    assert done.errors is not None
    assert done.errors.data
    assert "custom_id 'same' appears more than once" in (done.errors.data[0].message or "")


async def test_a_cancelled_batch_sends_no_more_lines(
    open_gateway: Gateway, fake: FakeControl
) -> None:
    client = openai_client(open_gateway)
    await fake.set(latency_ms=200)
    try:
        lines = [chat_line(f"c-{i}", f"slow {i}") for i in range(3000)]
        uploaded = await client.files.create(file=("in.jsonl", batch_file(lines)), purpose="batch")
        batch = await client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        await eventually(
            lambda: client.batches.retrieve(batch.id),
            lambda b: b.status == "in_progress" and (b.request_counts.completed or 0) > 0,  # type: ignore[union-attr]
        )
        cancelling = await client.batches.cancel(batch.id)
        assert cancelling.status == "cancelling"
        done = await finished(client, batch.id, timeout=120)
    finally:
        await fake.set(latency_ms=0)  # settings are merged: put it back
    assert done.status == "cancelled"
    assert done.request_counts is not None
    assert done.request_counts.completed < 3000
    assert done.request_counts.completed + done.request_counts.failed == 3000
    errors = (await client.files.content(done.error_file_id or "")).content.splitlines()
    assert all(json.loads(e)["error"]["code"] == "batch_cancelled" for e in errors)


# --- the admin API --------------------------------------------------------------

MASTER = "master-" + "k" * 24


async def admin_call(
    gateway: Gateway, method: str, path: str, body: Any = None, key: str = MASTER
) -> tuple[int, Any]:
    headers = {"authorization": f"Bearer {key}"}
    async with (
        aiohttp.ClientSession(gateway.url, headers=headers) as session,
        session.request(method, path, json=body) as response,
    ):
        return response.status, await response.json()


async def test_the_admin_api_manages_keys_approvals_and_budgets(
    guarded_gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MODELYARD_MASTER_KEY", MASTER)
    status, made = await admin_call(
        guarded_gateway, "POST", "/admin/keys", {"team": "admin-made", "models": ["via-openai"]}
    )
    assert status == 200
    key_id, secret = made["data"][0]["id"], made["data"][0]["secret"]
    status, _ = await admin_call(
        guarded_gateway, "POST", "/admin/models/via-openai/approve", {"by": "ops", "note": "ok"}
    )
    assert status == 200
    status, budget = await admin_call(
        guarded_gateway, "PUT", f"/admin/budgets/key/{key_id}", {"limit": "5", "period": "daily"}
    )
    assert status == 200
    assert Decimal(budget["data"][0]["limit"]) == 5
    await asyncio.sleep(0.3)  # the admission caches

    client = openai_client(guarded_gateway, secret)
    raw = await client.chat.completions.with_raw_response.create(model="via-openai", messages=HELLO)
    # What the budget had left once this request's worst case was reserved.
    left = Decimal(raw.headers["x-modelyard-budget-remaining"])
    assert 0 < left < 5
    _, shown = await eventually(
        lambda: admin_call(guarded_gateway, "GET", f"/admin/budgets/key/{key_id}"),
        lambda answer: Decimal(answer[1]["data"][0]["spent"]) > 0,
    )
    assert Decimal(shown["data"][0]["spent"]) > 0  # the call's cost, settled by the ledger
    status, listed = await admin_call(guarded_gateway, "GET", "/admin/keys")
    assert key_id in [row["id"] for row in listed["data"]]
    assert all("secret" not in row for row in listed["data"])
    status, models = await admin_call(guarded_gateway, "GET", "/admin/models")
    row = next(r for r in models["data"] if r["model"] == "via-openai")
    assert (row["approved"], row["by"], row["note"]) == (True, "ops", "ok")

    status, _ = await admin_call(guarded_gateway, "POST", f"/admin/keys/{key_id}/revoke")
    assert status == 200
    await asyncio.sleep(0.3)
    with pytest.raises(openai.AuthenticationError):
        await client.chat.completions.create(model="via-openai", messages=HELLO)
    status, gone = await admin_call(guarded_gateway, "POST", f"/admin/keys/{key_id}/revoke")
    assert status == 404
    assert "no live key" in gone["error"]["message"]


async def test_the_admin_api_needs_the_master_key(
    guarded_gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MODELYARD_MASTER_KEY", raising=False)
    status, off = await admin_call(guarded_gateway, "GET", "/admin/keys")
    assert status == 403
    assert "MODELYARD_MASTER_KEY" in off["error"]["message"]
    monkeypatch.setenv("MODELYARD_MASTER_KEY", MASTER)
    status, _ = await admin_call(guarded_gateway, "GET", "/admin/keys", key="not-it")
    assert status == 401
    status, bad = await admin_call(guarded_gateway, "PUT", "/admin/budgets/team/x", {"limit": 5})
    assert status == 400
    assert "period" in bad["error"]["message"] or "limit" in bad["error"]["message"]


async def test_readiness_fails_when_the_database_is_unreachable(open_gateway: Gateway) -> None:
    readiness = Readiness()
    readiness.add("database", database_check(f"postgresql://127.0.0.1:{free_port()}/nowhere"))
    readiness.started = True
    ready, report = await readiness.report()
    assert not ready
    assert report["database"].startswith("unreachable")


async def test_a_batch_past_its_window_closes_expired(
    open_gateway: Gateway, fake: FakeControl
) -> None:
    client = openai_client(open_gateway)
    await fake.set(latency_ms=300)
    try:
        lines = [chat_line(f"e-{i}", f"late {i}") for i in range(200)]
        uploaded = await client.files.create(file=("in.jsonl", batch_file(lines)), purpose="batch")
        batch = await client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        await eventually(
            lambda: client.batches.retrieve(batch.id), lambda b: b.status == "in_progress"
        )
        conn = await connect(open_gateway.config.database_url)
        try:  # as if a day had gone by
            await conn.execute("UPDATE batches SET expires_at = now() WHERE id = $1", batch.id)
        finally:
            await conn.close()
        done = await finished(client, batch.id)
    finally:
        await fake.set(latency_ms=0)  # settings are merged: put it back
    assert done.status == "expired"
    assert done.expired_at is not None
    assert done.request_counts is not None
    assert done.request_counts.completed + done.request_counts.failed == 200
    assert done.request_counts.failed > 0
    errors = (await client.files.content(done.error_file_id or "")).content.splitlines()
    assert {json.loads(e)["error"]["code"] for e in errors} == {"batch_expired"}


async def test_a_batch_under_a_tight_budget_holds_lines_until_room_comes_back(
    guarded_gateway: Gateway,
) -> None:
    config = guarded_gateway.config
    await approve(config, "priced")
    line = chat_line("x", "a question of a few words", model="priced")
    line["body"]["max_tokens"] = 100
    request = ChatRequest(
        model="priced",
        messages=[Message(role="user", content="a question of a few words")],
        max_tokens=100,
    )
    tokens = token_bound(request, image_tokens=3000, max_output=4096)
    worst = estimated_cost(price_card(config.deployments["priced"]), *tokens)
    assert worst is not None
    conn = await connect(config.database_url)
    try:
        issued = await keys.create(conn, team="gw-tight")
        # Room for three lines' worst case at once; six lines cost less than that in all.
        await budgets.set_budget(
            conn, "key", issued.record.id, period="none", limit=worst * Decimal("3.5")
        )
    finally:
        await conn.close()
    await asyncio.sleep(0.3)  # the budget cache
    client = openai_client(guarded_gateway, issued.secret)
    lines = [{**line, "custom_id": f"t-{i}"} for i in range(6)]
    uploaded = await client.files.create(file=("in.jsonl", batch_file(lines)), purpose="batch")
    batch = await client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    done = await finished(client, batch.id)
    assert done.status == "completed"
    assert done.request_counts is not None
    assert (done.request_counts.completed, done.request_counts.failed) == (6, 0)


async def test_an_image_in_a_message_reaches_the_provider(open_gateway: Gateway) -> None:
    pixel = (
        "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4nGNgYGD4"
        "DwABBAEAghvTiAAAAABJRU5ErkJggg=="
    )
    completion = await openai_client(open_gateway).chat.completions.create(
        model="gpt-4o-mini",
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "what is this?"},
                    {"type": "image_url", "image_url": {"url": pixel, "detail": "low"}},
                ],
            }
        ],
    )
    assert completion.choices[0].message.content
    assert completion.usage is not None
    assert completion.usage.prompt_tokens > 3  # the image is counted


async def test_a_client_leaving_mid_request_leaves_nothing_waiting(
    open_gateway: Gateway, fake: FakeControl
) -> None:
    await fake.set(latency_ms=3000)
    try:
        async with aiohttp.ClientSession() as session:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.3):
                    await session.post(
                        f"{open_gateway.url}/v1/chat/completions",
                        json={"model": "gpt-4o-mini", "messages": HELLO},
                    )
        # Forgotten at once, long before the provider's answer (3 s) comes.
        waiting = await eventually(
            lambda: _async(open_gateway.inbox.waiting()), lambda n: n == 0, timeout=1.5
        )
    finally:
        await fake.set(latency_ms=0)  # settings are merged: put it back
    assert waiting == 0
