"""RabbitMQ restarted in the middle of a batch: every job answered, every
billed call in the ledger exactly once, and no process gives up.

The broker is shared by the whole test run (and by CI), so the test starts
it again in a `finally`, whatever happened, and waits until it answers.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from modelyard.client import Client, new_job
from schemas.chat import Message
from schemas.jobs import CompletionJob
from schemas.results import JobResult
from tests.conftest import FakeControl
from tests.pipeline import eventually
from tests.services import rabbitmqctl
from tests.test_crash import (
    Stack,
    billed_calls,
    crash_jobs,
    isolated_stack,
    ledger_request_ids,
)

pytestmark = pytest.mark.asyncio

JOBS = 2000
RESULTS = "restart-results"


def ask(text: str) -> CompletionJob:
    """An interactive job for the test's pool."""
    return new_job("crash", [Message(role="user", content=text)])


@pytest.fixture
def stack(tmp_path: Path, fake_port: int) -> Iterator[Stack]:
    with isolated_stack(tmp_path, fake_port) as s:
        yield s


@pytest_asyncio.fixture
async def paced_fake(fake: FakeControl) -> AsyncIterator[FakeControl]:
    """Calls that take a while, so the restart lands with calls in flight."""
    await fake.clear()
    await fake.set(latency_ms=30)
    yield fake
    await fake.set(latency_ms=0)


def start_broker() -> None:
    """Start the broker's application and wait until it answers."""
    rabbitmqctl("start_app")
    rabbitmqctl("await_startup")


async def test_a_broker_restart_mid_batch_loses_no_answer_and_no_billed_call(
    stack: Stack, paced_fake: FakeControl
) -> None:
    for role in ("ledger", "worker", "router"):
        stack.start(role)
    restarted, under_way = asyncio.Event(), asyncio.Event()
    results: list[JobResult] = []
    while_down: list[asyncio.Task[JobResult]] = []

    async with await Client.connect(stack.broker_url, "test-restart") as client:
        await client.declare_results_queue(RESULTS)
        jobs = crash_jobs(JOBS, "restart")
        await client.submit_many(jobs, RESULTS)
        ids = {job.id for job in jobs}

        async def restart_when_under_way() -> None:
            await under_way.wait()
            try:
                await asyncio.to_thread(rabbitmqctl, "stop_app")
                # A request/reply call made while the broker is away: its
                # submit waits for the broker, its answer comes after.
                while_down.append(asyncio.create_task(client.complete(ask("while down"), 120)))
                await asyncio.sleep(2)  # down long enough for every client to notice
            finally:
                await asyncio.to_thread(start_broker)
            restarted.set()

        restarter = asyncio.create_task(restart_when_under_way())
        try:
            async with asyncio.timeout(240):
                async with contextlib.aclosing(client.results(RESULTS)) as answers:
                    async for result in answers:
                        results.append(result)
                        if len(results) >= JOBS // 5:
                            under_way.set()
                        if {r.job_id for r in results} >= ids:
                            break
        finally:
            if not restarter.done():
                restarter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await restarter
        # The same client, its reply queue made before the restart, still
        # serves request/reply and streams.
        answered_while_down = [(await task).status for task in while_down]
        after = await client.complete(ask("after"), 30)
        streamed = [item async for item in client.stream(ask("streamed after"), 30)]

    assert answered_while_down == ["ok"]
    assert after.status == "ok"
    assert isinstance(streamed[-1], JobResult)
    assert streamed[-1].status == "ok"

    assert restarted.is_set()
    assert len(results) < JOBS * 2  # sanity: results() yields each job id once
    assert {r.job_id for r in results} == ids
    assert all(r.status == "ok" for r in results)
    assert {role: p.poll() for role, p in stack.processes.items()} == {
        "ledger": None,
        "worker": None,
        "router": None,
    }
    await assert_each_billed_call_once_in_the_ledger(stack, paced_fake, JOBS + 3)


async def assert_each_billed_call_once_in_the_ledger(
    stack: Stack, fake: FakeControl, expected: int
) -> None:
    """The ledger holds every call the provider billed, once, and no prompt
    reached the provider twice (answered jobs whose messages came back were
    not run again)."""
    calls = await billed_calls(fake)
    await eventually(
        lambda: ledger_request_ids(stack.database_url),
        lambda r: len(r) >= len(calls),
        timeout=60,
    )
    await asyncio.sleep(1.0)  # a late duplicate row would show up now
    rows = await ledger_request_ids(stack.database_url)
    assert sorted(rows) == sorted(calls)
    prompts = Counter(call["prompt_digest"] for call in calls.values())
    assert prompts.most_common(1)[0][1] == 1
    assert len(calls) == expected
