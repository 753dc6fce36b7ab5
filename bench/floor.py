"""What one job's path costs at the least, measured without modelyard's code.

A job's submit-to-result time at low load is two quorum-queue hops
(producer -> router, router -> worker), one HTTP call to the provider and one
hop back to the producer, plus each component's own work. This measures the
hops with nothing else in them: a bare aio-pika publish and consume through
a queue of each kind, a bare aiohttp call to the fake provider, and the whole
path with two relay processes standing in for the router and the worker
(forward; call the fake and answer), doing nothing else. Each is timed back
to back ("hot") and with a 5 ms pause before each call ("low load": what a
lone job meets, every process having gone idle since the last one).

Run with `make bench` (after the pipeline benchmark) or
`.venv/bin/python bench/floor.py`. Not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aio_pika
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.services import free_port, fresh_vhost, modelyard, wait_for_port
from workers import transport

GAP_S = 0.005
BODY = b'{"id": "floor", "request": {"model": "m", "messages": []}}' * 8


async def timed(call: Callable[[], Awaitable[float]], n: int, gap_s: float) -> float:
    """Median of the milliseconds `call` reports, with `gap_s` of idleness before each."""
    samples = []
    for _ in range(n):
        if gap_s:
            await asyncio.sleep(gap_s)
        samples.append(await call())
    return statistics.median(samples)


async def queue_hop(url: str, queue_type: str, n: int) -> tuple[float, float]:
    """Publish (awaiting the confirm, as modelyard does) to a durable queue
    and receive it on a consumer in another connection: (hot, low load)."""
    async with await aio_pika.connect(url) as producer, await aio_pika.connect(url) as consumer:
        out = await producer.channel(publisher_confirms=True)
        inbox = await consumer.channel()
        queue = await inbox.declare_queue(
            f"floor.{queue_type}", durable=True, arguments={"x-queue-type": queue_type}
        )
        arrived: asyncio.Queue[None] = asyncio.Queue()

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            await message.ack()
            arrived.put_nowait(None)

        tag = await queue.consume(on_message)

        async def hop() -> float:
            """Until delivery (what a job waits for); the confirm is awaited after."""
            message = aio_pika.Message(BODY, delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
            started = time.perf_counter()
            publish = asyncio.ensure_future(
                out.default_exchange.publish(message, routing_key=queue.name)
            )
            await arrived.get()
            elapsed = (time.perf_counter() - started) * 1000
            await publish
            return elapsed

        hot = await timed(hop, n, 0)
        cold = await timed(hop, n, GAP_S)
        await queue.cancel(tag)
        await queue.delete(if_unused=False, if_empty=False)
        return hot, cold


async def http_call(port: int, n: int) -> tuple[float, float]:
    """One chat completion from the fake provider at 0 ms latency: (hot, low load)."""
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "floor"}]}
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    async with transport.new_session(8) as session:

        async def call() -> float:
            started = time.perf_counter()
            async with session.post(url, json=body, headers={"authorization": "Bearer k"}) as r:
                await r.read()
            return (time.perf_counter() - started) * 1000

        return await timed(call, n, 0), await timed(call, n, GAP_S)


async def _relay(url: str, source: str, target: str | None, fake_port: int | None) -> None:
    """A stand-in for the router (forward to `target`) or the worker (call the
    fake provider, answer `reply_to`) that does nothing else."""
    async with await aio_pika.connect(url) as connection:
        channel = await connection.channel(publisher_confirms=True)
        await channel.set_qos(prefetch_count=16)
        queue = await channel.get_queue(source)
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "floor"}]}
        url_ = f"http://127.0.0.1:{fake_port}/v1/chat/completions"
        async with transport.new_session(8) as session:

            async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
                if fake_port is not None:
                    headers = {"authorization": "Bearer k"}
                    async with session.post(url_, json=body, headers=headers) as r:
                        await r.read()
                out = aio_pika.Message(
                    message.body,
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    reply_to=message.reply_to,
                )
                await channel.default_exchange.publish(out, routing_key=target or message.reply_to)
                await message.ack()

            await queue.consume(on_message)
            await asyncio.Future()  # until terminated


def _run_relay(url: str, source: str, target: str | None, fake_port: int | None) -> None:
    uvloop.install()
    asyncio.run(_relay(url, source, target, fake_port))


async def bare_path(url: str, fake_port: int, n: int) -> tuple[float, float]:
    """A job's whole path with no modelyard code in it: producer -> quorum ->
    relay process -> quorum -> relay process -> HTTP -> reply queue -> producer."""
    async with await aio_pika.connect(url) as connection:
        channel = await connection.channel(publisher_confirms=True)
        for name in ("floor.submit", "floor.dispatch"):
            await channel.declare_queue(name, durable=True, arguments={"x-queue-type": "quorum"})
        replies = await channel.declare_queue(exclusive=True)
        arrived: asyncio.Queue[None] = asyncio.Queue()

        async def on_reply(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            arrived.put_nowait(None)

        await replies.consume(on_reply, no_ack=True)
        relays = [
            multiprocessing.Process(
                target=_run_relay, args=(url, "floor.submit", "floor.dispatch", None)
            ),
            multiprocessing.Process(
                target=_run_relay, args=(url, "floor.dispatch", None, fake_port)
            ),
        ]
        for relay in relays:
            relay.start()
        try:

            async def job() -> float:
                message = aio_pika.Message(
                    BODY, delivery_mode=aio_pika.DeliveryMode.PERSISTENT, reply_to=replies.name
                )
                started = time.perf_counter()
                await channel.default_exchange.publish(message, routing_key="floor.submit")
                await arrived.get()
                return (time.perf_counter() - started) * 1000

            await timed(job, 50, 0)  # warm-up: the relays connect and consume
            return await timed(job, n, 0), await timed(job, n, GAP_S)
        finally:
            for relay in relays:
                relay.terminate()
                relay.join(10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=400)
    args = parser.parse_args()
    uvloop.install()
    port = free_port()
    fake = modelyard("fake-provider", "--port", str(port), "--api-key", "k")
    try:
        wait_for_port(port)
        with fresh_vhost() as url:
            quorum = asyncio.run(queue_hop(url, "quorum", args.samples))
            classic = asyncio.run(queue_hop(url, "classic", args.samples))
            path = asyncio.run(bare_path(url, port, args.samples))
        http = asyncio.run(http_call(port, args.samples))
    finally:
        fake.terminate()
        fake.wait(30)
    rows = [
        ("quorum queue hop", quorum),
        ("classic queue hop", classic),
        ("HTTP call to the fake provider", http),
        ("a job's path, nothing in it", path),
    ]
    print(f"\nfloor: bare hops, median of {args.samples} (ms)     hot   low load")
    for name, (hot, cold) in rows:
        print(f"  {name:38} {hot:6.2f}   {cold:6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
