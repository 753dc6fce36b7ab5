"""A deployment's limits hold across worker processes: three workers at RPM
600 for a minute of more work than that, and the provider's own request
log never shows more than 600 calls in any 60 seconds; three workers under
a cap of 4 concurrent calls never have a fifth in flight."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from modelyard.client import Client, new_job
from schemas.chat import Message
from tests.conftest import FakeControl
from tests.services import (
    Processes,
    config_document,
    fake_deployment,
    fresh_database,
    fresh_vhost,
    write_config,
)

pytestmark = pytest.mark.asyncio

RPM = 600
WATCH_S = 65.0
CAP = 4
LATENCY_S = 0.4


@pytest.fixture
def three_workers(tmp_path: Path, own_fake_port: int) -> Iterator[tuple[Processes, str]]:
    with fresh_vhost() as broker_url, fresh_database() as database_url:
        doc = config_document(broker_url, database_url, own_fake_port, log_level="info")
        doc["deployments"]["limited"] = fake_deployment(own_fake_port, rpm=RPM)
        doc["deployments"]["capped"] = {
            **doc["deployments"]["limited"],
            "rpm": None,
            "max_concurrent": CAP,
        }
        doc["models"]["limited"] = {"deployments": [{"deployment": "limited"}]}
        doc["models"]["capped"] = {"deployments": [{"deployment": "capped"}]}
        processes = Processes(write_config(tmp_path / "modelyard.yaml", doc), tmp_path)
        try:
            processes.start("ledger", "ledger")
            processes.start("router", "router")
            for n in (1, 2, 3):
                processes.start(f"worker-{n}", "worker", "--pool", "main")
            for name in ("ledger", "router", "worker-1", "worker-2", "worker-3"):
                processes.wait_for(name, f"{name.split('-')[0]} started")
            yield processes, broker_url
        finally:
            processes.stop()


def busiest_minute(times: list[float]) -> int:
    """The most calls in any 60-second span."""
    times = sorted(times)
    most, start = 0, 0
    for end, at in enumerate(times):
        while at - times[start] >= 60.0:
            start += 1
        most = max(most, end - start + 1)
    return most


async def test_three_workers_share_one_rpm_limit(
    three_workers: tuple[Processes, str], own_fake_port: int
) -> None:
    _, broker_url = three_workers
    jobs = [
        new_job("limited", [Message(role="user", content=f"n {i}")], priority="batch")
        for i in range(2 * RPM)
    ]
    async with await Client.connect(broker_url) as client:
        await client.declare_results_queue("limited")
        await client.submit_many(jobs, "limited")
        answered = 0
        started = time.monotonic()
        with contextlib.suppress(TimeoutError):
            async with (
                asyncio.timeout(WATCH_S),
                contextlib.aclosing(client.results("limited")) as results,
            ):
                async for _ in results:
                    answered += 1
        elapsed = time.monotonic() - started
    async with aiohttp.ClientSession() as session:
        calls = await FakeControl(session, own_fake_port).requests()

    times = [call["received_at"] for call in calls]  # as the provider counts
    assert elapsed >= WATCH_S - 1  # more work than the limit allows in the time
    assert answered < len(jobs)
    assert busiest_minute(times) <= RPM
    assert busiest_minute(times) >= RPM * 0.75  # and the limit is used, not starved
    assert answered == len(calls)


def most_in_flight(ends: list[float], duration_s: float) -> int:
    """The most calls in flight at once, each taking `duration_s` up to its end."""
    events = sorted([(end - duration_s, 1) for end in ends] + [(end, -1) for end in ends])
    most = current = 0
    for _, change in events:
        current += change
        most = max(most, current)
    return most


async def test_three_workers_share_one_concurrency_cap(
    three_workers: tuple[Processes, str], own_fake_port: int
) -> None:
    _, broker_url = three_workers
    count = 10 * CAP
    async with aiohttp.ClientSession() as session:
        fake = FakeControl(session, own_fake_port)
        await fake.set(latency_ms=LATENCY_S * 1000)
        async with await Client.connect(broker_url) as client:
            answers = await asyncio.gather(
                *(
                    client.complete(
                        new_job("capped", [Message(role="user", content=f"c {i}")]), timeout=60
                    )
                    for i in range(count)
                )
            )
        calls = await fake.requests()

    ends = sorted(call["at"] for call in calls)
    assert all(a.status == "ok" for a in answers)
    assert len(ends) == count
    # Each call took the fake's latency; the earliest a call can end is then
    # its start plus that, so these spans are inside the real ones.
    assert most_in_flight(ends, LATENCY_S * 0.95) <= CAP
    # Forty calls four at a time cannot end sooner than nine latencies apart.
    assert ends[-1] - ends[0] >= (count / CAP - 1) * LATENCY_S * 0.95
