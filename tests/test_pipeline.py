"""End to end, in one process, on the real broker, database and fake provider:
job in, result back, cost in the ledger."""

from __future__ import annotations

import asyncio
import json
import re
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import aio_pika
import pytest

from modelyard import broker
from modelyard.client import Client, new_job
from modelyard.config import Config
from modelyard.prices import cost_of, price_card
from modelyard.topology import DEAD_QUEUE, JOBS_EXCHANGE
from schemas.chat import Message
from schemas.codec import decode_reply
from schemas.errors import ErrorKind
from schemas.jobs import Metadata
from schemas.results import JobResult, StreamChunk
from tests.conftest import FakeControl
from tests.pipeline import eventually, ledger_rows
from workers.pool import Worker
from workers.providers import PROVIDERS

pytestmark = pytest.mark.asyncio


def ask(model: str, text: str = "Say something deterministic.", **kwargs: object) -> object:
    return new_job(model, [Message(role="user", content=text)], **kwargs)  # type: ignore[arg-type]


async def test_job_result_and_ledger_row(
    client: Client, config: Config, database_url: str, fake: FakeControl
) -> None:
    job = new_job(
        "fast",  # an alias of gpt-4o-mini
        [Message(role="user", content="Tell me about queues.")],
        metadata=Metadata(team="search", project="ranker", user="u1", tags=["t"]),
    )
    result = await client.complete(job, timeout=10)

    assert (result.status, result.error) == ("ok", None)
    assert result.response is not None
    assert result.response.content
    assert result.usage is not None
    assert result.usage.input_tokens > 0
    assert (result.deployment, result.provider, result.model) == ("mini", "openai", "fast")
    assert result.cost == cost_of(result.usage, price_card(config.deployments["mini"]))
    assert [a.outcome for a in result.attempts] == ["ok"]
    assert result.rate_limits is not None  # the fake sends OpenAI's x-ratelimit-* headers
    assert result.rate_limits.limit_requests is not None

    rows = await eventually(lambda: ledger_rows(database_url, "job_id = $1", job.id), bool)
    assert len(rows) == 1
    row = rows[0]
    assert (row["team"], row["project"], row["user_id"]) == ("search", "ranker", "u1")
    assert (row["provider"], row["deployment"], row["model"]) == ("openai", "mini", "fast")
    assert row["cost"] == result.cost
    assert row["price_source"] == "genai-prices"
    assert row["input_tokens"] == result.usage.input_tokens
    assert row["output_tokens"] == result.usage.output_tokens
    logged = {e["request_id"] for e in await fake.requests()}
    assert row["provider_request_id"] in logged


async def test_price_override_arithmetic(client: Client, database_url: str) -> None:
    result = await client.complete(ask("priced"), timeout=10)

    assert result.status == "ok"
    assert result.usage is not None
    u = result.usage
    plain = u.input_tokens - u.cache_read_tokens
    expected = (
        Decimal(plain) * Decimal("1.25")
        + Decimal(u.cache_read_tokens) * Decimal("0.125")
        + Decimal(u.output_tokens) * Decimal(10)
    ) / Decimal(1_000_000)
    assert result.cost == expected
    rows = await eventually(lambda: ledger_rows(database_url, "job_id = $1", result.job_id), bool)
    assert [(r["cost"], r["price_source"]) for r in rows] == [(expected, "override")]


async def test_unknown_price_is_flagged_not_zero(client: Client, database_url: str) -> None:
    result = await client.complete(ask("unpriced"), timeout=10)

    assert result.status == "ok"
    assert result.cost is None
    rows = await eventually(lambda: ledger_rows(database_url, "job_id = $1", result.job_id), bool)
    assert [(r["cost"], r["price_source"]) for r in rows] == [(None, "unknown")]


async def test_unknown_model(client: Client, fake: FakeControl) -> None:
    before = len(await fake.requests())
    result = await client.complete(ask("no-such-model"), timeout=10)

    assert result.status == "error"
    assert result.error is not None
    assert (result.error.kind, result.error.retryable) == (ErrorKind.UNKNOWN_MODEL, False)
    assert result.error.field == "$.request.model"
    assert len(await fake.requests()) == before


async def test_provider_401_is_auth_and_not_retried(client: Client, fake: FakeControl) -> None:
    before = [e for e in await fake.requests() if e["status"] == 401]
    result = await client.complete(ask("badkey"), timeout=10)

    assert result.error is not None
    assert (result.error.kind, result.error.retryable, result.error.provider_status) == (
        ErrorKind.AUTH,
        False,
        401,
    )
    assert "not-the-key" not in result.error.message
    after = [e for e in await fake.requests() if e["status"] == 401]
    assert len(after) == len(before) + 1


async def test_deadline_already_passed(client: Client, fake: FakeControl) -> None:
    before = len(await fake.requests())
    job = ask("fast", deadline=datetime.now(UTC) - timedelta(seconds=1))
    result = await client.complete(job, timeout=10)  # type: ignore[arg-type]

    assert result.error is not None
    assert result.error.kind == ErrorKind.DEADLINE_EXCEEDED
    assert len(await fake.requests()) == before


async def _raw_submit(config: Config, body: bytes, reply_to: str | None) -> None:
    """Publish a body as a producer would; the correlation id is the job id, as
    `Client.submit` sets it, when the body names one."""
    connection = await aio_pika.connect(config.broker_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(JOBS_EXCHANGE)
        found = re.search(rb'"id": "([^"]+)"', body[:200])
        correlation_id = found[1].decode() if found else None
        message = aio_pika.Message(body, reply_to=reply_to, correlation_id=correlation_id)
        await exchange.publish(message, routing_key="job")


async def _replies(config: Config, bodies: list[bytes], wait: float = 1.0) -> list[JobResult]:
    """Submit raw bodies with a fresh reply queue; collect what comes back."""
    connection = await aio_pika.connect(config.broker_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(exclusive=True)
        for body in bodies:
            await _raw_submit(config, body, queue.name)
        got: list[JobResult] = []
        deadline = time.monotonic() + wait * 5
        while time.monotonic() < deadline and len(got) < len(bodies):
            message = await queue.get(fail=False)
            if message is None:
                await __import__("asyncio").sleep(0.05)
                continue
            await message.ack()
            reply = decode_reply(message.body)
            assert isinstance(reply, JobResult)
            got.append(reply)
        # Anything more arriving later would be a retry of a bad job.
        await __import__("asyncio").sleep(wait)
        while (extra := await queue.get(fail=False)) is not None:
            got.append(decode_reply(extra.body))  # type: ignore[arg-type]
        return got


def job_body(job_id: str, **request: object) -> bytes:
    """A raw job body, for bodies the typed client would refuse to build."""
    return json.dumps({"id": job_id, "request": {"model": "fast", **request}}).encode()


USER_X = [{"role": "user", "content": "x"}]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (job_body("bad-1", messages=[]), "$.request.messages"),
        (job_body("bad-2", messages=[{"role": "robot"}]), "$.request.messages[0].role"),
        (
            job_body("bad-3", messages=[{"role": "user", "content": 7}]),
            "$.request.messages[0].content",
        ),
        (job_body("bad-4", messages=USER_X, temperature=9), "$.request.temperature"),
        (b'{"id": "bad-5"}', "$"),
    ],
)
async def test_invalid_job_answered_once_and_not_run(
    config: Config, client: Client, fake: FakeControl, body: bytes, field: str
) -> None:
    before = len(await fake.requests())
    replies = await _replies(config, [body])

    assert [(r.status, r.error.kind if r.error else None) for r in replies] == [
        ("error", ErrorKind.INVALID_JOB)
    ]
    assert replies[0].error is not None
    assert replies[0].error.field == field
    assert replies[0].error.retryable is False
    assert len(await fake.requests()) == before


async def test_oversized_job_is_invalid(config: Config, client: Client) -> None:
    text = "x" * (config.router.max_job_bytes + 10)
    body = job_body("big-1", messages=[{"role": "user", "content": text}])
    replies = await _replies(config, [body])

    assert len(replies) == 1
    assert replies[0].error is not None
    assert replies[0].error.kind == ErrorKind.INVALID_JOB
    assert "limit" in replies[0].error.message


async def test_unanswerable_garbage_is_dead_lettered(config: Config, client: Client) -> None:
    connection = await aio_pika.connect(config.broker_url)
    async with connection:
        channel = await connection.channel()
        dead = await channel.declare_queue(DEAD_QUEUE, passive=True)
        before = dead.declaration_result.message_count
        await _raw_submit(config, b"\x00 not json at all", None)

        async def count() -> int:
            q = await channel.declare_queue(DEAD_QUEUE, passive=True)
            return int(q.declaration_result.message_count or 0)

        assert await eventually(count, lambda n: n > (before or 0), timeout=10) == (before or 0) + 1


async def test_streamed_job_chunks_then_result_then_ledger(
    client: Client, database_url: str
) -> None:
    prompt = "Stream a short answer about ledgers."
    plain = await client.complete(ask("fast", prompt), timeout=10)
    items = [item async for item in client.stream(ask("fast", prompt), timeout=10)]  # type: ignore[arg-type]

    chunks = [i for i in items if isinstance(i, StreamChunk)]
    final = items[-1]
    assert isinstance(final, JobResult)
    assert final.status == "ok"
    assert final.response is not None
    assert plain.response is not None
    assert [c.seq for c in chunks] == list(range(len(chunks)))
    assert (
        "".join(c.content or "" for c in chunks) == final.response.content == plain.response.content
    )
    assert chunks[-1].finish_reason == "stop"
    assert final.usage == plain.usage
    rows = await eventually(lambda: ledger_rows(database_url, "job_id = $1", final.job_id), bool)
    assert [r["cost"] for r in rows] == [final.cost]


async def test_stream_broken_midway_ends_with_typed_error(
    client: Client, fake: FakeControl
) -> None:
    await fake.set(rate_malformed=1.0)
    try:
        items = [i async for i in client.stream(ask("fast", "break me"), timeout=10)]  # type: ignore[arg-type]
    finally:
        await fake.set(rate_malformed=0.0)

    final = items[-1]
    assert isinstance(final, JobResult)
    assert final.error is not None
    assert (final.status, final.error.kind, final.error.retryable) == (
        "error",
        ErrorKind.SERVER_ERROR,
        True,
    )


async def test_worker_stop_lets_calls_in_flight_finish(
    config: Config, client: Client, fake: FakeControl
) -> None:
    connection = await broker.connect(config.broker_url, "test-stopping-worker")
    worker = Worker(config, "crash", connection)  # the only consumer of the crash pool
    await worker.start()
    await fake.set(latency_ms=300)
    try:
        jobs = [ask("crash", f"in flight {i}") for i in range(8)]
        pending = [asyncio.create_task(client.complete(j, timeout=10)) for j in jobs]  # type: ignore[arg-type]
        await asyncio.sleep(0.15)  # the provider calls are now under way inside the worker
        await worker.stop()
        results = await asyncio.gather(*pending)
    finally:
        await fake.set(latency_ms=0)
        await connection.close()

    assert [(r.status, r.redelivered) for r in results] == [("ok", False)] * 8


async def test_a_bug_in_translation_is_answered_not_retried(
    client: Client, fake: FakeControl, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*_: object) -> object:
        raise RuntimeError("adapter bug")

    # Not a mock of the broker or the database: a deliberately broken adapter.
    monkeypatch.setattr(PROVIDERS["openai"], "build_request", broken)
    before = len(await fake.requests())

    result = await client.complete(ask("fast", "trip the bug"), timeout=10)  # type: ignore[arg-type]

    assert result.error is not None
    assert (result.error.kind, result.redelivered) == (ErrorKind.SERVER_ERROR, False)
    assert "RuntimeError" in result.error.message
    assert len(await fake.requests()) == before


async def test_a_stream_longer_than_its_cap_ends_in_timeout(
    client: Client, fake: FakeControl
) -> None:
    await fake.set(stream_gap_ms=100)  # pings keep the socket busy; the answer never ends in time
    try:
        items = [
            i
            async for i in client.stream(ask("short-stream", "a long story please"), timeout=10)  # type: ignore[arg-type]
        ]
    finally:
        await fake.set(stream_gap_ms=0)

    final = items[-1]
    assert isinstance(final, JobResult)
    assert final.error is not None
    assert (final.error.kind, final.error.retryable) == (ErrorKind.TIMEOUT, True)
    assert "0.3s" in final.error.message
    assert 1 <= len(items) - 1 <= 5  # some chunks arrived before the cut


async def test_chunks_of_a_redelivered_stream_are_marked(config: Config, client: Client) -> None:
    """A job whose first delivery was not acked (a worker died) streams again,
    and every chunk of the new attempt says so."""
    reply_queue = await client.inbox.queue()
    job = ask("crash", "stream after a crash")
    job.request.stream = True  # type: ignore[attr-defined]
    chunks = client.inbox.expect_stream(job.id)
    connection = await broker.connect(config.broker_url, "test-dying-worker")
    try:
        await client.submit(job, reply_queue)  # type: ignore[arg-type]
        channel = await connection.channel()
        queue = await channel.get_queue("worker.crash")
        first = await eventually(lambda: queue.get(fail=False), lambda m: m is not None)
        assert first is not None
        await first.nack(requeue=True)  # as if the worker holding it had died
        worker = Worker(config, "crash", connection)
        await worker.start()
        items = []
        while not isinstance(item := await asyncio.wait_for(chunks.get(), 10), JobResult):
            items.append(item)
        await worker.stop()
    finally:
        client.inbox.forget(job.id)
        await connection.close()

    assert item.redelivered is True
    assert items
    assert all(isinstance(c, StreamChunk) and c.redelivered for c in items)
    assert [c.seq for c in items] == list(range(len(items)))  # type: ignore[attr-defined]
