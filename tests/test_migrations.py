"""Migrations that rewrite data: run against a database holding what the
older schema allowed."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg

from router import keys
from tests.services import fresh_database


def test_the_lineage_migration_gives_rotated_keys_their_first_keys_files_and_batches() -> None:
    """Keys rotated before lineages existed: the migration finds each chain's
    first key and moves the files and batches of any key in it there."""
    with fresh_database(migrated=False) as url:
        lineages, owners, batch_owner, newest = asyncio.run(_migrate_old_keys(url))
    assert lineages == {"k1": "k1", "k2": "k1", "k3": "k1", "k9": "k9"}
    assert owners == {"f2": "k1", "f9": "k9"}
    assert batch_owner == "k1"
    assert newest is not None
    assert newest.id == "k3"


async def _migrate_old_keys(url: str) -> tuple[Any, Any, Any, Any]:
    """Migrations up to 0010, keys rotated then, their files and batches; then 0011."""
    from modelyard import database  # noqa: PLC0415

    conn = await asyncpg.connect(url)
    try:
        await conn.execute(database._TRACKING)
        for name, sql in database.migration_files():
            if name >= "0011":
                break
            await conn.execute(sql)
            await conn.execute("INSERT INTO schema_migrations (name) VALUES ($1)", name)
        for key_id, replaced_by in (("k1", "k2"), ("k2", "k3"), ("k3", None), ("k9", None)):
            await conn.execute(
                "INSERT INTO api_keys (id, secret_hash, prefix, team, replaced_by) "
                "VALUES ($1, $2, 'my-', 't', $3)",
                key_id,
                key_id.encode(),
                replaced_by,
            )
        await conn.execute(
            "INSERT INTO batch_files (id, purpose, filename, bytes, content, owner_key) "
            "VALUES ('f2', 'batch', 'a', 0, '', 'k2'), ('f9', 'batch', 'b', 0, '', 'k9')"
        )
        await conn.execute(
            "INSERT INTO batches (id, input_file_id, endpoint, completion_window, status, "
            "owner_key, expires_at) "
            "VALUES ('b3', 'f2', '/v1/chat/completions', '24h', 'completed', 'k3', now())"
        )
        assert await database.migrate(url) == ["0011_key_lineage.sql"]
        lineages = dict(await conn.fetch("SELECT id, lineage FROM api_keys"))
        owners = dict(await conn.fetch("SELECT id, owner_key FROM batch_files"))
        batch_owner = await conn.fetchval("SELECT owner_key FROM batches")
        newest = await keys.newest_of(conn, "k1")
    finally:
        await conn.close()
    return lineages, owners, batch_owner, newest
