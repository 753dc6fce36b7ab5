"""Retries held by the broker, and fallback chains, end to end.

Two fake providers: `flaky` (faults injected per test) and the session's
well-behaved one. Deployments on the flaky one fall back to deployments on
the other.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from typing import Any

import aiohttp
import anthropic
import asyncpg
import openai
import pytest
import pytest_asyncio

from gateway.service import Gateway
from modelyard import broker, deadletters
from modelyard.client import Client, new_job
from modelyard.config import Config, parse
from router import keys
from schemas.chat import Message
from schemas.errors import ErrorKind
from schemas.jobs import CompletionJob
from schemas.results import JobResult, StreamChunk
from tests.conftest import FAKE_KEY, FakeControl
from tests.pipeline import eventually, in_process, ledger_rows
from tests.services import (
    fake_deployment,
    fake_provider,
    fresh_database,
    fresh_vhost,
)
from workers.providers import PROVIDERS

pytestmark = pytest.mark.asyncio(loop_scope="session")

CALM = {
    "rate_429": 0,
    "rate_500": 0,
    "rate_503": 0,
    "retry_after_s": 1.0,
    "context_window": 128_000,
}


@pytest.fixture(scope="module")
def flaky_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    with fake_provider(FAKE_KEY, tmp_path_factory.mktemp("flaky") / "flaky.log") as port:
        yield port


@pytest_asyncio.fixture(loop_scope="session")
async def flaky(flaky_port: int) -> AsyncIterator[FakeControl]:
    async with aiohttp.ClientSession() as session:
        control = FakeControl(session, flaky_port)
        await control.clear()
        yield control
        await control.set(**CALM)


def one(name: str, **extra: Any) -> dict[str, Any]:
    return {"deployments": [{"deployment": name}], **extra}


QUICK = {"retries": {"rate_limited": 2, "server_error": 0}, "backoff_s": 0.25, "jitter": 0}


@pytest.fixture(scope="module")
def retry_config(fake_port: int, flaky_port: int) -> Iterator[Config]:
    with fresh_vhost() as broker_url, fresh_database() as database_url:
        doc = {
            "broker_url": broker_url,
            "database_url": database_url,
            "log_level": "warning",
            "pools": {"main": {"concurrency": 16}},
            "ledger": {"batch_size": 50, "flush_ms": 10},
            # Each test here injects its own faults: no cooldown may carry
            # one test's faults into the next (cooldowns: tests/test_health.py).
            "health": {"honour_retry_after": False, "min_calls": 1_000_000},
            "deployments": {
                "flaky": fake_deployment(flaky_port),
                "steady": fake_deployment(fake_port),
                "second-opinion": fake_deployment(fake_port),
                "reasoner": fake_deployment(flaky_port, model="o3-mini"),
            },
            "models": {
                "chain": one(
                    "flaky",
                    fallbacks=["steady-model"],
                    context_window_fallbacks=["steady-model"],
                    content_policy_fallbacks=["second-model"],
                    retry=QUICK,
                ),
                "steady-model": one("steady"),
                "second-model": one("second-opinion"),
                "picky": one("reasoner", fallbacks=["steady-model"], retry=QUICK),
                "lonely": one("flaky", retry={"retries": {"overloaded": 1}, "backoff_s": 0.25}),
            },
        }
        yield parse(doc, {}, PROVIDERS)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def retry_client(retry_config: Config) -> AsyncIterator[Client]:
    async with in_process(retry_config, "test-retries") as client:
        yield client


def ask(model: str, text: str = "Tell me about retries.", **kwargs: Any) -> CompletionJob:
    return new_job(model, [Message(role="user", content=text)], **kwargs)


def path(result: JobResult) -> list[tuple[str, str]]:
    """Each attempt: the deployment and how it went."""
    return [(a.deployment, a.error.value if a.error else a.outcome) for a in result.attempts]


async def billed_rows(config: Config, job_id: str, count: int) -> list[dict[str, Any]]:
    await eventually(
        lambda: ledger_rows(config.database_url, "job_id = $1", job_id), lambda r: len(r) >= count
    )
    await asyncio.sleep(0.3)  # a second row would be a double count
    return await ledger_rows(config.database_url, "job_id = $1", job_id)


async def test_a_429_storm_is_retried_no_sooner_than_asked_then_falls_back(
    retry_client: Client, retry_config: Config, flaky: FakeControl
) -> None:
    await flaky.set(rate_429=1.0, retry_after_s=1.0)
    result = await retry_client.complete(ask("chain"), timeout=60)

    assert result.status == "ok"
    assert path(result) == [
        ("flaky", "rate_limited"),
        ("flaky", "rate_limited"),
        ("flaky", "rate_limited"),
        ("steady", "ok"),
    ]
    tries = sorted(e["received_at"] for e in await flaky.requests())
    assert len(tries) == 3
    assert min(b - a for a, b in pairwise(tries)) >= 1.0
    assert [a.billed for a in result.attempts] == [False, False, False, True]
    rows = await billed_rows(retry_config, result.job_id, 1)
    assert [r["deployment"] for r in rows] == ["steady"]


async def test_a_500_is_served_by_the_next_deployment(
    retry_client: Client, retry_config: Config, flaky: FakeControl
) -> None:
    await flaky.set(rate_500=1.0)
    result = await retry_client.complete(ask("chain"), timeout=30)

    assert result.status == "ok"
    assert path(result) == [("flaky", "server_error"), ("steady", "ok")]
    rows = await billed_rows(retry_config, result.job_id, 1)
    assert [(r["deployment"], r["cost"] == result.cost) for r in rows] == [("steady", True)]


async def test_a_prompt_too_long_moves_to_the_larger_model(
    retry_client: Client, flaky: FakeControl
) -> None:
    await flaky.set(context_window=20)
    result = await retry_client.complete(ask("chain", "word " * 200), timeout=30)

    assert result.status == "ok"
    assert path(result) == [("flaky", "context_window_exceeded"), ("steady", "ok")]


async def test_a_content_policy_refusal_follows_its_own_chain(
    retry_client: Client, flaky: FakeControl
) -> None:
    result = await retry_client.complete(ask("chain", "say forbidden-content"), timeout=30)

    assert result.status == "error"
    assert result.error is not None
    assert result.error.kind == ErrorKind.CONTENT_POLICY
    # Its own chain, never the ordinary fallback (`steady`), and then the answer.
    assert path(result) == [("flaky", "content_policy"), ("second-opinion", "content_policy")]


async def test_a_bad_request_is_neither_retried_nor_moved(
    retry_client: Client, flaky: FakeControl
) -> None:
    await flaky.clear()
    result = await retry_client.complete(ask("picky", max_tokens=10), timeout=30)

    assert result.error is not None
    assert result.error.kind == ErrorKind.BAD_REQUEST
    assert path(result) == [("reasoner", "bad_request")]
    assert len(await flaky.requests()) == 1


async def test_a_retry_that_would_pass_the_deadline_is_answered_at_once(
    retry_client: Client, flaky: FakeControl
) -> None:
    await flaky.set(rate_429=1.0, retry_after_s=5.0)
    deadline = datetime.now(UTC) + timedelta(seconds=3)
    result = await retry_client.complete(ask("chain", deadline=deadline), timeout=30)

    assert result.error is not None
    assert result.error.kind == ErrorKind.DEADLINE_EXCEEDED
    assert "rate_limited" in result.error.message
    assert len(await flaky.requests()) == 1  # and nothing later: it was never sent again
    await asyncio.sleep(1)
    assert len(await flaky.requests()) == 1


async def test_a_job_past_its_deadline_while_waiting_is_never_sent(
    retry_client: Client, flaky: FakeControl
) -> None:
    """A retry in the broker outlives the job's deadline when the provider's
    own answer took long: the router answers it, the provider sees nothing."""
    await flaky.set(rate_429=1.0, retry_after_s=0.25, latency_ms=1500)
    deadline = datetime.now(UTC) + timedelta(seconds=1.7)
    result = await retry_client.complete(ask("chain", deadline=deadline), timeout=30)
    await flaky.set(latency_ms=0)

    assert result.error is not None
    assert result.error.kind == ErrorKind.DEADLINE_EXCEEDED
    assert len(await flaky.requests()) == 1


async def test_on_the_batch_lane_one_jobs_retry_never_reruns_its_neighbours(
    retry_client: Client, retry_config: Config, flaky: FakeControl, fake: FakeControl
) -> None:
    await fake.clear()
    await flaky.set(rate_500=0.5, seed=3)
    queue = f"retries-{time.time_ns()}"
    await retry_client.declare_results_queue(queue)
    jobs = [ask("chain", f"batch job {i}", priority="batch") for i in range(40)]
    await retry_client.submit_many(jobs, queue)
    results: dict[str, JobResult] = {}
    async with asyncio.timeout(60):
        async for result in retry_client.results(queue):
            results[result.job_id] = result
            if len(results) == len(jobs):
                break
    await retry_client.delete_queue(queue)

    assert all(r.status == "ok" for r in results.values())
    moved = [r for r in results.values() if len(r.attempts) == 2]
    assert 0 < len(moved) < len(jobs)  # some failed over, most did not
    answered = [
        e["prompt_digest"]
        for e in [*await flaky.requests(), *await fake.requests()]
        if e["status"] == 200
    ]
    assert len(answered) == len(jobs)
    assert Counter(answered).most_common(1)[0][1] == 1  # each job answered by one call
    events = await billed_rows_for(retry_config, [j.id for j in jobs])
    assert len(events) == len(jobs)


async def billed_rows_for(config: Config, ids: list[str]) -> list[dict[str, Any]]:
    await eventually(
        lambda: ledger_rows(config.database_url, "job_id = ANY($1)", ids),
        lambda r: len(r) >= len(ids),
    )
    await asyncio.sleep(0.3)  # a second row for a job would be a double count
    return await ledger_rows(config.database_url, "job_id = ANY($1)", ids)


async def test_over_http_a_model_whose_deployments_are_all_overloaded_is_a_503(
    retry_client: Client, retry_config: Config, flaky: FakeControl
) -> None:
    """Through the gateway: OpenAI's 503 and Anthropic's 529, once the
    overloaded deployment's retry is spent, and nothing billed."""
    await flaky.set(rate_503=1.0)
    connection = await broker.connect(retry_config.broker_url, "test-retries-gateway")
    gateway = Gateway(retry_config, connection, port=0)
    await gateway.start()
    try:
        async with openai.AsyncOpenAI(
            base_url=f"{gateway.url}/v1", api_key="sk-any", max_retries=0
        ) as client:
            with pytest.raises(openai.InternalServerError) as caught:
                await client.chat.completions.create(
                    model="lonely", messages=[{"role": "user", "content": "anyone there?"}]
                )
        async with anthropic.AsyncAnthropic(
            base_url=gateway.url, api_key="sk-any", max_retries=0
        ) as claude:
            with pytest.raises(anthropic.OverloadedError) as overloaded:
                await claude.messages.create(
                    model="lonely",
                    max_tokens=50,
                    messages=[{"role": "user", "content": "anyone there?"}],
                )
    finally:
        await gateway.stop()
        await connection.close()
    assert caught.value.status_code == 503
    assert caught.value.response.headers["x-modelyard-attempts"] == "2"
    assert "overloaded" in caught.value.message
    assert overloaded.value.status_code == 529
    assert len(await flaky.requests()) == 4  # each request: the call and its one retry
    job_id = caught.value.response.headers["x-request-id"]
    assert await ledger_rows(retry_config.database_url, "job_id = $1", job_id) == []


async def test_a_batch_job_that_failed_for_good_is_parked_and_replayed_by_its_key_once_fixed(
    retry_client: Client, retry_config: Config, flaky: FakeControl
) -> None:
    """The job is answered with its error and a copy parked on the dead
    queue with the reason. Its key is rotated meanwhile; once the provider
    is healed, `dead replay` admits it again under the key that replaced
    its own, keeps its attempt history, and it is answered ok."""
    conn = await asyncpg.connect(retry_config.database_url)
    try:
        issued = await keys.create(conn, team="replayers")
        job = ask("lonely", "please work", priority="batch")
        job.api_key = issued.secret
        await flaky.set(rate_500=1.0)
        queue = f"final-{time.time_ns()}"
        await retry_client.declare_results_queue(queue)
        await retry_client.submit_many([job], queue)
        failed = await answer_on(retry_client, queue, job.id)
        connection = await broker.connect(retry_config.broker_url, "test-replay")
        parked = await eventually(
            lambda: deadletters.list_dead(connection),
            lambda letters: any(letter.key == job.id for letter in letters),
        )
        rotated = await keys.rotate(conn, issued.record.id)
        assert rotated is not None
        await flaky.set(rate_500=0)  # the fix
        replayed, _ = await deadletters.replay(
            connection, broker.Broker(connection), lambda letter: letter.key == job.id
        )
        # A new reader: a reader yields each job id once.
        answered = await answer_on(retry_client, queue, job.id, status="ok")
        left = await deadletters.list_dead(connection)
        await connection.close()
        await retry_client.delete_queue(queue)
    finally:
        await conn.close()
    assert failed.status == "error"
    assert failed.error is not None
    assert failed.error.kind == ErrorKind.SERVER_ERROR
    reason = next(letter.reason for letter in parked if letter.key == job.id)
    assert reason.startswith("final failure: server_error")
    assert replayed == [job.id]
    assert answered.error is None, answered.error
    assert (answered.job_id, answered.status) == (job.id, "ok")
    assert [a.outcome for a in answered.attempts] == [
        *(a.outcome for a in failed.attempts),
        "ok",
    ]
    assert job.id not in {letter.key for letter in left}
    rows = await billed_rows(retry_config, job.id, 1)
    assert [r["key_id"] for r in rows] == [rotated.record.id]


async def answer_on(client: Client, queue: str, job_id: str, status: str = "error") -> JobResult:
    """The first answer for `job_id` with `status` read off `queue`, and
    every message read acked (a reader acks a message when asked for more)."""
    found = None
    async with contextlib.aclosing(client.results(queue)) as results:
        with contextlib.suppress(TimeoutError):
            while True:
                async with asyncio.timeout(30 if found is None else 0.5):
                    result = await anext(results)
                if (result.job_id, result.status) == (job_id, status):
                    found = result
    if found is None:
        raise AssertionError(f"no {status} answer for {job_id}")
    return found


async def test_a_stream_that_failed_before_its_first_chunk_is_served_by_the_fallback(
    retry_client: Client, retry_config: Config, flaky: FakeControl, fake: FakeControl
) -> None:
    """A 500 before any chunk was sent: the stream is run again elsewhere,
    and the producer gets one clean stream, from the fallback."""
    await fake.clear()
    await flaky.set(rate_500=1.0)
    job = ask("chain", "stream me a story")
    items = [item async for item in retry_client.stream(job, timeout=20)]
    chunks = [i for i in items if isinstance(i, StreamChunk)]
    (result,) = [i for i in items if isinstance(i, JobResult)]
    assert result.status == "ok"
    assert path(result) == [("flaky", "server_error"), ("steady", "ok")]
    assert chunks
    assert [c.seq for c in chunks] == list(range(len(chunks)))
    assert not any(c.redelivered for c in chunks)
    assert [e["status"] for e in await fake.requests()] == [200]


async def test_a_jobs_own_fallback_list_is_followed_and_checked(
    retry_client: Client, flaky: FakeControl
) -> None:
    """`job.fallbacks` replaces its model's chain (allow_job_fallbacks is
    on by default); a name in it that is no model is refused, naming it."""
    await flaky.set(rate_500=1.0)
    job = ask("lonely", "with my own plan")
    job.fallbacks = ["second-model"]
    result = await retry_client.complete(job, timeout=20)
    assert result.status == "ok"
    assert [a.deployment for a in result.attempts][-1] == "second-opinion"
    assert {a.deployment for a in result.attempts[:-1]} == {"flaky"}

    wrong = ask("lonely", "with a bad plan")
    wrong.fallbacks = ["no-such-model"]
    refused = await retry_client.complete(wrong, timeout=20)
    assert refused.error is not None
    assert (refused.error.kind, refused.error.field) == (ErrorKind.INVALID_JOB, "$.fallbacks[0]")
    assert refused.attempts == []
