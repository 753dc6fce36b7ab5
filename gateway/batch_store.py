"""Files and batches of the OpenAI Batch API, in Postgres: every gateway
instance sees the same ones, and a restart loses none.

A batch's lines live in `batch_lines`, each `pending` (not sent yet),
`sent` (confirmed on a pool's queue) or `done` (its output line written).
Request counts are counted from them, so they are never out of step with
what was recorded. Whoever runs a batch holds its lease (`runner`,
`lease_until`); a lease left to lapse (a gateway killed) is taken over.
"""

from __future__ import annotations

import secrets
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import msgspec

from modelyard.database import Conn

FILE_PREFIX = "file-"
BATCH_PREFIX = "batch_"
# Statuses in which a batch still needs a runner.
LIVE = ("validating", "in_progress", "cancelling", "finalizing")


def new_id(prefix: str) -> str:
    """An id in OpenAI's style (`file-...`, `batch_...`)."""
    return prefix + secrets.token_hex(12)


def _ts(value: datetime | None) -> int | None:
    return int(value.timestamp()) if value is not None else None


# --- files ------------------------------------------------------------------


async def add_file(
    conn: Conn, *, purpose: str, filename: str, content: bytes, owner: str | None
) -> dict[str, Any]:
    """Store an uploaded (or produced) file; its OpenAI `file` object."""
    row = await conn.fetchrow(
        "INSERT INTO batch_files (id, purpose, filename, bytes, content, owner_key) "
        "VALUES ($1, $2, $3, $4, $5, $6) RETURNING id, purpose, filename, bytes, created_at",
        new_id(FILE_PREFIX),
        purpose,
        filename,
        len(content),
        content,
        owner,
    )
    return file_object(row)


def file_object(row: Any) -> dict[str, Any]:
    """OpenAI's `file` object."""
    return {
        "id": row["id"],
        "object": "file",
        "bytes": row["bytes"],
        "created_at": _ts(row["created_at"]),
        "filename": row["filename"],
        "purpose": row["purpose"],
        "status": "processed",
        "expires_at": None,
        "status_details": None,
    }


async def get_file(conn: Conn, file_id: str, owner: str | None) -> Any:
    """A live file of this owner (content included), or None."""
    return await conn.fetchrow(
        "SELECT id, purpose, filename, bytes, created_at, content FROM batch_files "
        "WHERE id = $1 AND owner_key IS NOT DISTINCT FROM $2 AND deleted_at IS NULL",
        file_id,
        owner,
    )


async def delete_file(conn: Conn, file_id: str, owner: str | None) -> bool:
    """Delete a file (its content is dropped); False when there is none."""
    done = await conn.execute(
        "UPDATE batch_files SET deleted_at = now(), content = '' "
        "WHERE id = $1 AND owner_key IS NOT DISTINCT FROM $2 AND deleted_at IS NULL",
        file_id,
        owner,
    )
    return bool(done.endswith(" 1"))


# --- batches ----------------------------------------------------------------


class Owner(msgspec.Struct, frozen=True):
    """Who a batch is for: the key that created it, and its principal."""

    key_id: str | None = None
    team: str | None = None
    project: str | None = None
    user: str | None = None


async def create_batch(
    conn: Conn,
    *,
    input_file_id: str,
    endpoint: str,
    window: timedelta,
    metadata: dict[str, str] | None,
    owner: Owner,
) -> dict[str, Any]:
    """A new batch, `validating` until a runner reads its file."""
    row = await conn.fetchrow(
        "INSERT INTO batches (id, input_file_id, endpoint, completion_window, status, "
        "owner_key, team, project, user_id, metadata, expires_at) "
        "VALUES ($1, $2, $3, $4, 'validating', $5, $6, $7, $8, $9, now() + $10::interval) "
        "RETURNING *",
        new_id(BATCH_PREFIX),
        input_file_id,
        endpoint,
        f"{int(window.total_seconds() // 3600)}h",
        owner.key_id,
        owner.team,
        owner.project,
        owner.user,
        msgspec.json.encode(metadata).decode() if metadata else None,
        window,
    )
    return await batch_object(conn, row)


async def get_batch(conn: Conn, batch_id: str, owner: str | None) -> Any:
    """A batch of this owner, or None."""
    return await conn.fetchrow(
        "SELECT * FROM batches WHERE id = $1 AND owner_key IS NOT DISTINCT FROM $2",
        batch_id,
        owner,
    )


async def list_batches(
    conn: Conn, owner: str | None, *, after: str | None, limit: int
) -> tuple[list[Any], bool]:
    """This owner's batches, newest first, after the batch `after`; whether more follow."""
    rows = await conn.fetch(
        "SELECT * FROM batches WHERE owner_key IS NOT DISTINCT FROM $1 "
        "AND ($2::text IS NULL OR (created_at, id) < "
        "    (SELECT created_at, id FROM batches WHERE id = $2 "
        "     AND owner_key IS NOT DISTINCT FROM $1)) "
        "ORDER BY created_at DESC, id DESC LIMIT $3",
        owner,
        after,
        limit + 1,
    )
    return list(rows[:limit]), len(rows) > limit


async def cancel(conn: Conn, batch_id: str, owner: str | None) -> Any:
    """Ask a live batch to stop (`cancelling`); the batch as it is now, or None."""
    await conn.execute(
        "UPDATE batches SET status = 'cancelling', cancelling_at = now() "
        "WHERE id = $1 AND owner_key IS NOT DISTINCT FROM $2 "
        "AND status IN ('validating', 'in_progress')",
        batch_id,
        owner,
    )
    return await get_batch(conn, batch_id, owner)


async def counts(conn: Conn, batch_id: str) -> dict[str, Any]:
    """Lines by outcome, and the cost so far."""
    row = await conn.fetchrow(
        "SELECT count(*) AS total, count(*) FILTER (WHERE state = 'done' AND NOT failed) AS ok, "
        "count(*) FILTER (WHERE state = 'done' AND failed) AS failed, "
        "count(*) FILTER (WHERE state = 'pending') AS pending, "
        "count(*) FILTER (WHERE state = 'sent') AS sent, "
        "coalesce(sum(cost), 0) AS cost FROM batch_lines WHERE batch_id = $1",
        batch_id,
    )
    assert row is not None
    return dict(row)


async def batch_object(conn: Conn, row: Any) -> dict[str, Any]:
    """OpenAI's `batch` object; modelyard's cost in the `modelyard` extension field."""
    tally = await counts(conn, row["id"])
    cost = row["cost"] if row["status"] in ("completed", "cancelled", "expired") else tally["cost"]
    errors = msgspec.json.decode(row["errors"]) if row["errors"] else None
    return {
        "id": row["id"],
        "object": "batch",
        "endpoint": row["endpoint"],
        "errors": {"object": "list", "data": errors} if errors else None,
        "input_file_id": row["input_file_id"],
        "completion_window": row["completion_window"],
        "status": row["status"],
        "output_file_id": row["output_file_id"],
        "error_file_id": row["error_file_id"],
        "created_at": _ts(row["created_at"]),
        "in_progress_at": _ts(row["in_progress_at"]),
        "expires_at": _ts(row["expires_at"]),
        "finalizing_at": _ts(row["finalizing_at"]),
        "completed_at": _ts(row["completed_at"]),
        "failed_at": _ts(row["failed_at"]),
        "expired_at": _ts(row["expired_at"]),
        "cancelling_at": _ts(row["cancelling_at"]),
        "cancelled_at": _ts(row["cancelled_at"]),
        "request_counts": {
            "total": tally["total"],
            "completed": tally["ok"],
            "failed": tally["failed"],
        },
        "metadata": msgspec.json.decode(row["metadata"]) if row["metadata"] else None,
        "modelyard": {"cost": str(Decimal(cost))},
    }


# --- running ----------------------------------------------------------------


async def claim(conn: Conn, runner: str, lease: timedelta, limit: int) -> list[str]:
    """Live batches nobody holds (or whose holder let the lease lapse), now held by `runner`."""
    rows = await conn.fetch(
        "UPDATE batches SET runner = $1, lease_until = now() + $2::interval WHERE id IN ("
        "  SELECT id FROM batches WHERE status = ANY($3::text[]) "
        "  AND (lease_until IS NULL OR lease_until < now()) "
        "  ORDER BY created_at LIMIT $4 FOR UPDATE SKIP LOCKED) RETURNING id",
        runner,
        lease,
        list(LIVE),
        limit,
    )
    return [row["id"] for row in rows]


async def renew(conn: Conn, runner: str, batch_ids: list[str], lease: timedelta) -> set[str]:
    """Extend this runner's leases; the batches it still holds."""
    rows = await conn.fetch(
        "UPDATE batches SET lease_until = now() + $3::interval "
        "WHERE id = ANY($2::text[]) AND runner = $1 RETURNING id",
        runner,
        batch_ids,
        lease,
    )
    return {row["id"] for row in rows}


async def release(conn: Conn, runner: str, batch_ids: list[str]) -> None:
    """Give up leases now (a clean stop), so another runner takes over at once."""
    await conn.execute(
        "UPDATE batches SET lease_until = NULL WHERE id = ANY($2::text[]) AND runner = $1",
        runner,
        batch_ids,
    )


class LeaseLost(Exception):
    """This runner no longer holds the batch (another took it over, or it
    is finished): whatever it was about to write is not written."""


async def fence(conn: Conn, batch_id: str, runner: str) -> str:
    """Lock the batch for this transaction if `runner` still holds it and it
    is live; its status. Every write of a runner goes through here, so a
    runner that lost its lease (stalled past it) cannot send or finish a
    batch another runner now holds."""
    status = await conn.fetchval(
        "SELECT status FROM batches WHERE id = $1 AND runner = $2 AND lease_until > now() "
        "AND status = ANY($3::text[]) FOR UPDATE",
        batch_id,
        runner,
        list(LIVE),
    )
    if status is None:
        raise LeaseLost(batch_id)
    return str(status)


async def set_status(conn: Conn, batch_id: str, status: str, **columns: Any) -> None:
    """Move a batch to `status`, stamping `<status>_at` where it has one."""
    stamp = {"in_progress", "finalizing", "completed", "failed", "cancelled", "expired"}
    sets = ["status = $2"] + ([f"{status}_at = now()"] if status in stamp else [])
    values = [batch_id, status]
    for name, value in columns.items():
        values.append(value)
        sets.append(f"{name} = ${len(values)}")
    await conn.execute(f"UPDATE batches SET {', '.join(sets)} WHERE id = $1", *values)


async def add_lines(
    conn: Conn, batch_id: str, lines: list[tuple[int, str, str, bytes | None, bytes | None, bool]]
) -> None:
    """A batch's lines: (line, custom_id, job_id, job to send or None, output or None, failed)."""
    await conn.executemany(
        "INSERT INTO batch_lines (batch_id, line, custom_id, job_id, state, body, output, failed) "
        "VALUES ($1, $2, $3, $4, CASE WHEN $6::bytea IS NULL THEN 'pending' ELSE 'done' END, "
        "$5, $6, $7) ON CONFLICT DO NOTHING",
        [
            (batch_id, n, cid, job_id, body, out, failed)
            for n, cid, job_id, body, out, failed in lines
        ],
    )


async def pending(conn: Conn, batch_id: str, limit: int) -> list[Any]:
    """The next lines to send."""
    return list(
        await conn.fetch(
            "SELECT line, custom_id, body FROM batch_lines "
            "WHERE batch_id = $1 AND state = 'pending' ORDER BY line LIMIT $2",
            batch_id,
            limit,
        )
    )


async def mark_sent(conn: Conn, batch_id: str, lines: list[int]) -> None:
    """Lines confirmed on a pool's queue: their answers are awaited, never sent again."""
    await conn.execute(
        "UPDATE batch_lines SET state = 'sent' WHERE batch_id = $1 AND line = ANY($2::int[]) "
        "AND state = 'pending'",
        batch_id,
        lines,
    )


async def record(
    conn: Conn, batch_id: str, answers: list[tuple[str, bytes, bool, Decimal | None]]
) -> None:
    """Answers (job id, output line, failed, cost) onto their lines, each once."""
    await conn.executemany(
        "UPDATE batch_lines SET state = 'done', output = $3, failed = $4, cost = $5, body = NULL "
        "WHERE batch_id = $1 AND job_id = $2 AND state <> 'done'",
        [(batch_id, job_id, out, failed, cost) for job_id, out, failed, cost in answers],
    )


async def settle_unanswered(
    conn: Conn, batch_id: str, output: list[tuple[int, bytes]], states: tuple[str, ...]
) -> None:
    """Lines in `states` answered with their error lines (a cancel: those
    never sent; an expiry: those never answered)."""
    await conn.executemany(
        "UPDATE batch_lines SET state = 'done', output = $3, failed = true, body = NULL "
        "WHERE batch_id = $1 AND line = $2 AND state = ANY($4::text[])",
        [(batch_id, line, out, list(states)) for line, out in output],
    )


async def unanswered(conn: Conn, batch_id: str, states: tuple[str, ...]) -> list[Any]:
    """Lines in `states`: their number, custom_id and job id."""
    return list(
        await conn.fetch(
            "SELECT line, custom_id, job_id FROM batch_lines "
            "WHERE batch_id = $1 AND state = ANY($2::text[]) ORDER BY line",
            batch_id,
            list(states),
        )
    )


async def outputs(conn: Conn, batch_id: str, failed: bool) -> bytes:
    """The output (or error) file's content: each line's output, in input order."""
    rows = await conn.fetch(
        "SELECT output FROM batch_lines WHERE batch_id = $1 AND state = 'done' AND failed = $2 "
        "ORDER BY line",
        batch_id,
        failed,
    )
    return b"".join(row["output"] for row in rows)
