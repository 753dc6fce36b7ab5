"""Crash safety: SIGKILL a worker or the ledger mid-batch and restart it.

Each test runs the components as separate processes against its own vhost and
database, so the only state that survives a kill is the broker's and the
database's: exactly what production relies on.
"""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import pytest
import pytest_asyncio
import yaml

from modelyard.client import Client, new_job
from modelyard.topology import RETRY_QUEUE_PREFIX
from schemas.chat import Message
from schemas.codec import decode_reply
from schemas.jobs import CompletionJob, Lane
from schemas.results import JobResult, unpack
from tests.conftest import FAKE_KEY, FakeControl
from tests.pipeline import eventually, scalar
from tests.services import (
    config_document,
    fake_provider,
    fresh_database,
    fresh_vhost,
    modelyard,
    write_config,
)

pytestmark = pytest.mark.asyncio

JOBS = 2000
RESULTS = "crash-results"
CONCURRENCY = 16  # the crash pool's concurrency in the test config


class Stack:
    """Router, worker and ledger processes on one isolated vhost and database."""

    def __init__(self, config: Path, broker_url: str, database_url: str, logs: Path) -> None:
        self.config, self.broker_url, self.database_url, self.logs = (
            config,
            broker_url,
            database_url,
            logs,
        )
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, role: str) -> None:
        args = ["worker", "--pool", "crash"] if role == "worker" else [role]
        self.processes[role] = modelyard(
            "--config", str(self.config), *args, log=self.logs / f"{role}.log"
        )

    def kill(self, role: str) -> None:
        process = self.processes.pop(role)
        process.send_signal(signal.SIGKILL)
        process.wait(10)

    def stop_all(self) -> None:
        for process in self.processes.values():
            process.terminate()
        for process in self.processes.values():
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)


@contextmanager
def isolated_stack(tmp_path: Path, fake_port: int, **settings: Any) -> Iterator[Stack]:
    with fresh_vhost() as broker_url, fresh_database() as database_url:
        doc = config_document(
            broker_url,
            database_url,
            fake_port,
            ledger={"batch_size": 50, "flush_ms": 10},
            **settings,
        )
        s = Stack(
            write_config(tmp_path / "modelyard.yaml", doc), broker_url, database_url, tmp_path
        )
        try:
            yield s
        finally:
            s.stop_all()


@pytest.fixture
def stack(tmp_path: Path, fake_port: int) -> Iterator[Stack]:
    with isolated_stack(tmp_path, fake_port) as s:
        yield s


@pytest.fixture
def slow_router_stack(tmp_path: Path, fake_port: int) -> Iterator[Stack]:
    """A router that takes its time (two messages at a time, each outgoing
    batch waiting 100 ms to fill), so a kill lands mid-routing."""
    with isolated_stack(
        tmp_path,
        fake_port,
        router={"concurrency": 2},
        batch_lane={"max_jobs": 500, "linger_ms": 100},
    ) as s:
        yield s


@pytest_asyncio.fixture
async def slow_fake(fake: FakeControl) -> AsyncIterator[FakeControl]:
    """The fake with some latency, so a kill lands with calls in flight."""
    await fake.clear()
    await fake.set(latency_ms=15)
    yield fake
    await fake.set(latency_ms=0)


def crash_jobs(count: int, label: str, lane: Lane = "batch") -> list[CompletionJob]:
    """Jobs for the crash pool, each with a prompt of its own."""
    return [
        new_job("crash", [Message(role="user", content=f"{label} {i}")], priority=lane)
        for i in range(count)
    ]


async def submit_batch(
    stack: Stack, lane: Lane = "batch", count: int = JOBS, label: str = "crash job"
) -> list[str]:
    """Queue `count` jobs for the results queue; their ids."""
    jobs = crash_jobs(count, label, lane)
    async with await Client.connect(stack.broker_url) as client:
        await client.declare_results_queue(RESULTS)
        await client.submit_many(jobs, RESULTS)
    return [j.id for j in jobs]


async def collect(
    stack: Stack, expected: set[str], on_progress: Any, timeout: float = 180
) -> list[JobResult]:
    """Every result message (duplicates included) until each expected id has one."""
    results: list[JobResult] = []
    seen: set[str] = set()
    connection = await aio_pika.connect(stack.broker_url)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=500)
        queue = await channel.get_queue(RESULTS)
        async with asyncio.timeout(timeout):
            async with queue.iterator() as messages:
                async for message in messages:
                    await message.ack()
                    for reply in unpack(decode_reply(message.body)):
                        assert isinstance(reply, JobResult)
                        results.append(reply)
                        seen.add(reply.job_id)
                    on_progress(len(seen))
                    if seen >= expected:
                        break
        await asyncio.sleep(1.0)  # stragglers: late duplicates must be marked too
        while (extra := await queue.get(fail=False)) is not None:
            await extra.ack()
            results.extend(unpack(decode_reply(extra.body)))  # type: ignore[arg-type]
    return results


async def billed_calls(fake: FakeControl) -> dict[str, dict[str, Any]]:
    """The fake provider's successful calls (what a real provider would bill)."""
    return {
        e["request_id"]: e for e in await fake.requests() if e["status"] == 200 and not e["fault"]
    }


async def waiting_in(stack: Stack, queue: str) -> int:
    """Messages ready in a queue (not yet delivered to any consumer)."""
    async with await aio_pika.connect(stack.broker_url) as connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        return declared.declaration_result.message_count or 0


async def refusals(fake: FakeControl) -> int:
    """Requests the fake refused with a 429."""
    return sum(1 for call in await fake.requests() if call["status"] == 429)


async def ledger_request_ids(database_url: str) -> list[str]:
    conn_rows = await scalar(database_url, "SELECT array_agg(provider_request_id) FROM ledger")
    return list(conn_rows or [])


@pytest.mark.parametrize("lane", ["batch", "interactive"])
async def test_worker_sigkill_mid_batch_loses_nothing(
    stack: Stack, slow_fake: FakeControl, lane: Lane
) -> None:
    for role in ("router", "ledger", "worker"):
        stack.start(role)
    ids = await submit_batch(stack, lane)
    killed = False

    def progress(done: int) -> None:
        nonlocal killed
        if not killed and done >= JOBS // 4:
            killed = True
            stack.kill("worker")
            stack.start("worker")

    results = await collect(stack, set(ids), progress)

    assert killed
    per_job = Counter(r.job_id for r in results)
    assert set(per_job) == set(ids)
    # At most one result per job is unmarked; every repeat says it may be one.
    unmarked = Counter(r.job_id for r in results if not r.redelivered)
    assert max(unmarked.values()) == 1
    assert all(r.status == "ok" for r in results)

    calls = await billed_calls(slow_fake)
    rows = await eventually(
        lambda: ledger_request_ids(stack.database_url), lambda r: len(r) >= len(calls) - CONCURRENCY
    )
    await asyncio.sleep(0.5)
    rows = await ledger_request_ids(stack.database_url)
    # Each ledger row is a distinct real provider call ...
    assert len(rows) == len(set(rows))
    assert set(rows) <= set(calls)
    # ... and only calls that were in flight inside the killed worker (billed
    # by the provider, never seen by us) can be missing.
    assert len(calls) - CONCURRENCY <= len(rows) <= len(calls)
    assert len(calls) >= JOBS


async def test_router_sigkill_mid_batch_loses_nothing(
    slow_router_stack: Stack, slow_fake: FakeControl
) -> None:
    """The router dies with jobs in hand: its unacked messages come back to
    the next router, and no job is lost or billed twice. (A job already
    dispatched when its message comes back runs twice, the repeat marked; the
    window for that is too narrow for this test to hit on purpose.)"""
    stack = slow_router_stack
    for role in ("ledger", "worker"):
        stack.start(role)
    ids = await submit_batch(stack)  # queued on router.jobs, no router yet
    stack.start("router")
    routed = await eventually(
        lambda: scalar(stack.database_url, "SELECT count(*) FROM ledger"),
        lambda n: n >= 32,
        timeout=60,
    )
    assert routed >= 32
    assert await waiting_in(stack, "router.jobs") > 0  # the kill lands mid-routing
    stack.kill("router")
    stack.start("router")

    results = await collect(stack, set(ids), lambda _: None)

    assert {r.job_id for r in results} == set(ids)
    unmarked = Counter(r.job_id for r in results if not r.redelivered)
    assert max(unmarked.values()) == 1
    calls = await billed_calls(slow_fake)
    rows = await eventually(
        lambda: ledger_request_ids(stack.database_url), lambda r: len(r) >= len(calls)
    )
    assert sorted(rows) == sorted(calls)  # every billed call once, repeats included
    assert len(calls) >= JOBS


async def test_ledger_sigkill_counts_every_event_once(stack: Stack, slow_fake: FakeControl) -> None:
    for role in ("router", "ledger", "worker"):
        stack.start(role)
    ids = await submit_batch(stack)
    written = await eventually(
        lambda: scalar(stack.database_url, "SELECT count(*) FROM ledger"),
        lambda n: n >= 300,
        timeout=60,
    )
    assert written >= 300
    stack.kill("ledger")
    await asyncio.sleep(0.5)  # events pile up unacked-then-requeued while it is down
    stack.start("ledger")

    results = await collect(stack, set(ids), lambda _: None)
    assert {r.job_id for r in results} == set(ids)

    calls = await billed_calls(slow_fake)
    rows = await eventually(
        lambda: ledger_request_ids(stack.database_url), lambda r: len(r) >= len(calls)
    )
    assert sorted(rows) == sorted(calls)  # none missing, none twice
    rollup = await scalar(stack.database_url, "SELECT sum(calls) FROM ledger_daily")
    assert rollup == len(calls)
    ledger_cost = await scalar(stack.database_url, "SELECT sum(cost) FROM ledger")
    rollup_cost = await scalar(stack.database_url, "SELECT sum(cost) FROM ledger_daily")
    assert ledger_cost == rollup_cost


MANY = 20_000


@pytest.fixture
def mixing_router_stack(tmp_path: Path, fake_port: int) -> Iterator[Stack]:
    """A router whose outgoing batches mix jobs of many incoming messages, so
    that at any moment some messages are partly dispatched: a kill then
    always leaves jobs that were dispatched already to be routed again."""
    with isolated_stack(tmp_path, fake_port, batch_lane={"max_jobs": 500, "linger_ms": 50}) as s:
        yield s


async def test_router_killed_twice_sends_no_batch_job_to_the_provider_twice(
    mixing_router_stack: Stack, fake: FakeControl
) -> None:
    """Each kill leaves the router's unacked messages to the next router,
    which dispatches their jobs again (marked); the workers' claims keep the
    repeats of jobs already dispatched from reaching the provider."""
    stack = mixing_router_stack
    await fake.clear()
    for role in ("ledger", "worker"):
        stack.start(role)
    # All queued before any router runs.
    ids = set(await submit_batch(stack, count=MANY, label="twice"))
    # At least two kills, each with messages still to route; more (up to
    # six) only while no kill has yet caught a job already dispatched, which
    # depends on where in its cycle the router was.
    kills = 0
    while kills < 2 or (kills < 6 and not skipped_repeats(stack)):
        stack.start("router")
        await eventually(lambda: waiting_in(stack, "router.jobs"), lambda n: n < MANY // 64 - 8)
        await asyncio.sleep(0.5)
        if await waiting_in(stack, "router.jobs") == 0:
            break
        stack.kill("router")
        kills += 1
    stack.start("router")

    results = await collect(stack, ids, lambda _: None, timeout=300)

    assert kills >= 2  # the kills landed with messages still to route
    assert {r.job_id for r in results} == ids
    unmarked = Counter(r.job_id for r in results if not r.redelivered)
    assert max(unmarked.values()) == 1
    calls = [e for e in await fake.requests() if e["status"] == 200]
    prompts = Counter(call["prompt_digest"] for call in calls)
    assert len(prompts) == MANY
    assert prompts.most_common(1)[0][1] == 1  # no job reached the provider twice
    assert await scalar(stack.database_url, "SELECT count(*) FROM job_claims") == MANY
    # The kills did make repeats, and the workers left them out.
    assert skipped_repeats(stack) > 0


def skipped_repeats(stack: Stack) -> int:
    """Jobs the worker logged as repeats it did not run."""
    log = stack.logs / "worker.log"
    lines = log.read_text().splitlines() if log.exists() else []
    # Read while the worker writes: a line may be cut short, so no JSON parse.
    return sum(
        int(found[1])
        for line in lines
        if "router repeats of claimed jobs not run" in line or "not run again" in line
        if (found := re.search(r'"jobs": (\d+)', line))
    )


@pytest.fixture
def flaky_fake_port(tmp_path: Path) -> Iterator[int]:
    """A fake provider of this test's own, to inject faults into."""
    with fake_provider(FAKE_KEY, tmp_path / "flaky.log") as port:
        yield port


WAITING = 300
RETRY_AFTER_S = 4.0


@pytest.fixture
def retrying_stack(tmp_path: Path, flaky_fake_port: int) -> Iterator[Stack]:
    """The crash pool on a fake of its own; one retry for a 429."""
    with isolated_stack(tmp_path, flaky_fake_port) as stack:
        doc = yaml.safe_load(stack.config.read_text())
        doc["models"]["crash"]["retry"] = {"retries": {"rate_limited": 1}}
        write_config(stack.config, doc)
        yield stack


async def test_jobs_waiting_in_retry_delays_survive_router_and_worker_kills(
    retrying_stack: Stack, flaky_fake_port: int
) -> None:
    """Every job gets a 429 asking for a 4 s wait; while they wait in the
    broker's retry ladder the router and the worker are SIGKILLed and
    restarted. Every job is then answered once, and no retry reached the
    provider before its 4 s were up."""
    stack = retrying_stack
    async with aiohttp.ClientSession() as session:
        flaky = FakeControl(session, flaky_fake_port)
        await flaky.set(rate_429=1.0, retry_after_s=RETRY_AFTER_S)
        for role in ("ledger", "worker", "router"):
            stack.start(role)
        ids = set(await submit_batch(stack, count=WAITING, label="wait"))
        refused = await eventually(lambda: refusals(flaky), lambda n: n >= WAITING, timeout=60)
        # Refused jobs wait for company (at most 50 ms) and travel to the
        # delay in batches: a moment later every one of them is in the broker.
        await asyncio.sleep(0.5)
        waiting = await waiting_in(stack, f"{RETRY_QUEUE_PREFIX}4000")
        await flaky.set(rate_429=0.0)  # the provider recovers while they wait
        stack.kill("router")
        stack.kill("worker")
        await asyncio.sleep(0.5)
        stack.start("worker")
        stack.start("router")

        results = await collect(stack, ids, lambda _: None, timeout=120)
        calls = await flaky.requests()

    assert refused == WAITING
    assert waiting >= 1  # messages holding every job were in the broker's delay when the kills came
    assert {r.job_id for r in results} == ids
    assert all(r.status == "ok" for r in results)
    unmarked = Counter(r.job_id for r in results if not r.redelivered)
    assert max(unmarked.values()) == 1
    by_prompt: dict[str, list[dict[str, Any]]] = {}
    for call in calls:
        by_prompt.setdefault(call["prompt_digest"], []).append(call)
    assert len(by_prompt) == WAITING
    for tries in by_prompt.values():
        tries.sort(key=lambda c: c["received_at"])
        assert [c["status"] for c in tries] == [429, 200]  # none lost, none twice
        assert tries[1]["received_at"] - tries[0]["received_at"] >= RETRY_AFTER_S  # none early
    rows = await eventually(
        lambda: ledger_request_ids(stack.database_url), lambda r: len(r) >= WAITING
    )
    assert sorted(rows) == sorted(c["request_id"] for c in calls if c["status"] == 200)
