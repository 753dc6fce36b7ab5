"""Finance reports from the ledger's daily rollup: exact to the cent, fast."""

from __future__ import annotations

import csv
import io
from datetime import date
from decimal import Decimal
from typing import Any

import asyncpg
import msgspec

DIMENSIONS = (
    "day",
    "team",
    "project",
    "key_id",
    "model",
    "provider",
    "deployment",
    "provider_model",
)
MEASURES = ("calls", "input_tokens", "output_tokens", "cache_read_tokens", "cost", "unpriced_calls")


class ReportError(ValueError):
    """The report cannot be made as asked."""


def report_sql(group_by: list[str]) -> str:
    """SQL over `ledger_daily` grouped by the given dimensions (validated)."""
    unknown = [g for g in group_by if g not in DIMENSIONS]
    if unknown or not group_by:
        raise ReportError(
            f"cannot group by {unknown or '(nothing)'}; choose from {', '.join(DIMENSIONS)}"
        )
    dims = ", ".join(group_by)
    sums = ", ".join(f"sum({m})::{'numeric' if m == 'cost' else 'bigint'} AS {m}" for m in MEASURES)
    return (
        f"SELECT {dims}, {sums} FROM ledger_daily "
        "WHERE day >= $1 AND day <= $2 "
        f"GROUP BY {dims} ORDER BY {dims}"
    )


async def fetch_report(
    conn: asyncpg.Connection, group_by: list[str], since: date, until: date
) -> list[dict[str, Any]]:
    """Rows of the report; empty strings in the rollup read back as '-' (not set)."""
    rows = await conn.fetch(report_sql(group_by), since, until)
    return [{k: ("-" if v == "" else v) for k, v in dict(r).items()} for r in rows]


def render_csv(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """CSV with a header; decimals exact."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: cell(k, v) for k, v in row.items()} for row in rows)
    return buffer.getvalue()


def render_json(rows: list[dict[str, Any]]) -> str:
    """JSON array; costs as exact decimal strings, days as ISO dates."""
    readable = [
        {k: exact(v) if isinstance(v, Decimal) else v for k, v in row.items()} for row in rows
    ]
    return msgspec.json.encode(readable).decode()


LABELS = {
    "input_tokens": "input",
    "output_tokens": "output",
    "cache_read_tokens": "cached",
    "cost": "cost (USD)",
    "unpriced_calls": "unpriced",
}


def exact(value: Decimal) -> str:
    """A decimal without trailing zeros or exponent: 0.017536160000 -> 0.01753616."""
    text = format(value, "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def totals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Each measure summed over the rows (cost stays exact)."""
    return {m: sum((r[m] for r in rows), Decimal(0) if m == "cost" else 0) for m in MEASURES}


def cell(column: str, value: Any) -> str:
    """How a value reads in the table."""
    return exact(value) if isinstance(value, Decimal) else str(value)
