"""The database layer every role shares: pools, migrations, and which errors pass.

Roles reach Postgres only through here. A role that cannot reach the
database at start says so in one line naming the server (password hidden);
once running, a transient failure (a restart, a dropped connection, a
deadlock) is tried again by `Database.run`, and only data Postgres refuses
is not. Every table's schema is one ordered sequence of SQL files in
`modelyard/migrations/`, applied once each by `modelyard migrate`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import structlog
from asyncpg.pool import PoolConnectionProxy

from modelyard.broker import without_password

log = structlog.get_logger("modelyard.database")

T = TypeVar("T")

# A plain connection or one borrowed from a pool.
Conn = asyncpg.Connection | PoolConnectionProxy

# Errors that retrying cannot fix: the data itself is unacceptable.
BAD_DATA = (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError)

# Everything else the database or the driver can raise passes: down,
# restarting, out of connections, a deadlock, a connection the pool lost
# mid-query (`InternalClientError`).
TRANSIENT = (
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
)

MAX_BACKOFF_S = 5.0


def unreachable(url: str, exc: BaseException) -> ConnectionError:
    """The error for a database that cannot be reached, naming it (password hidden)."""
    return ConnectionError(f"cannot connect to PostgreSQL at {without_password(url)}: {exc}")


async def create_pool(url: str, *, max_size: int = 2) -> asyncpg.Pool:
    """A small connection pool, or a `ConnectionError` naming the server."""
    try:
        return await asyncpg.create_pool(url, min_size=1, max_size=max_size)
    except (OSError, asyncpg.PostgresError) as exc:
        raise unreachable(url, exc) from exc


class Database:
    """One role's pool, and work on it tried again while the database passes
    through trouble."""

    def __init__(self, url: str, *, max_size: int = 4) -> None:
        self.url = url
        self.max_size = max_size
        self._pool: asyncpg.Pool | None = None
        self._opening = asyncio.Lock()

    async def open(self) -> None:
        """Connect (a `ConnectionError` naming the server when it cannot).
        Callers racing to open it share one pool (a second would leak)."""
        if self._pool is not None:
            return
        async with self._opening:
            if self._pool is None:
                self._pool = await create_pool(self.url, max_size=self.max_size)

    async def close(self) -> None:
        """Close the pool."""
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    @property
    def pool(self) -> asyncpg.Pool:
        """The open pool."""
        assert self._pool is not None, "Database.open() first"
        return self._pool

    async def run(
        self,
        work: Callable[[Conn], Awaitable[T]],
        *,
        what: str,
        give_up_after_s: float | None = None,
    ) -> T:
        """`work` on a pooled connection inside a transaction. A transient
        failure is tried again with backoff, for ever or for up to
        `give_up_after_s` (then it is raised); data Postgres refuses
        (`BAD_DATA`) is raised at once."""
        started = time.monotonic()
        backoff = 0.1
        while True:
            try:
                await self.open()
                async with self.pool.acquire() as conn, conn.transaction():
                    return await work(conn)
            except BAD_DATA:
                raise
            except (*TRANSIENT, ConnectionError) as exc:
                if give_up_after_s is not None and (
                    time.monotonic() - started + backoff > give_up_after_s
                ):
                    raise
                log.warning(f"{what} failed; retrying", error=str(exc), retry_in_s=backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)


# Migrations.

_TRACKING = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    name       text PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


def migration_files() -> list[tuple[str, str]]:
    """(name, sql) of every bundled migration, in order."""
    folder = resources.files("modelyard") / "migrations"
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
    """Create the database if needed and apply pending migrations, in order;
    returns the names applied. Safe to run concurrently."""
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
