"""Schema migrations: numbered SQL files, applied once each, in order.

`modelyard migrate` runs this. It creates the database if it does not exist
yet, so a fresh machine needs nothing but a running server.
"""

from __future__ import annotations

import contextlib
from importlib import resources
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import structlog

from modelyard.broker import without_password
from modelyard.database import unreachable

log = structlog.get_logger("modelyard.migrate")

_TRACKING = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    name       text PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


def migration_files() -> list[tuple[str, str]]:
    """(name, sql) of every bundled migration, in order."""
    folder = resources.files("ledger") / "migrations"
    files = sorted((p for p in folder.iterdir() if p.name.endswith(".sql")), key=lambda p: p.name)
    return [(p.name, p.read_text(encoding="utf-8")) for p in files]


async def connect(url: str) -> asyncpg.Connection:
    """A connection, or a `ConnectionError` naming the server."""
    try:
        return await asyncpg.connect(url)
    except (OSError, asyncpg.PostgresError) as exc:
        raise unreachable(url, exc) from exc


async def ensure_database(url: str) -> None:
    """Create the URL's database when it is missing (connecting to `postgres`)."""
    parts = urlsplit(url)
    name = parts.path.lstrip("/")
    if not name or '"' in name:
        raise ValueError(f"the database URL {without_password(url)} names no usable database")
    admin_url = urlunsplit(parts._replace(path="/postgres"))
    conn = await connect(admin_url)
    try:
        if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
            with contextlib.suppress(asyncpg.DuplicateDatabaseError):  # a concurrent migrate won
                await conn.execute(f'CREATE DATABASE "{name}"')
                log.info("database created", database=name)
    finally:
        await conn.close()


async def migrate(url: str) -> list[str]:
    """Apply pending migrations; returns the names applied. Safe to run concurrently."""
    await ensure_database(url)
    conn = await connect(url)
    applied: list[str] = []
    try:
        async with conn.transaction():
            # One migrator at a time; the lock ends with the transaction.
            await conn.execute("SELECT pg_advisory_xact_lock(7426001)")
            await conn.execute(_TRACKING)
            done = {r["name"] for r in await conn.fetch("SELECT name FROM schema_migrations")}
            for name, sql in migration_files():
                if name in done:
                    continue
                await conn.execute(sql)
                await conn.execute("INSERT INTO schema_migrations (name) VALUES ($1)", name)
                applied.append(name)
                log.info("migration applied", migration=name)
    finally:
        await conn.close()
    return applied
