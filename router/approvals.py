"""Model approval: a model group is used only once someone approved it.

Every approval and revocation is a row (who, when, why) that is never
changed or deleted: the history is the record. A model's latest row says
whether it is approved now. `modelyard models list|approve|revoke` and the
admin API call these functions; admission reads `approved()` through a
cache refreshed every few seconds.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

import asyncpg
import msgspec

Conn = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy


class Decision(msgspec.Struct, kw_only=True):
    """One approval or revocation."""

    model: str
    action: Literal["approve", "revoke"]
    actor: str
    note: str
    at: datetime


async def record(
    conn: Conn, model: str, action: Literal["approve", "revoke"], *, actor: str, note: str = ""
) -> Decision:
    """Approve or revoke a model now, as `actor`."""
    if not actor.strip():
        raise ValueError("say who decides (--by): approvals are a record of who did what")
    row = await conn.fetchrow(
        "INSERT INTO model_approvals (model, action, actor, note) VALUES ($1, $2, $3, $4) "
        "RETURNING model, action, actor, note, at",
        model,
        action,
        actor,
        note,
    )
    assert row is not None
    return Decision(**dict(row))


async def latest(conn: Conn) -> dict[str, Decision]:
    """Each model's latest decision."""
    rows = await conn.fetch(
        "SELECT DISTINCT ON (model) model, action, actor, note, at "
        "FROM model_approvals ORDER BY model, id DESC"
    )
    return {row["model"]: Decision(**dict(row)) for row in rows}


async def history(conn: Conn, model: str | None = None) -> list[Decision]:
    """Every decision, oldest first (for one model when named)."""
    rows = await conn.fetch(
        "SELECT model, action, actor, note, at FROM model_approvals "
        "WHERE $1::text IS NULL OR model = $1 ORDER BY id",
        model,
    )
    return [Decision(**dict(row)) for row in rows]


async def approved(conn: Conn) -> set[str]:
    """The models approved now."""
    return {model for model, d in (await latest(conn)).items() if d.action == "approve"}
