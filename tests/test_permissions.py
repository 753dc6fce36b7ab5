"""`deploy/rabbitmq-users.sh` against the real broker: a producer may submit
jobs and read its own results, and cannot reach a worker pool or the
router's internal path, so nothing skips admission."""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import aio_pika
import pytest
import pytest_asyncio
from aiormq.exceptions import ChannelAccessRefused

from modelyard import broker
from modelyard.broker import Broker
from modelyard.client import Client, new_job
from modelyard.topology import (
    DISPATCH_EXCHANGE,
    INTERNAL_EXCHANGE,
    ROUTER_QUEUE,
    build_topology,
    dispatch_key,
    worker_queue,
)
from schemas.chat import Message
from schemas.codec import encode
from tests.services import fresh_vhost, rabbitmqctl

pytestmark = pytest.mark.asyncio(loop_scope="module")

SCRIPT = Path(__file__).resolve().parents[1] / "deploy" / "rabbitmq-users.sh"


@pytest.fixture(scope="module")
def producer_url() -> Iterator[tuple[str, str]]:
    """A vhost with modelyard's topology, and the script's producer user on it."""
    suffix = uuid.uuid4().hex[:8]
    users = {"PRODUCER_USER": f"producer-{suffix}", "SERVICE_USER": f"modelyard-{suffix}"}
    with fresh_vhost() as guest_url:
        vhost = urlsplit(guest_url).path.lstrip("/")
        env = {
            **os.environ,
            **users,
            "VHOST": vhost,
            "PRODUCER_PASSWORD": "p-secret",
            "SERVICE_PASSWORD": "s-secret",
            "PATH": f"{os.environ.get('PATH', '')}:/usr/sbin",
        }
        subprocess.run(["bash", str(SCRIPT)], env=env, check=True, capture_output=True)
        try:
            producer = f"amqp://{users['PRODUCER_USER']}:p-secret@127.0.0.1:5672/{vhost}"
            yield producer, guest_url
        finally:
            for user in users.values():
                rabbitmqctl("delete_user", user)


@pytest_asyncio.fixture(loop_scope="module")
async def urls(producer_url: tuple[str, str]) -> AsyncIterator[tuple[str, str]]:
    producer, guest = producer_url
    connection = await broker.connect(guest, "test-permissions-admin")
    await Broker(connection).declare(build_topology(["main"]))  # what modelyard declares
    await connection.close()
    yield producer, guest


async def refused(url: str, exchange: str, routing_key: str) -> bool:
    """Whether the broker refuses this user a publish there."""
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        target = (
            channel.default_exchange
            if exchange == ""
            else await channel.get_exchange(exchange, ensure=False)
        )
        try:
            await target.publish(aio_pika.Message(b"{}"), routing_key=routing_key)
        except ChannelAccessRefused:
            return True
        return False
    finally:
        await connection.close()


async def test_a_producer_submits_jobs_and_reads_its_own_results(
    urls: tuple[str, str],
) -> None:
    producer, guest = urls
    async with await Client.connect(producer, declare=False) as client:
        await client.declare_results_queue("results.mine")
        job = new_job("any-model", [Message(role="user", content="hi")])
        await client.submit(job, "results.mine")  # confirmed by the broker
    connection = await aio_pika.connect(guest)
    try:
        queue = await (await connection.channel()).declare_queue(ROUTER_QUEUE, passive=True)
        message = await queue.get(no_ack=True)
        assert message.body == encode(job)
    finally:
        await connection.close()


async def test_a_producer_cannot_reach_a_worker_pool_or_the_internal_path(
    urls: tuple[str, str],
) -> None:
    producer, guest = urls
    assert await refused(producer, DISPATCH_EXCHANGE, dispatch_key("main", "interactive"))
    assert await refused(producer, INTERNAL_EXCHANGE, "job")
    assert await refused(producer, "", worker_queue("main"))  # straight to the queue
    assert await refused(producer, "", "router.internal")
    assert not await refused(guest, DISPATCH_EXCHANGE, dispatch_key("main", "interactive"))
