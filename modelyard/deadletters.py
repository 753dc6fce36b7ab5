"""The dead queue, for an operator: list what is parked there and why, send
jobs back through the router once a fix is deployed, purge the rest.

Messages are read with manual acks on a channel of their own: a message is
removed only once what replaces it (a replayed job) is confirmed, or when
it is purged; everything else goes back to the queue when the channel
closes. A job modelyard parked after admitting it (a final failure, an
answer that could not be delivered) goes back on the internal exchange and
is admitted again by the key id it was admitted with (its key itself is
long gone from it), keeping its id and its attempt history: its next call
is a new attempt, so claims and the ledger tell it from the ones before,
and the producer can tell it apart by id. Anything else parked goes back
as a producer's job, admitted from scratch.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any, Literal

import msgspec
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection

from modelyard.broker import ADMITTED_HEADER, REASON_HEADER, Broker, open_channel
from modelyard.topology import DEAD_QUEUE, ROUTER_INTERNAL_QUEUE
from schemas.codec import InvalidMessage, decode_job, split_job_batch
from schemas.jobs import JOB_BATCH_TYPE

Kind = Literal["job", "job batch", "other"]


class DeadLetter(msgspec.Struct, kw_only=True):
    """One parked message, as `modelyard dead list` shows it."""

    key: str  # the job id, or a digest-free position for bodies without one
    kind: Kind
    reason: str
    dead_at: datetime | None
    size: int
    jobs: int = 0


def describe(message: AbstractIncomingMessage, position: int) -> DeadLetter:
    """What a parked message is, why it is there and since when."""
    headers = message.headers or {}
    kind, key, jobs = _identify(message)
    return DeadLetter(
        key=key or f"#{position}",
        kind=kind,
        reason=str(headers.get(REASON_HEADER) or _death_reason(headers)),
        dead_at=_dead_at(message),
        size=len(message.body),
        jobs=jobs,
    )


def _identify(message: AbstractIncomingMessage) -> tuple[Kind, str | None, int]:
    """A job (with its id), a batch of jobs, or something else."""
    body = message.body
    if message.type == JOB_BATCH_TYPE:
        with contextlib.suppress(InvalidMessage, RecursionError):
            return "job batch", message.correlation_id, len(split_job_batch(body, len(body)))
        return "other", message.correlation_id, 0
    with contextlib.suppress(InvalidMessage, RecursionError):
        return "job", decode_job(body, len(body)).id, 1
    return "other", message.correlation_id, 0


def _latest_death(headers: dict[str, Any]) -> dict[str, Any] | None:
    """The broker's record of the last time it dead-lettered the message
    (`x-death` lists the newest first), or None."""
    deaths = headers.get("x-death")
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict):
        return deaths[0]
    return None


def _death_reason(headers: dict[str, Any]) -> str:
    """Why the broker itself dead-lettered a message (rejected, delivery limit)."""
    death = _latest_death(headers)
    if death is not None:
        return f"{death.get('reason', 'dead-lettered')} by queue {death.get('queue', '?')}"
    return "unknown"


def _admitted(message: AbstractIncomingMessage) -> bool:
    """Whether modelyard had admitted the parked job. One the broker parked
    (it has an `x-death` record, and otherwise the producer's own headers,
    which prove nothing) was admitted if the queue it died in is one only
    admitted jobs reach: a worker's, or the router's internal one. One
    modelyard parked says so itself (`dead_letter` writes fresh headers)."""
    headers = message.headers or {}
    if headers.get("x-death"):
        queue = str((_latest_death(headers) or {}).get("queue", ""))
        return queue.startswith("worker.") or queue == ROUTER_INTERNAL_QUEUE
    return bool(headers.get(ADMITTED_HEADER))


def _dead_at(message: AbstractIncomingMessage) -> datetime | None:
    """When it was parked: the message's timestamp, or the broker's record."""
    if message.timestamp is not None:
        stamp = message.timestamp
        return stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)
    death = _latest_death(message.headers or {})
    when = death.get("time") if death is not None else None
    if isinstance(when, datetime):
        return when if when.tzinfo else when.replace(tzinfo=UTC)
    return None


@contextlib.asynccontextmanager
async def _parked(
    connection: AbstractRobustConnection, limit: int
) -> AsyncIterator[list[AbstractIncomingMessage]]:
    """Up to `limit` parked messages, unacked; those not settled go back."""
    channel = await open_channel(connection, prefetch=0)
    queue = await channel.get_queue(DEAD_QUEUE)
    taken: list[AbstractIncomingMessage] = []
    try:
        while len(taken) < limit and (message := await queue.get(fail=False)) is not None:
            taken.append(message)
        yield taken
    finally:
        await channel.close()  # whatever was not acked is put back


async def list_dead(connection: AbstractRobustConnection, limit: int = 1000) -> list[DeadLetter]:
    """What the dead queue holds (the first `limit` messages), left in place."""
    async with _parked(connection, limit) as messages:
        return [describe(message, i) for i, message in enumerate(messages)]


async def replay(
    connection: AbstractRobustConnection,
    broker: Broker,
    wanted: Callable[[DeadLetter], bool],
    limit: int = 100_000,
) -> tuple[list[str], list[str]]:
    """Send the parked jobs `wanted` picks back to the router. Returns the
    keys replayed and those picked but not replayable (not a job)."""
    replayed, refused = [], []
    async with _parked(connection, limit) as messages:
        for i, message in enumerate(messages):
            letter = describe(message, i)
            if not wanted(letter):
                continue
            if letter.kind == "other":
                refused.append(letter.key)
                continue
            batch = letter.kind == "job batch"
            if _admitted(message):
                await broker.replay(message.body, correlation_id=letter.key, batch=batch)
            else:
                await broker.submit(
                    message.body, correlation_id=letter.key, reply_to=message.reply_to, batch=batch
                )
            await message.ack()
            replayed.append(letter.key)
    return replayed, refused


async def purge(
    connection: AbstractRobustConnection,
    wanted: Callable[[DeadLetter], bool],
    limit: int = 100_000,
) -> list[str]:
    """Remove the parked messages `wanted` picks; returns their keys."""
    removed = []
    async with _parked(connection, limit) as messages:
        for i, message in enumerate(messages):
            letter = describe(message, i)
            if wanted(letter):
                await message.ack()
                removed.append(letter.key)
    return removed


def older_than(seconds: float, now: float | None = None) -> Callable[[DeadLetter], bool]:
    """Pick letters parked more than `seconds` ago (those of unknown age too)."""
    cutoff = (time.time() if now is None else now) - seconds
    return lambda letter: letter.dead_at is None or letter.dead_at.timestamp() < cutoff
