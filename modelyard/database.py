"""The database layer every role shares: pools, and which errors pass.

Roles reach Postgres only through here. A role that cannot reach the
database at start says so in one line naming the server (password hidden);
once running, a transient failure (a restart, a dropped connection, a
deadlock) is retried by the caller, and only data Postgres refuses is not.
"""

from __future__ import annotations

import asyncpg

from modelyard.broker import without_password

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


def unreachable(url: str, exc: BaseException) -> ConnectionError:
    """The error for a database that cannot be reached, naming it (password hidden)."""
    return ConnectionError(f"cannot connect to PostgreSQL at {without_password(url)}: {exc}")


async def create_pool(url: str, *, max_size: int = 2) -> asyncpg.Pool:
    """A small connection pool, or a `ConnectionError` naming the server."""
    try:
        return await asyncpg.create_pool(url, min_size=1, max_size=max_size)
    except (OSError, asyncpg.PostgresError) as exc:
        raise unreachable(url, exc) from exc
