"""RabbitMQ restarted in the middle of a batch: every job answered, every
billed call in the ledger exactly once, and no process gives up.

The broker is shared by the whole test run (and by CI), so the test starts
it again in a `finally`, whatever happened, and waits until it answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from modelyard.client import Client, new_job
from schemas.chat import Message
from schemas.results import JobResult
from tests.conftest import FakeControl
from tests.pipeline import eventually
from tests.services import rabbitmqctl
from tests.test_crash import Stack, billed_calls, isolated_stack, ledger_request_ids

pytestmark = pytest.mark.asyncio

JOBS = 2000
RESULTS = "restart-results"


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


def restart_broker() -> None:
    """Stop and start the broker's application; it is started again and
    awaited whatever happens in between."""
    try:
        rabbitmqctl("stop_app")
        time.sleep(2)  # down long enough for every client to notice
    finally:
        rabbitmqctl("start_app")
        rabbitmqctl("await_startup")


async def test_a_broker_restart_mid_batch_loses_no_answer_and_no_billed_call(
    stack: Stack, paced_fake: FakeControl
) -> None:
    for role in ("ledger", "worker", "router"):
        stack.start(role)
    restarted, under_way = asyncio.Event(), asyncio.Event()
    results: list[JobResult] = []

    async with await Client.connect(stack.broker_url, "test-restart") as client:
        await client.declare_results_queue(RESULTS)
        jobs = [
            new_job("crash", [Message(role="user", content=f"restart {i}")], priority="batch")
            for i in range(JOBS)
        ]
        await client.submit_many(jobs, RESULTS)
        ids = {job.id for job in jobs}

        async def restart_when_under_way() -> None:
            await under_way.wait()
            await asyncio.to_thread(restart_broker)
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

    assert restarted.is_set()
    assert len(results) < JOBS * 2  # sanity: results() yields each job id once
    assert {r.job_id for r in results} == ids
    assert all(r.status == "ok" for r in results)
    assert {role: p.poll() for role, p in stack.processes.items()} == {
        "ledger": None,
        "worker": None,
        "router": None,
    }
    calls = await billed_calls(paced_fake)
    rows = await eventually(
        lambda: ledger_request_ids(stack.database_url),
        lambda r: len(r) >= len(calls),
        timeout=60,
    )
    await asyncio.sleep(1.0)  # a late duplicate row would show up now
    rows = await ledger_request_ids(stack.database_url)
    assert sorted(rows) == sorted(calls)  # every billed call once, none missing
    # Answered jobs whose messages came back were not run again: every
    # prompt reached the provider once.
    prompts = Counter(call["prompt_digest"] for call in calls.values())
    assert prompts.most_common(1)[0][1] == 1
    assert len(calls) == JOBS
