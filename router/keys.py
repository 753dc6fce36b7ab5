"""Virtual keys: who a job is for, proven by a secret modelyard issued.

A key is `my-` and 32 URL-safe characters (192 random bits). It is shown once,
when created or rotated; the database keeps its SHA-256 and a short prefix to
recognise it in lists. A key belongs to a principal (team, project, user),
may expire, may be limited to some models and to deployments with some tags,
and carries free metadata.

The admin CLI (`modelyard keys ...`) and, later, the admin HTTP API call the
functions here. Admission looks keys up through `KeyCache`, which asks the
database again after `ttl_s`: a revoked or expired key stops working on every
router within that time (polling, a few seconds by default, rather than a
notification a router could miss while reconnecting).
"""

from __future__ import annotations

import hashlib
import secrets
import time
from datetime import datetime
from typing import Any

import asyncpg
import msgspec

from schemas.jobs import KEY_PREFIX


class KeyRecord(msgspec.Struct, kw_only=True):
    """A key as stored (never its secret)."""

    id: str
    prefix: str
    name: str = ""
    team: str | None = None
    project: str | None = None
    user: str | None = None
    allowed_models: list[str] | None = None
    allowed_tags: list[str] | None = None
    metadata: dict[str, Any] = msgspec.field(default_factory=dict)
    created_at: datetime | None = None
    expires_at: datetime | None = None
    revoked_at: datetime | None = None
    replaced_by: str | None = None
    lineage: str = ""
    """The first key's id, shared by every key that replaced it by rotation:
    what owns the files and batches made with any of them."""
    rpm: int | None = None
    tpm: int | None = None

    def refusal(self, now: datetime) -> str | None:
        """Why this key may not be used now, or None."""
        if self.revoked_at is not None and self.revoked_at <= now:
            replaced = f"; it was rotated, use {self.replaced_by}" if self.replaced_by else ""
            return f"key {self.id} was revoked{replaced}"
        if self.expires_at is not None and self.expires_at <= now:
            return f"key {self.id} expired at {self.expires_at.isoformat()}"
        return None


class Issued(msgspec.Struct, kw_only=True):
    """A new key: its record, and the secret shown this once."""

    record: KeyRecord
    secret: str


def new_secret() -> str:
    """A fresh key secret."""
    return KEY_PREFIX + secrets.token_urlsafe(24)


def digest(secret: str) -> bytes:
    """What the database keeps of a secret."""
    return hashlib.sha256(secret.encode("utf-8")).digest()


_COLUMNS = (
    "id, prefix, name, team, project, user_id, allowed_models, allowed_tags, metadata, "
    "created_at, expires_at, revoked_at, replaced_by, lineage, rpm, tpm"
)


def _record(row: asyncpg.Record) -> KeyRecord:
    return KeyRecord(
        id=row["id"],
        prefix=row["prefix"],
        name=row["name"],
        team=row["team"],
        project=row["project"],
        user=row["user_id"],
        allowed_models=row["allowed_models"],
        allowed_tags=row["allowed_tags"],
        metadata=msgspec.json.decode(row["metadata"]) if row["metadata"] else {},
        created_at=row["created_at"],
        expires_at=row["expires_at"],
        revoked_at=row["revoked_at"],
        replaced_by=row["replaced_by"],
        lineage=row["lineage"],
        rpm=row["rpm"],
        tpm=row["tpm"],
    )


async def create(
    conn: asyncpg.Connection | asyncpg.pool.PoolConnectionProxy,
    *,
    name: str = "",
    team: str | None = None,
    project: str | None = None,
    user: str | None = None,
    allowed_models: list[str] | None = None,
    allowed_tags: list[str] | None = None,
    metadata: dict[str, Any] | None = None,
    expires_at: datetime | None = None,
    rpm: int | None = None,
    tpm: int | None = None,
    lineage: str | None = None,
) -> Issued:
    """Issue a key for a principal; the secret is in the answer and nowhere
    else. `lineage` is given only by a rotation (a new key starts its own)."""
    if team is None and project is None and user is None:
        raise ValueError("a key must belong to a team, a project or a user")
    if (rpm is not None and rpm < 1) or (tpm is not None and tpm < 1):
        raise ValueError("rpm and tpm are positive numbers (leave them out for no limit)")
    secret = new_secret()
    row = await conn.fetchrow(
        f"""
        INSERT INTO api_keys (id, secret_hash, prefix, name, team, project, user_id,
                              allowed_models, allowed_tags, metadata, expires_at, rpm, tpm,
                              lineage)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, COALESCE($14, $1))
        RETURNING {_COLUMNS}
        """,
        "key_" + secrets.token_hex(8),
        digest(secret),
        secret[: len(KEY_PREFIX) + 6],
        name,
        team,
        project,
        user,
        allowed_models,
        allowed_tags,
        msgspec.json.encode(metadata or {}).decode(),
        expires_at,
        rpm,
        tpm,
        lineage,
    )
    assert row is not None
    return Issued(record=_record(row), secret=secret)


async def by_id(
    conn: asyncpg.Connection | asyncpg.pool.PoolConnectionProxy, key_id: str
) -> KeyRecord | None:
    """A key's record by its id (revoked or not), or None."""
    row = await conn.fetchrow(f"SELECT {_COLUMNS} FROM api_keys WHERE id = $1", key_id)
    return _record(row) if row is not None else None


async def newest_of(
    conn: asyncpg.Connection | asyncpg.pool.PoolConnectionProxy, lineage: str
) -> KeyRecord | None:
    """The latest key of a lineage (the one every rotation led to), or None."""
    row = await conn.fetchrow(
        f"SELECT {_COLUMNS} FROM api_keys WHERE lineage = $1 ORDER BY created_at DESC LIMIT 1",
        lineage,
    )
    return _record(row) if row is not None else None


async def listing(
    conn: asyncpg.Connection | asyncpg.pool.PoolConnectionProxy, *, include_revoked: bool = False
) -> list[KeyRecord]:
    """Every key, newest first (revoked ones only when asked)."""
    where = "" if include_revoked else "WHERE revoked_at IS NULL"
    rows = await conn.fetch(f"SELECT {_COLUMNS} FROM api_keys {where} ORDER BY created_at DESC")
    return [_record(row) for row in rows]


async def revoke(conn: asyncpg.Connection | asyncpg.pool.PoolConnectionProxy, key_id: str) -> bool:
    """Revoke a key now; False when no such live key exists."""
    done = await conn.execute(
        "UPDATE api_keys SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL", key_id
    )
    return bool(done.endswith(" 1"))


async def rotate(
    conn: asyncpg.Connection | asyncpg.pool.PoolConnectionProxy,
    key_id: str,
    *,
    grace_s: float = 0.0,
) -> Issued | None:
    """A new key with the old one's principal, limits and metadata; the old
    one stops working after `grace_s` (so callers can switch over). None
    when no such live key exists."""
    async with conn.transaction():
        row = await conn.fetchrow(
            f"SELECT {_COLUMNS} FROM api_keys WHERE id = $1 AND revoked_at IS NULL FOR UPDATE",
            key_id,
        )
        if row is None:
            return None
        old = _record(row)
        issued = await create(
            conn,
            name=old.name,
            team=old.team,
            project=old.project,
            user=old.user,
            allowed_models=old.allowed_models,
            allowed_tags=old.allowed_tags,
            metadata=old.metadata,
            expires_at=old.expires_at,
            rpm=old.rpm,
            tpm=old.tpm,
            lineage=old.lineage,
        )
        await conn.execute(
            "UPDATE api_keys SET revoked_at = now() + make_interval(secs => $2), "
            "replaced_by = $3 WHERE id = $1",
            key_id,
            grace_s,
            issued.record.id,
        )
    return issued


class KeyCache:
    """Keys by secret digest, each looked up again after `ttl_s`."""

    def __init__(self, ttl_s: float = 2.0) -> None:
        self.ttl_s = ttl_s
        self._known: dict[bytes, tuple[float, KeyRecord | None]] = {}

    def cached(self, secret: str, now: float | None = None) -> tuple[bool, KeyRecord | None]:
        """(known, record): whether the cache can answer for `secret` now."""
        hit = self._known.get(digest(secret))
        if hit is None or hit[0] <= (time.monotonic() if now is None else now):
            return False, None
        return True, hit[1]

    async def lookup(
        self, conn: asyncpg.Connection | asyncpg.pool.PoolConnectionProxy, secrets_: list[str]
    ) -> dict[str, KeyRecord | None]:
        """The records of these secrets (None for an unknown one), one query
        for all those the cache cannot answer."""
        now = time.monotonic()
        out: dict[str, KeyRecord | None] = {}
        missing: dict[bytes, str] = {}
        for secret in secrets_:
            known, record = self.cached(secret, now)
            if known:
                out[secret] = record
            else:
                missing[digest(secret)] = secret
        if missing:
            rows = await conn.fetch(
                f"SELECT secret_hash, {_COLUMNS} FROM api_keys "
                "WHERE secret_hash = ANY($1::bytea[])",
                list(missing),
            )
            found = {bytes(row["secret_hash"]): _record(row) for row in rows}
            for hashed, secret in missing.items():
                record = found.get(hashed)
                self._known[hashed] = (now + self.ttl_s, record)
                out[secret] = record
        if len(self._known) > 100_000:  # keys come and go; the cache must not grow forever
            self._known = {k: v for k, v in self._known.items() if v[0] > now}
        return out
