"""No message can stop the pipeline, and no key leaks out of a worker.

A pipeline of its own (vhost, database, in-process router, worker and
ledger), so this module can read and empty the dead queue freely.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aio_pika
import pytest
import pytest_asyncio
import structlog

from ledger.service import Ledger
from modelyard import broker
from modelyard.broker import REASON_HEADER, PublishFailed
from modelyard.client import Client, new_job
from modelyard.config import Config, parse
from modelyard.inbox import Inbox
from modelyard.topology import DEAD_QUEUE, DELIVERY_LIMIT, JOBS_EXCHANGE, worker_queue
from router.service import Router
from schemas.chat import Message
from schemas.codec import decode_reply, encode
from schemas.errors import ErrorKind
from schemas.results import JobResult, unpack
from tests.conftest import FAKE_KEY, FakeControl
from tests.pipeline import scalar
from tests.services import config_document, fresh_database, fresh_vhost, write_config
from workers.pool import Worker
from workers.providers import PROVIDERS

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest.fixture(scope="module")
def own_config(fake_port: int) -> Iterator[Config]:
    with fresh_vhost() as broker_url, fresh_database() as database_url:
        yield parse(config_document(broker_url, database_url, fake_port), {}, PROVIDERS)


class Pipeline:
    """The components, and a producer's view of the answers and dead letters."""

    def __init__(self, config: Config, router: Router, worker: Worker, client: Client) -> None:
        self.config, self.router, self.worker, self.client = config, router, worker, client
        self.connection: aio_pika.abc.AbstractRobustConnection

    async def publish(
        self, body: bytes, *, reply_to: str | None = None, batch: bool = False
    ) -> None:
        """Publish raw bytes to the submit exchange, as any producer could."""
        channel = await self.connection.channel(publisher_confirms=True)
        try:
            exchange = await channel.get_exchange(JOBS_EXCHANGE)
            message = aio_pika.Message(
                body, reply_to=reply_to, type="modelyard.job-batch" if batch else None
            )
            await exchange.publish(message, routing_key="job")
        finally:
            await channel.close()

    async def drain(self, queue: str) -> list[aio_pika.abc.AbstractIncomingMessage]:
        """Everything waiting in a queue now, acked."""
        channel = await self.connection.channel()
        try:
            source = await channel.get_queue(queue)
            taken = []
            while (message := await source.get(fail=False)) is not None:
                await message.ack()
                taken.append(message)
            return taken
        finally:
            await channel.close()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def pipe(own_config: Config) -> AsyncIterator[Pipeline]:
    connection = await broker.connect(own_config.broker_url, "test-robustness")
    ledger, worker, router = (
        Ledger(own_config, connection),
        Worker(own_config, "main", connection),
        Router(own_config, connection),
    )
    for component in (ledger, worker, router):
        await component.start()
    client = await Client.connect(own_config.broker_url)
    pipeline = Pipeline(own_config, router, worker, client)
    pipeline.connection = connection
    yield pipeline
    await client.close()
    for component in (router, worker, ledger):
        await component.stop()
    await connection.close()


def raw_job(job_id: str, reply_to: str | None, text: str = "hello") -> bytes:
    body: dict[str, Any] = {
        "id": job_id,
        "request": {"model": "fast", "messages": [{"role": "user", "content": text}]},
    }
    if reply_to is not None:
        body["reply_to"] = reply_to
    return json.dumps(body).encode()


async def served(pipe: Pipeline) -> JobResult:
    """A good job, answered: the pipeline still serves everyone."""
    job = new_job("fast", [Message(role="user", content="still there?")])
    return await pipe.client.complete(job, timeout=20)


async def dead_reasons(pipe: Pipeline, token: str, want: int = 1) -> list[str]:
    """Reasons of dead letters whose body holds `token`, once `want` arrived."""
    reasons: list[str] = []
    for _ in range(100):
        for message in await pipe.drain(DEAD_QUEUE):
            if token.encode() in message.body:
                reasons.append(str((message.headers or {}).get(REASON_HEADER, "")))
        if len(reasons) >= want:
            break
        await asyncio.sleep(0.1)
    return reasons


async def test_a_special_reply_address_is_dead_lettered_and_the_router_carries_on(
    pipe: Pipeline, fake: FakeControl
) -> None:
    """RabbitMQ's direct reply-to address closes the publishing channel of
    whoever publishes to it without its consumer: the job must be parked,
    never published onward, and the next job served."""
    job_id = f"special-{uuid.uuid4().hex}"
    calls_before = len(await fake.requests())

    await pipe.publish(raw_job(job_id, "amq.rabbitmq.reply-to"))

    reasons = await dead_reasons(pipe, job_id)
    assert len(reasons) == 1
    assert "special address" in reasons[0]
    result = await served(pipe)
    assert result.status == "ok"
    assert len(await fake.requests()) == calls_before + 1  # only the good job ran


async def _ignore(_: aio_pika.abc.AbstractIncomingMessage) -> None:
    """A consumer that drops what it gets."""


async def test_a_direct_reply_to_property_is_refused_too(pipe: Pipeline, fake: FakeControl) -> None:
    """The same address given as the AMQP property (the broker rewrites it to
    `amq.rabbitmq.reply-to.<token>` for a producer consuming it)."""
    job_id = f"direct-{uuid.uuid4().hex}"
    channel = await pipe.connection.channel(publisher_confirms=True)
    try:
        direct = await channel.get_queue("amq.rabbitmq.reply-to", ensure=False)
        await direct.consume(_ignore, no_ack=True)
        exchange = await channel.get_exchange(JOBS_EXCHANGE)
        message = aio_pika.Message(raw_job(job_id, None), reply_to="amq.rabbitmq.reply-to")
        await exchange.publish(message, routing_key="job")
        reasons = await dead_reasons(pipe, job_id)
    finally:
        await channel.close()
    assert len(reasons) == 1
    assert "special address" in reasons[0]
    assert (await served(pipe)).status == "ok"


async def test_a_reply_queue_that_does_not_exist_is_checked_before_the_provider_is_paid(
    pipe: Pipeline, fake: FakeControl
) -> None:
    job_id = f"noqueue-{uuid.uuid4().hex}"
    calls_before = len(await fake.requests())

    await pipe.publish(raw_job(job_id, f"no-such-queue-{uuid.uuid4().hex}"))

    reasons = await dead_reasons(pipe, job_id)
    assert len(reasons) == 1
    assert "does not exist" in reasons[0]
    assert len(await fake.requests()) == calls_before


@pytest.mark.parametrize("role", ["router", "worker"])
async def test_a_consumer_channel_closed_by_the_broker_is_restored(
    pipe: Pipeline, role: str
) -> None:
    """An ack the broker refuses (an unknown delivery tag) closes the
    consumer's channel: the consumer must come back, not leave the process
    alive and idle."""
    consumer = pipe.router._consumer if role == "router" else pipe.worker._consumer
    channel = consumer.channel
    assert channel is not None
    underlay = await channel.get_underlay_channel()
    await underlay.basic_ack(delivery_tag=987654)  # the broker closes the channel for this

    result = await served(pipe)

    assert result.status == "ok"
    assert consumer.channel is not None
    assert not consumer.channel.is_closed


async def test_a_publish_the_broker_keeps_refusing_fails_and_the_next_one_works(
    pipe: Pipeline,
) -> None:
    """Publishing to an exchange that does not exist closes the channel each
    time: it fails after a few tries instead of looping, and the channel is
    replaced for the publishes that follow."""
    with pytest.raises(PublishFailed):
        await pipe.router.broker.publish("no-such-exchange", "x", broker.message(b"{}"))
    assert (await served(pipe)).status == "ok"


async def test_a_provider_error_repeating_the_key_leaks_it_nowhere(
    pipe: Pipeline, fake: FakeControl
) -> None:
    """A misbehaving proxy echoes the API key in every field of its error."""
    jobs = [
        new_job("fast", [Message(role="user", content="leak?")]),
        new_job("fast", [Message(role="user", content="leak?")], stream=True),
    ]
    await fake.set(echo_key=True)
    try:
        with structlog.testing.capture_logs() as logs:
            results = [await pipe.client.complete(job, timeout=20) for job in jobs]
    finally:
        await fake.set(echo_key=False)

    for result in results:
        assert result.error is not None
        assert result.error.kind == ErrorKind.BAD_REQUEST
        assert "[redacted]" in result.error.message  # the key was there, and was scrubbed
        assert FAKE_KEY not in encode(result).decode()
    assert FAKE_KEY not in json.dumps(logs, default=str)
    ids = [job.id for job in jobs]
    leaked = await scalar(
        pipe.config.database_url,
        "SELECT count(*) FROM ledger WHERE job_id = ANY($1) OR strpos(ledger::text, $2) > 0",
        ids,
        FAKE_KEY,
    )
    assert leaked == 0
    dead = await pipe.drain(DEAD_QUEUE)
    assert not [m for m in dead if FAKE_KEY.encode() in m.body]


async def answers_on(pipe: Pipeline, queue: str) -> list[JobResult]:
    """The results that arrive on a results queue (waiting for the first),
    then the queue is removed."""
    answers: list[JobResult] = []
    for _ in range(100):
        answers += [
            r
            for m in await pipe.drain(queue)
            for r in unpack(decode_reply(m.body))
            if isinstance(r, JobResult)
        ]
        if answers:
            break
        await asyncio.sleep(0.1)
    await pipe.client.delete_queue(queue)
    return answers


async def test_an_empty_batch_is_dead_lettered_with_its_reason(pipe: Pipeline) -> None:
    token = uuid.uuid4().hex
    await pipe.publish(json.dumps({"jobs": [], "token": token}).encode(), batch=True)
    reasons = await dead_reasons(pipe, token)
    assert len(reasons) == 1
    assert "no jobs" in reasons[0]


async def test_a_batch_item_without_an_id_is_dead_lettered_and_its_neighbours_answered(
    pipe: Pipeline,
) -> None:
    queue = f"answers-{uuid.uuid4().hex}"
    await pipe.client.declare_results_queue(queue)
    token = uuid.uuid4().hex
    good = json.loads(raw_job(f"good-{token}", None))
    nameless = json.loads(raw_job("x", None, text=token))
    del nameless["id"]
    await pipe.publish(json.dumps({"jobs": [nameless, good]}).encode(), reply_to=queue, batch=True)

    reasons = await dead_reasons(pipe, token)
    answers = await answers_on(pipe, queue)

    assert len(reasons) == 1
    assert "nobody to tell" in reasons[0]
    assert [(a.job_id, a.status) for a in answers] == [(f"good-{token}", "ok")]


@pytest_asyncio.fixture(loop_scope="session")
async def config_file(pipe: Pipeline, tmp_path: Path, fake_port: int) -> Path:
    """The pipeline's config as a file for `modelyard` commands, with an
    empty dead queue."""
    path = write_config(
        tmp_path / "modelyard.yaml",
        config_document(pipe.config.broker_url, pipe.config.database_url, fake_port),
    )
    await pipe.drain(DEAD_QUEUE)
    return path


def cli(config_file: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run `modelyard` as an operator would."""
    return subprocess.run(
        [sys.executable, "-m", "modelyard.cli", "--config", str(config_file), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_dead_letters_are_listed_replayed_once_fixed_and_purged(
    pipe: Pipeline, config_file: Path
) -> None:
    job_id = f"parked-{uuid.uuid4().hex}"
    queue = f"created-later-{uuid.uuid4().hex}"
    await pipe.publish(raw_job(job_id, queue))  # its reply queue does not exist yet
    await pipe.publish(b"\x00 no id, nobody to tell")  # parked by the router
    for _ in range(100):
        letters = await dead_list(config_file)
        if len(letters) >= 2:
            break
        await asyncio.sleep(0.1)

    parked = [letter for letter in letters if letter["key"] == job_id]
    assert [(p["kind"], "does not exist" in p["reason"]) for p in parked] == [("job", True)]
    assert any("invalid job, nobody to tell" in letter["reason"] for letter in letters)
    refused = await asyncio.to_thread(cli, config_file, "dead", "replay")
    assert (refused.returncode, "--id ID" in refused.stderr) == (2, True)

    await pipe.client.declare_results_queue(queue)  # the fix
    replayed = await asyncio.to_thread(cli, config_file, "dead", "replay", "--id", job_id)
    answers = await answers_on(pipe, queue)
    after = await dead_list(config_file)

    assert replayed.returncode == 0, replayed.stderr
    assert [(a.job_id, a.status) for a in answers] == [(job_id, "ok")]
    assert job_id not in {letter["key"] for letter in after}
    purged = await asyncio.to_thread(cli, config_file, "dead", "purge", "--all")
    assert purged.returncode == 0
    assert await dead_list(config_file) == []


async def dead_list(config_file: Path) -> list[dict[str, Any]]:
    """`modelyard dead list --format json`, parsed."""
    listed = await asyncio.to_thread(cli, config_file, "dead", "list", "--format", "json")
    letters: list[dict[str, Any]] = json.loads(listed.stdout)
    return letters


async def test_an_inbox_acks_its_replies_in_groups_and_parks_garbage_first(
    pipe: Pipeline,
) -> None:
    """Replies are acked a group at a time: once answered and the group's
    ack is out, closing the inbox's channel puts nothing back in its queue;
    garbage among them is parked on the dead queue, not lost."""
    connection = await broker.connect(pipe.config.broker_url, "test-inbox-acks")
    publisher = broker.Broker(connection)
    inbox = Inbox(connection, publisher)
    queue = await inbox.queue()
    token = uuid.uuid4().hex
    waits = [inbox.expect(f"{token}-{i}") for i in range(50)]
    for i in range(50):
        result = JobResult(job_id=f"{token}-{i}", status="ok")
        await publisher.reply(queue, encode(result), correlation_id=result.job_id)
        if i in (20, 49):  # garbage amid the replies, and last
            await publisher.publish("", queue, broker.message(f"garbage {token}".encode()))
    answers = await asyncio.wait_for(asyncio.gather(*waits), 10)
    assert [a.job_id for a in answers] == [f"{token}-{i}" for i in range(50)]
    assert len(await dead_reasons(pipe, token, want=2)) == 2
    await asyncio.sleep(0.2)  # past the acks' linger
    assert inbox._channel is not None
    await inbox._channel.close()
    check = await connection.channel()
    left = await check.declare_queue(queue, passive=True)
    assert left.declaration_result.message_count == 0
    await check.queue_delete(queue)
    await connection.close()


async def test_a_message_that_keeps_crashing_its_worker_is_parked_then_replayed_once_fixed(
    pipe: Pipeline, config_file: Path
) -> None:
    """The quorum queue's delivery limit: a job whose every delivery ends
    with its worker going away (here a consumer that hands it back each
    time) lands in `dead.jobs` after `DELIVERY_LIMIT` tries, with the
    broker's reason; once a working worker serves its pool, `dead replay`
    runs it and it is answered."""
    job_id = f"poison-{uuid.uuid4().hex}"
    queue = f"poison-answers-{uuid.uuid4().hex}"
    await pipe.client.declare_results_queue(queue)
    deliveries: list[int] = []
    channel = await pipe.connection.channel()
    await channel.set_qos(prefetch_count=1)
    crashing = await channel.get_queue(worker_queue("crash"))

    async def crash(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        deliveries.append(1)
        await message.reject(requeue=True)  # what a worker dying mid-job leaves behind

    tag = await crashing.consume(crash)
    await pipe.publish(raw_job(job_id, queue).replace(b'"fast"', b'"crash"'))
    for _ in range(200):
        parked = [letter for letter in await dead_list(config_file) if letter["key"] == job_id]
        if parked:
            break
        await asyncio.sleep(0.1)
    await crashing.cancel(tag)
    await channel.close()
    assert len(parked) == 1
    assert "delivery_limit" in parked[0]["reason"]
    assert DELIVERY_LIMIT <= len(deliveries) <= DELIVERY_LIMIT + 1

    fixed = Worker(pipe.config, "crash", pipe.connection)  # the fix is deployed
    await fixed.start()
    try:
        replayed = await asyncio.to_thread(cli, config_file, "dead", "replay", "--id", job_id)
        answers = await answers_on(pipe, queue)
    finally:
        await fixed.stop()
    assert replayed.returncode == 0, replayed.stderr
    assert [(a.job_id, a.status) for a in answers] == [(job_id, "ok")]
    assert job_id not in {letter["key"] for letter in await dead_list(config_file)}


async def test_dead_list_shows_a_table_purge_respects_its_age_and_replay_all_runs_every_job(
    pipe: Pipeline, config_file: Path
) -> None:
    token = uuid.uuid4().hex
    parked = {f"all-{i}-{token}": f"later-{i}-{token}" for i in range(2)}
    for job_id, queue in parked.items():
        await pipe.publish(raw_job(job_id, queue))  # no such reply queue yet
    for _ in range(100):
        if len(await dead_list(config_file)) >= len(parked):
            break
        await asyncio.sleep(0.1)

    table = await asyncio.to_thread(cli, config_file, "dead", "list")
    young = await asyncio.to_thread(cli, config_file, "dead", "purge", "--older-than", "1h")
    for queue in parked.values():
        await pipe.client.declare_results_queue(queue)  # the fix
    replayed = await asyncio.to_thread(cli, config_file, "dead", "replay", "--all")
    answers = {queue: await answers_on(pipe, queue) for queue in parked.values()}

    assert table.returncode == 0
    assert all(job_id in table.stdout for job_id in parked)
    assert (young.returncode, young.stdout.strip()) == (0, "purged 0 message(s)")
    assert replayed.returncode == 0, replayed.stderr
    for job_id, queue in parked.items():
        assert [(a.job_id, a.status) for a in answers[queue]] == [(job_id, "ok")]
    assert await dead_list(config_file) == []
