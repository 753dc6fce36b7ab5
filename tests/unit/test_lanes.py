"""The batch lane's pure parts: slot sharing between lanes, batching of
messages, and the batch wire format. No broker here."""

from __future__ import annotations

import asyncio

import pytest

from modelyard.batching import Batcher
from modelyard.client import _batches, new_job
from schemas.chat import Message
from schemas.codec import (
    InvalidMessage,
    decode_job,
    decode_job_batch,
    decode_reply,
    encode,
    encode_job_batch,
    encode_result_batch,
    split_job_batch,
)
from schemas.jobs import CompletionJob, JobBatch, Lane
from schemas.results import JobResult, ResultBatch, StreamChunk, Timings, unpack
from workers.lanes import Slots, SlotsClosed, batch_prefetch


def job(i: int, lane: Lane = "batch") -> CompletionJob:
    return new_job("m", [Message(role="user", content=f"job {i}")], priority=lane)


@pytest.mark.asyncio
async def test_a_freed_slot_goes_to_interactive_before_batch() -> None:
    slots = Slots(1)
    order: list[str] = []
    release = asyncio.Event()

    async def hold() -> None:
        async with slots.take("batch"):
            await release.wait()

    async def wait_for_slot(name: str, lane: Lane) -> None:
        async with slots.take(lane):
            order.append(name)

    holder = asyncio.create_task(hold())
    await asyncio.sleep(0)
    waiters = [
        asyncio.create_task(wait_for_slot("batch-1", "batch")),
        asyncio.create_task(wait_for_slot("batch-2", "batch")),
    ]
    await asyncio.sleep(0)
    waiters.append(asyncio.create_task(wait_for_slot("interactive", "interactive")))
    await asyncio.sleep(0)
    release.set()
    await asyncio.gather(holder, *waiters)

    assert order == ["interactive", "batch-1", "batch-2"]
    assert slots.in_use == 0


@pytest.mark.asyncio
async def test_slots_never_exceed_their_size_and_survive_cancelled_waiters() -> None:
    slots = Slots(3)
    busy = 0
    peak = 0

    async def call(lane: Lane) -> None:
        nonlocal busy, peak
        async with slots.take(lane):
            busy += 1
            peak = max(peak, busy)
            await asyncio.sleep(0.001)
            busy -= 1

    tasks = [asyncio.create_task(call("batch" if i % 2 else "interactive")) for i in range(30)]
    await asyncio.sleep(0)
    tasks[-1].cancel()  # a waiter that gives up must not leak or swallow a slot
    await asyncio.gather(*tasks, return_exceptions=True)

    assert peak == 3
    assert slots.in_use == 0
    async with slots.take("batch"):  # and the slots still work afterwards
        assert slots.in_use == 1


@pytest.mark.asyncio
async def test_batcher_sends_per_key_by_size_and_by_time() -> None:
    sent: list[tuple[str, list[int]]] = []

    async def send(key: str, items: list[int]) -> None:
        sent.append((key, items))

    batcher: Batcher[str, int] = Batcher(send, max_items=3, linger_s=0.01)
    await asyncio.gather(*(batcher.add("a", i) for i in range(4)), batcher.add("b", 9))

    assert sorted(sent) == [("a", [0, 1, 2]), ("a", [3]), ("b", [9])]


@pytest.mark.asyncio
async def test_batcher_reports_a_failed_send_to_every_item_in_it() -> None:
    async def send(key: str, items: list[int]) -> None:
        raise ConnectionError(f"broker gone while sending {items}")

    batcher: Batcher[str, int] = Batcher(send, max_items=10, linger_s=0.001)
    outcomes = await asyncio.gather(
        batcher.add("a", 1), batcher.add("a", 2), return_exceptions=True
    )

    assert [type(o) for o in outcomes] == [ConnectionError, ConnectionError]


def test_client_batches_keep_order_and_respect_the_size() -> None:
    jobs = [job(i) for i in range(7)]
    batches = list(_batches(jobs, "results", batch_size=3))

    assert [len(b) for b, _ in batches] == [3, 3, 1]
    assert [j.id for b, _ in batches for j in b] == [j.id for j in jobs]
    body = b'{"jobs":[' + b",".join(batches[0][1]) + b"]}"
    assert decode_job_batch(body).jobs == batches[0][0]
    assert all(j.reply_to == "results" and j.submitted_at for j in jobs)


def test_a_bad_job_inside_a_batch_does_not_spoil_the_others() -> None:
    good = encode(job(1))
    body = b'{"jobs":[' + good + b',{"id":"j-2","request":{"model":"m"}}]}'

    raws = split_job_batch(body, max_bytes=1 << 20)

    assert raws[0] == good
    with pytest.raises(InvalidMessage) as caught:
        decode_job(raws[1])
    assert caught.value.field == "$.request"


@pytest.mark.parametrize(
    ("body", "field"),
    [(b"not json", "$"), (b'{"jobs": 3}', "$.jobs"), (b"x" * 2048, "$")],
)
def test_a_batch_that_is_not_a_batch_is_refused(body: bytes, field: str) -> None:
    with pytest.raises(InvalidMessage) as caught:
        split_job_batch(body, max_bytes=1024)
    assert caught.value.field == field


def test_result_batches_unpack_in_order() -> None:
    results = [JobResult(job_id=f"j-{i}", status="ok", timings=Timings()) for i in range(3)]
    chunk = StreamChunk(job_id="j-9", seq=0, content="hi")

    assert unpack(decode_reply(encode(ResultBatch(results=results)))) == results
    assert unpack(decode_reply(encode(chunk))) == [chunk]
    assert JobBatch(jobs=[]).v == 1


@pytest.mark.asyncio
async def test_batcher_caps_a_message_by_bytes_and_sends_a_huge_item_alone() -> None:
    sent: list[list[bytes]] = []

    async def send(key: str, items: list[bytes]) -> None:
        sent.append(items)

    batcher: Batcher[str, bytes] = Batcher(
        send, max_items=100, linger_s=0.01, size=len, max_bytes=10
    )
    items = [b"aaaa", b"bbbb", b"cccc", b"x" * 50, b"dd"]
    await asyncio.gather(*(batcher.add("k", item) for item in items))

    assert sent == [[b"aaaa", b"bbbb"], [b"cccc"], [b"x" * 50], [b"dd"]]


def test_batches_built_from_encoded_parts_decode_as_the_schema_says() -> None:
    jobs = [job(i) for i in range(3)]
    results = [JobResult(job_id=f"j-{i}", status="ok", timings=Timings()) for i in range(3)]

    assert decode_job_batch(encode_job_batch([encode(j) for j in jobs])).jobs == jobs
    assert encode_result_batch([encode(r) for r in results]) == encode(ResultBatch(results=results))


@pytest.mark.parametrize(
    ("concurrency", "jobs_per_message", "prefetch"),
    [(128, 32, 5), (128, 1, 128), (32, 32, 2), (16, 32, 2), (64, 4.5, 16), (1, 1, 2)],
)
def test_batch_prefetch_fills_every_slot_without_hoarding(
    concurrency: int, jobs_per_message: float, prefetch: int
) -> None:
    assert batch_prefetch(concurrency, jobs_per_message) == prefetch


@pytest.mark.asyncio
async def test_closed_slots_refuse_waiters_and_newcomers_but_let_holders_finish() -> None:
    slots = Slots(1)
    holder_done = asyncio.Event()

    async def holder() -> str:
        async with slots.take("batch"):
            await holder_done.wait()
        return "finished"

    async def newcomer(lane: Lane) -> str:
        async with slots.take(lane):
            return "ran"

    running = asyncio.create_task(holder())
    await asyncio.sleep(0)
    waiting = [asyncio.create_task(newcomer("batch")), asyncio.create_task(newcomer("interactive"))]
    await asyncio.sleep(0)
    slots.close()
    holder_done.set()

    assert await running == "finished"
    outcomes = await asyncio.gather(*waiting, newcomer("batch"), return_exceptions=True)
    assert [type(o) for o in outcomes] == [SlotsClosed, SlotsClosed, SlotsClosed]
    assert slots.in_use == 0
