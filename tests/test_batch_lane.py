"""The batch lane end to end, on the real broker, database and fake provider:
many jobs per message in, each answered once, interactive work first."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator

import aio_pika
import msgspec
import pytest
import pytest_asyncio

from modelyard import broker
from modelyard.client import Client, new_job
from modelyard.config import Config
from modelyard.topology import DEAD_QUEUE, JOBS_EXCHANGE, ROUTER_QUEUE, build_topology
from router.service import Router
from schemas.chat import Message
from schemas.codec import decode_reply, encode, encode_job_batch
from schemas.errors import ErrorKind
from schemas.jobs import JOB_BATCH_TYPE, CompletionJob, Lane
from schemas.results import JobResult, unpack
from tests.conftest import FakeControl
from tests.pipeline import eventually, ledger_rows
from tests.services import fresh_vhost
from workers.pool import Worker

pytestmark = pytest.mark.asyncio


def job(text: str, lane: Lane = "batch", model: str = "fast") -> CompletionJob:
    return new_job(model, [Message(role="user", content=text)], priority=lane)


@pytest_asyncio.fixture
async def results_queue(client: Client) -> AsyncIterator[str]:
    name = f"lane-results-{uuid.uuid4().hex[:8]}"
    await client.declare_results_queue(name)
    yield name
    await client.delete_queue(name)


async def collect(client: Client, queue: str, count: int) -> list[JobResult]:
    """The first result of each job from `queue`, until `count` jobs have one."""
    got: list[JobResult] = []
    async with contextlib.aclosing(client.results(queue)) as results:
        async with asyncio.timeout(30):
            async for result in results:
                got.append(result)
                if len(got) == count:
                    break
    return got


async def read_messages(config: Config, queue: str, results: int) -> list[list[JobResult]]:
    """Raw reply messages (each as the results it carried) until `results` arrived,
    then anything late (a retry would show up here)."""
    messages: list[list[JobResult]] = []
    connection = await aio_pika.connect(config.broker_url)
    async with connection:
        channel = await connection.channel()
        source = await channel.get_queue(queue)
        async with asyncio.timeout(20), source.iterator() as incoming:
            async for message in incoming:
                await message.ack()
                messages.append(
                    [r for r in unpack(decode_reply(message.body)) if isinstance(r, JobResult)]
                )
                if sum(map(len, messages)) >= results:
                    break
        await asyncio.sleep(0.5)
        while (late := await source.get(fail=False)) is not None:
            await late.ack()
            messages.append(
                [r for r in unpack(decode_reply(late.body)) if isinstance(r, JobResult)]
            )
    return messages


async def test_each_job_of_a_batch_is_judged_alone_and_answered_once(
    config: Config, client: Client, fake: FakeControl, database_url: str, results_queue: str
) -> None:
    tag = uuid.uuid4().hex[:8]
    before = len(await fake.requests())
    good = [job(f"batch {tag} {i}") for i in range(40)]
    quick = job(f"interactive {tag}", lane="interactive")
    unknown = job(f"unknown {tag}", model="no-such-model")
    invalid = {"id": f"bad-{tag}", "request": {"model": "fast", "messages": []}}
    for j in (*good, quick, unknown):
        j.reply_to = results_queue
    body = (
        b'{"jobs":['
        + b",".join([*map(encode, (*good, quick, unknown)), json.dumps(invalid).encode()])
        + b"]}"
    )
    connection = await aio_pika.connect(config.broker_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(JOBS_EXCHANGE)
        message = aio_pika.Message(body, type=JOB_BATCH_TYPE, reply_to=results_queue)
        await exchange.publish(message, routing_key="job", mandatory=True)

    messages = await read_messages(config, results_queue, len(good) + 3)
    by_id: dict[str, list[JobResult]] = {}
    for result in (r for m in messages for r in m):
        by_id.setdefault(result.job_id, []).append(result)

    assert set(by_id) == {j.id for j in (*good, quick, unknown)} | {invalid["id"]}
    assert all(len(answers) == 1 for answers in by_id.values())  # nothing twice
    assert {by_id[j.id][0].status for j in (*good, quick)} == {"ok"}
    assert by_id[unknown.id][0].error is not None
    assert by_id[unknown.id][0].error.kind == ErrorKind.UNKNOWN_MODEL
    bad = by_id[str(invalid["id"])][0].error
    assert bad is not None
    assert (bad.kind, bad.field) == (ErrorKind.INVALID_JOB, "$.request.messages")
    # Batch-lane results travel together: fewer messages than results.
    assert len(messages) < len(by_id)
    assert any(len(m) > 1 for m in messages)

    assert len(await fake.requests()) - before == len(good) + 1  # the bad ones never ran
    ids = [j.id for j in (*good, quick)]
    rows = await eventually(
        lambda: ledger_rows(database_url, "job_id = ANY($1::text[])", ids),
        lambda r: len(r) >= len(ids),
    )
    assert sorted(r["job_id"] for r in rows) == sorted(ids)


async def test_submit_many_sends_batches_that_come_back_complete(
    client: Client, results_queue: str
) -> None:
    jobs = [job(f"many {i}") for i in range(150)]
    confirmed: list[str] = []

    sent = await client.submit_many(
        jobs, results_queue, batch_size=16, on_confirmed=lambda j: confirmed.append(j.id)
    )
    got = {r.job_id: r for r in await collect(client, results_queue, len(jobs))}

    assert sent == len(jobs)
    assert sorted(confirmed) == sorted(j.id for j in jobs)
    assert set(got) == {j.id for j in jobs}
    assert {r.status for r in got.values()} == {"ok"}


async def test_an_interactive_job_does_not_wait_behind_a_batch(
    config: Config, client: Client, fake: FakeControl, results_queue: str
) -> None:
    """With every slot busy and batch jobs waiting for one, an interactive job
    gets the first slot that frees up."""
    slots = config.pool("crash").concurrency
    backlog = [job(f"backlog {i}", model="crash") for i in range(3 * slots)]
    connection = await broker.connect(config.broker_url, "test-lanes-worker")
    # No jitter: the running calls end together, and who gets the freed slots
    # first is then the lane order alone.
    await fake.set(latency_ms=500)
    try:
        worker = Worker(config, "crash", connection)  # the only consumer of the crash pool
        await worker.start()
        await client.submit_many(backlog, results_queue)
        await asyncio.sleep(0.2)  # every slot busy, batch jobs held waiting for one
        urgent = await client.complete(job("urgent", lane="interactive", model="crash"), 20)
        finished = await collect(client, results_queue, len(backlog))
        await worker.stop()
    finally:
        await fake.set(latency_ms=0)
        await connection.close()

    assert urgent.status == "ok"
    arrived, started = urgent.timings.received_at, urgent.timings.started_at
    assert arrived is not None
    assert started is not None
    overtook = [r for r in finished if arrived < (r.timings.started_at or 0) < started]
    # Served first come, first served, the batch jobs already waiting would
    # all have started first (a slot's worth).
    assert len(overtook) < slots // 2
    assert len(finished) == len(backlog)


async def test_a_job_the_router_sent_before_is_answered_as_a_repeat(client: Client) -> None:
    repeat = job("routed twice", lane="interactive")
    repeat.redelivered = True  # as the router marks a job it routes a second time

    result = await client.complete(repeat, timeout=10)

    assert (result.status, result.redelivered) == ("ok", True)


async def test_complete_serves_batch_lane_jobs(config: Config, client: Client) -> None:
    """`complete` on batch-lane jobs: their answers may come batched."""
    jobs = [job(f"rpc {i}") for i in range(20)]
    results = await asyncio.gather(*(client.complete(j, timeout=10) for j in jobs))

    assert [r.job_id for r in results] == [j.id for j in jobs]
    assert {r.status for r in results} == {"ok"}


@pytest.mark.parametrize(("batch_size", "max_unconfirmed"), [(0, 512), (64, 0)])
async def test_submit_many_refuses_sizes_below_one(
    client: Client, batch_size: int, max_unconfirmed: int
) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        await client.submit_many(
            [job("never sent")], "nowhere", batch_size=batch_size, max_unconfirmed=max_unconfirmed
        )


async def test_a_trickle_of_small_batches_still_fills_the_slots(
    config: Config, client: Client, fake: FakeControl, results_queue: str
) -> None:
    """Batch jobs arriving slowly leave the router one or two per message; a
    worker must then hold more messages, or it would run two calls at a time."""
    jobs = [job(f"trickle {i}", model="crash") for i in range(40)]
    connection = await broker.connect(config.broker_url, "test-trickle-worker")
    await fake.set(latency_ms=1000)
    try:
        worker = Worker(config, "crash", connection)  # fresh: assumes full batches
        await worker.start()
        sending = []
        for j in jobs:  # one every 10 ms, longer than the linger: small batches
            sending.append(asyncio.create_task(client.submit(j, results_queue)))
            await asyncio.sleep(0.01)
        await asyncio.gather(*sending)
        got = await collect(client, results_queue, len(jobs))
        await worker.stop()
    finally:
        await fake.set(latency_ms=0)
        await connection.close()

    assert {r.job_id for r in got} == {j.id for j in jobs}
    spans = [(r.timings.started_at or 0, r.timings.finished_at or 0) for r in got]
    peak = max(sum(1 for s, f in spans if s <= t < f) for t, _ in spans)
    assert peak >= 8  # two one-job messages at a time would make it 2


async def test_a_stopping_worker_starts_no_new_call_and_hands_its_batches_back(
    config: Config, client: Client, fake: FakeControl, results_queue: str
) -> None:
    """Calls under way finish; jobs still waiting for a slot are not started
    (a call cut off by the end of the grace period would be billed but never
    recorded): their messages go back to the queue, for the next worker."""
    slots = config.pool("crash").concurrency
    jobs = [job(f"stopping {i}", model="crash") for i in range(3 * slots)]
    connection = await broker.connect(config.broker_url, "test-stopping-batch-worker")
    await fake.clear()
    await fake.set(latency_ms=1000)
    try:
        first = Worker(config, "crash", connection)  # the only consumer of the crash pool
        await first.start()
        await client.submit_many(jobs, results_queue)
        await asyncio.sleep(0.3)  # a slot's worth of calls is under way, none done
        await first.stop()
        calls_by_first = len(await fake.requests())
        second = Worker(config, "crash", connection)
        await second.start()
        got = await collect(client, results_queue, len(jobs))
        await second.stop()
    finally:
        await fake.set(latency_ms=0)
        await connection.close()

    assert calls_by_first == slots  # only the calls under way when it stopped
    assert {r.job_id for r in got} == {j.id for j in jobs}
    assert {r.status for r in got} == {"ok"}
    # No job ran twice: the answered jobs of a half-done message stayed answered.
    assert len(await fake.requests()) == len(jobs)


async def test_answers_from_a_batch_the_router_sees_again_are_marked(config: Config) -> None:
    """A batch message that comes back to the router (it died before the ack)
    may already have been answered: every answer to it is marked a repeat."""
    bad = {"id": "bad-again", "request": {"model": "fast", "messages": []}}
    unknown = job("again", model="no-such-model")
    unknown.reply_to = "answers"
    body = encode_job_batch([json.dumps(bad).encode(), encode(unknown)])
    with fresh_vhost() as url:
        own = msgspec.structs.replace(config, broker_url=url)
        connection = await broker.connect(url, "test-router-redelivery")
        try:
            channel = await broker.open_channel(connection)
            queues = await broker.declare(channel, build_topology(own.pool_names()))
            answers = await channel.declare_queue("answers", durable=True)
            exchange = await channel.get_exchange(JOBS_EXCHANGE)
            message = broker.message(body, reply_to="answers", type=JOB_BATCH_TYPE)
            await exchange.publish(message, routing_key="job")
            first = await queues[ROUTER_QUEUE].get(timeout=5)
            await first.nack(requeue=True)  # as if a router had died holding it
            router = Router(own, connection)
            await router.start()
            got: list[JobResult] = []
            async with asyncio.timeout(10), answers.iterator() as incoming:
                async for reply in incoming:
                    await reply.ack()
                    got.extend(
                        r for r in unpack(decode_reply(reply.body)) if isinstance(r, JobResult)
                    )
                    if len(got) == 2:
                        break
            await router.stop()
        finally:
            await connection.close()

    assert {(r.job_id, r.redelivered) for r in got} == {("bad-again", True), (unknown.id, True)}


async def test_a_batch_that_does_not_decode_is_kept_whole_on_the_dead_queue(
    config: Config, client: Client
) -> None:
    """Its jobs cannot be told apart, so none can be answered: the message
    is parked with its reason, every job in it kept for inspection."""
    body = b'{"jobs": [{"id": "lost-1"}, ' + uuid.uuid4().hex.encode()  # cut short
    connection = await aio_pika.connect(config.broker_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(JOBS_EXCHANGE)
        message = aio_pika.Message(body, type=JOB_BATCH_TYPE, reply_to="nobody")
        await exchange.publish(message, routing_key="job")
        # Read without taking: other tests' dead letters go back on close.
        reader = await connection.channel()
        dead = await reader.declare_queue(DEAD_QUEUE, passive=True)
        async with asyncio.timeout(10), dead.iterator() as parked_messages:
            async for parked in parked_messages:
                if parked.body == body:
                    await parked.ack()
                    break

    reason = str(parked.headers["x-modelyard-reason"])
    assert reason.startswith("undecodable job batch: ")
