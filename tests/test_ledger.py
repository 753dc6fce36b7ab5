"""The ledger's store against the real database: idempotent batches, the
rollup, bad rows, partitions."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from decimal import Decimal

import asyncpg
import pytest
import pytest_asyncio

from ledger import store
from modelyard.database import migrate
from schemas.costs import CostEvent
from schemas.results import Usage

pytestmark = pytest.mark.asyncio


@pytest_asyncio.fixture
async def conn(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(database_url)
    yield connection
    await connection.close()


def event(
    cost: str = "0.001", team: str = "ledger-test", when: datetime | None = None
) -> CostEvent:
    return CostEvent(
        event_id=uuid.uuid4(),
        job_id=uuid.uuid4().hex,
        occurred_at=when or datetime.now(UTC),
        provider="openai",
        deployment="d",
        provider_model="gpt-4o-mini",
        model="fast",
        usage=Usage(input_tokens=10, output_tokens=5, cache_read_tokens=2),
        cost=Decimal(cost),
        price_source="genai-prices",
        team=team,
        raw_usage={"prompt_tokens": 10},
    )


async def test_batch_written_once_however_often_it_arrives(conn: asyncpg.Connection) -> None:
    team = f"t-{uuid.uuid4().hex[:6]}"
    events = [event("0.25", team), event("0.125", team)]

    await store.write_batch(conn, events)
    await store.write_batch(conn, events)  # a redelivery
    await store.write_batch(conn, [events[0], events[0]])  # a duplicate inside one batch

    rows = await conn.fetch("SELECT cost FROM ledger WHERE team = $1 ORDER BY cost", team)
    daily = await conn.fetchrow(
        "SELECT sum(calls) AS calls, sum(cost) AS cost, sum(cache_read_tokens) AS cached"
        " FROM ledger_daily WHERE team = $1",
        team,
    )
    assert [r["cost"] for r in rows] == [Decimal("0.125"), Decimal("0.25")]
    assert (daily["calls"], daily["cost"], daily["cached"]) == (2, Decimal("0.375"), 4)


async def test_a_row_postgres_refuses_raises_bad_data(conn: asyncpg.Connection) -> None:
    too_big = event("1" + "0" * 15)  # past numeric(24, 12)

    with pytest.raises(asyncpg.DataError):
        await store.write_batch(conn, [too_big])


async def test_partitions_are_idempotent_and_default_rows_do_not_block(
    conn: asyncpg.Connection, database_url: str
) -> None:
    far = datetime(2999, 5, 17, tzinfo=UTC)
    await store.write_batch(conn, [event(when=far)])  # lands in ledger_default

    await store.ensure_partitions(conn, now=far)  # cannot create 2999-05: logged, not raised
    await store.ensure_partitions(conn)
    await store.ensure_partitions(conn)
    assert await migrate(database_url) == []  # nothing pending, safe to re-run

    current = datetime.now(UTC).strftime("ledger_%Y_%m")
    assert await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", current)
    assert await conn.fetchval("SELECT to_regclass('ledger_2999_05') IS NULL")
    assert await conn.fetchval("SELECT count(*) FROM ledger_default") >= 1
