"""Helpers for end-to-end tests: in-process components and ledger queries."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import asyncpg

from modelyard import broker
from modelyard.client import Client
from modelyard.config import Config

T = TypeVar("T")


async def eventually(
    probe: Callable[[], Awaitable[T]], done: Callable[[T], bool], timeout: float = 15.0
) -> T:
    """Poll `probe` until `done(value)`; return the last value (the caller asserts)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    value = await probe()
    while not done(value) and loop.time() < deadline:
        await asyncio.sleep(0.05)
        value = await probe()
    return value


async def ledger_rows(database_url: str, where: str = "TRUE", *args: Any) -> list[dict[str, Any]]:
    """Ledger rows matching a SQL condition."""
    conn = await asyncpg.connect(database_url)
    try:
        return [dict(r) for r in await conn.fetch(f"SELECT * FROM ledger WHERE {where}", *args)]
    finally:
        await conn.close()


async def scalar(database_url: str, sql: str, *args: Any) -> Any:
    """One value from a query."""
    conn = await asyncpg.connect(database_url)
    try:
        return await conn.fetchval(sql, *args)
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def in_process(config: Config, name: str) -> AsyncIterator[Client]:
    """A ledger, a `main` pool worker and a router on one connection in this
    process, and a client; all stopped after."""
    from ledger.service import Ledger  # noqa: PLC0415
    from router.service import Router  # noqa: PLC0415
    from workers.pool import Worker  # noqa: PLC0415

    connection = await broker.connect(config.broker_url, name)
    components = [Ledger(config, connection), Worker(config, "main", connection)]
    components.append(Router(config, connection))
    for component in components:
        await component.start()
    client = await Client.connect(config.broker_url)
    try:
        yield client
    finally:
        await client.close()
        for component in reversed(components):
            await component.stop()
        await connection.close()
