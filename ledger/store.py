"""Ledger writes: a whole batch of cost events in one statement, idempotently.

The insert and the daily rollup share one statement: the rollup only adds the
rows the insert actually wrote (`RETURNING`), so a redelivered event changes
neither the ledger nor the totals.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import asyncpg
import structlog
from asyncpg.pool import PoolConnectionProxy

from modelyard.budgets import ALERTS, RELEASE, SETTLE_CTE
from schemas.costs import BudgetAlert, CostEvent

log = structlog.get_logger("modelyard.ledger")

# A plain connection or one borrowed from a pool.
Conn = asyncpg.Connection | PoolConnectionProxy

_COLUMNS: tuple[tuple[str, str], ...] = (
    ("event_id", "uuid"),
    ("occurred_at", "timestamptz"),
    ("job_id", "text"),
    ("key_id", "text"),
    ("team", "text"),
    ("project", "text"),
    ("user_id", "text"),
    ("batch_id", "text"),
    ("custom_id", "text"),
    ("provider", "text"),
    ("deployment", "text"),
    ("provider_model", "text"),
    ("model", "text"),
    ("provider_request_id", "text"),
    ("input_tokens", "int8"),
    ("output_tokens", "int8"),
    ("cache_read_tokens", "int8"),
    ("cache_write_tokens", "int8"),
    ("reasoning_tokens", "int8"),
    ("cost", "numeric"),
    ("currency", "text"),
    ("price_source", "text"),
    ("status", "text"),
    ("latency_ms", "float8"),
    ("raw_usage", "jsonb"),
    ("reservation", "text"),
)

_NAMES = ", ".join(name for name, _ in _COLUMNS)
_UNNEST = ", ".join(f"${i}::{kind}[]" for i, (_, kind) in enumerate(_COLUMNS, start=1))

INSERT_BATCH = f"""
WITH inserted AS (
    INSERT INTO ledger ({_NAMES})
    SELECT * FROM unnest({_UNNEST})
    ON CONFLICT DO NOTHING
    RETURNING *
),
daily AS (
INSERT INTO ledger_daily AS d
SELECT (occurred_at AT TIME ZONE 'UTC')::date, coalesce(team, ''), coalesce(project, ''),
       coalesce(key_id, ''), model, provider, deployment, provider_model,
       count(*), sum(input_tokens), sum(output_tokens), sum(cache_read_tokens),
       sum(cache_write_tokens), sum(reasoning_tokens), coalesce(sum(cost), 0),
       count(*) FILTER (WHERE cost IS NULL)
FROM inserted
GROUP BY 1, 2, 3, 4, 5, 6, 7, 8
ORDER BY 1, 2, 3, 4, 5, 6, 7, 8
ON CONFLICT (day, team, project, key_id, model, provider, deployment, provider_model)
DO UPDATE SET
    calls = d.calls + excluded.calls,
    input_tokens = d.input_tokens + excluded.input_tokens,
    output_tokens = d.output_tokens + excluded.output_tokens,
    cache_read_tokens = d.cache_read_tokens + excluded.cache_read_tokens,
    cache_write_tokens = d.cache_write_tokens + excluded.cache_write_tokens,
    reasoning_tokens = d.reasoning_tokens + excluded.reasoning_tokens,
    cost = d.cost + excluded.cost,
    unpriced_calls = d.unpriced_calls + excluded.unpriced_calls
RETURNING 1
),
{SETTLE_CTE}
SELECT count(*) FROM inserted
"""


def _row(e: CostEvent) -> tuple[object, ...]:
    u = e.usage
    return (
        e.event_id,
        e.occurred_at,
        e.job_id,
        e.key_id,
        e.team,
        e.project,
        e.user,
        e.batch_id,
        e.custom_id,
        e.provider,
        e.deployment,
        e.provider_model,
        e.model,
        e.provider_request_id,
        u.input_tokens,
        u.output_tokens,
        u.cache_read_tokens,
        u.cache_write_tokens,
        u.reasoning_tokens,
        e.cost,
        e.currency,
        e.price_source,
        e.status,
        e.latency_ms,
        None if e.raw_usage is None else json.dumps(e.raw_usage),
        e.reservation,
    )


def columns(events: list[CostEvent]) -> list[list[object]]:
    """The batch transposed into one array per column, for `unnest`."""
    rows = [_row(e) for e in events]
    return [list(col) for col in zip(*rows, strict=True)] if rows else [[] for _ in _COLUMNS]


async def write_batch(
    conn: Conn, events: list[CostEvent], releases: list[str] | None = None
) -> list[BudgetAlert]:
    """In one transaction: insert the events, their daily rollup and their
    spend against every budget they fall under (duplicates are ignored, so
    none of this counts twice), then release the budget reservations of
    jobs that ended. Returns the budgets whose spend crossed their alert
    share just now (each once per period)."""
    ended = [e.reservation for e in events if e.final and e.reservation] + (releases or [])
    async with conn.transaction():
        if events:
            await conn.execute(INSERT_BATCH, *columns(events))
        if ended:
            await conn.execute(RELEASE, ended)
        crossed = await conn.fetch(ALERTS) if events else []
    return [
        BudgetAlert(
            scope=row["scope"],
            subject=row["subject"],
            period=row["period"],
            period_start=row["period_start"],
            spent=row["spent"],
            limit=row["limit_usd"],
            alert_share=row["alert_share"],
        )
        for row in crossed
    ]


async def ensure_partitions(conn: Conn, now: datetime | None = None) -> None:
    """Make sure this month's and next month's partitions exist.

    If rows for a month already sit in the default partition (the ledger ran
    past the horizon `migrate` prepared), that month's partition cannot be
    created; its rows stay in the default partition, which reports read like
    any other, and the condition is logged for an operator to fix.
    """
    today = (now or datetime.now(UTC)).date()
    for day in (today, today.replace(day=1) + timedelta(days=32)):
        try:
            await conn.execute("SELECT ledger_ensure_partition($1)", day)
        except asyncpg.CheckViolationError as exc:
            log.warning(
                "month partition not created; rows stay in ledger_default",
                month=str(day),
                error=str(exc),
            )
