"""Helpers for end-to-end tests: in-process components and ledger queries."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import asyncpg

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
