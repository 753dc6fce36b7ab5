"""Hard budgets: reserved before dispatch, settled by the ledger, never overspent.

A budget is a limit in USD on one scope (`global`, or one `team`, `project`,
`user` or `key`) per period (`none`, `daily`, `weekly`, `monthly`, the
boundary taken in the budget's time zone). Each period has its own
`budget_usage` row with `spent` and `reserved`: a new period is a new row,
so at a rollover nothing is reset and nothing vanishes.

1. Admission reserves each job's worst-case cost in every budget the job
   falls under, in one transaction per incoming message, with the usage
   rows locked (in a fixed order, so routers never deadlock each other):
   a job is admitted only if `spent + reserved + its cost <= limit` in all
   of them. However many routers run, they queue on those row locks, so
   the sum of what they admitted never passes the limit.
2. The ledger adds each billed call's real cost to `spent` in the same
   statement that writes its ledger row (only rows actually written: a
   redelivered event counts once), in the period the job was admitted in.
3. The job's last cost event (or, for a job that ends unbilled, a release
   on its own) deletes its reservations and takes them off `reserved`, in
   that same transaction.
4. A reservation nobody settles (its router or worker died at the wrong
   moment) expires after `reservation_ttl_s`; the next admission against
   that budget returns it.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec
import structlog

from modelyard.database import Conn

log = structlog.get_logger("modelyard.budgets")

Scope = Literal["global", "team", "project", "user", "key"]
Period = Literal["none", "daily", "weekly", "monthly"]
SCOPES: tuple[Scope, ...] = ("global", "team", "project", "user", "key")


class Budget(msgspec.Struct, kw_only=True):
    """One budget and its figures in the current period."""

    scope: Scope
    subject: str
    period: Period
    limit: Decimal
    alert_share: Decimal
    timezone: str
    period_start: datetime | None = None
    resets_at: datetime | None = None
    spent: Decimal = Decimal(0)
    reserved: Decimal = Decimal(0)

    @property
    def remaining(self) -> Decimal:
        """What is left to reserve now."""
        return self.limit - self.spent - self.reserved

    def label(self) -> str:
        """How a person names it: `team acme (monthly)`."""
        who = "global" if self.scope == "global" else f"{self.scope} {self.subject}"
        return f"{who} ({self.period})"


class Principal(msgspec.Struct, kw_only=True, frozen=True):
    """Whom a job is for, as far as budgets are concerned."""

    key_id: str | None = None
    team: str | None = None
    project: str | None = None
    user: str | None = None

    def subjects(self) -> list[tuple[Scope, str]]:
        """Every (scope, subject) whose budget the job must fit."""
        out: list[tuple[Scope, str]] = [("global", "")]
        for scope, value in (
            ("team", self.team),
            ("project", self.project),
            ("user", self.user),
            ("key", self.key_id),
        ):
            if value:
                out.append((scope, value))  # type: ignore[arg-type]
        return out


# Spend of the rows a ledger statement inserted (`inserted`), per budget, in
# the period each job was admitted in (or, with no reservation, the period
# the call happened in). Appended as a CTE to the ledger's insert.
SETTLE_CTE = """
settled AS (
    INSERT INTO budget_usage AS u (scope, subject, period_start, spent)
    SELECT b.scope, b.subject,
           coalesce(r.period_start, budget_period_start(b.period, b.timezone, i.occurred_at)),
           sum(i.cost)
    FROM inserted i
    JOIN budgets b ON b.scope = 'global'
        OR (b.scope = 'team' AND b.subject = i.team)
        OR (b.scope = 'project' AND b.subject = i.project)
        OR (b.scope = 'user' AND b.subject = i.user_id)
        OR (b.scope = 'key' AND b.subject = i.key_id)
    LEFT JOIN budget_reservations r
        ON r.reservation = i.reservation AND r.scope = b.scope AND r.subject = b.subject
    WHERE i.cost IS NOT NULL
    GROUP BY 1, 2, 3
    ORDER BY 1, 2, 3
    ON CONFLICT (scope, subject, period_start) DO UPDATE SET spent = u.spent + excluded.spent
    RETURNING 1
)
"""


def _give_back(gone: str) -> str:
    """SQL that deletes the reservations `gone` selects and takes their
    amounts off `reserved` in their usage rows."""
    return f"""
WITH gone AS (
    {gone}
    RETURNING r.scope, r.subject, r.period_start, r.amount
), totals AS (
    SELECT scope, subject, period_start, sum(amount) AS amount FROM gone GROUP BY 1, 2, 3
)
UPDATE budget_usage u SET reserved = greatest(u.reserved - t.amount, 0)
FROM totals t
WHERE u.scope = t.scope AND u.subject = t.subject AND u.period_start = t.period_start
RETURNING u.scope, u.subject, t.amount
"""


# Jobs that ended: their reservations go, and stop counting as reserved.
RELEASE = _give_back("DELETE FROM budget_reservations r WHERE r.reservation = ANY($1::text[])")

# Budgets whose spend crossed their alert share this period, marked so the
# alert is raised once per budget per period.
ALERTS = """
UPDATE budget_usage u SET alerted = true
FROM budgets b
WHERE u.scope = b.scope AND u.subject = b.subject AND NOT u.alerted
  AND u.period_start = budget_period_start(b.period, b.timezone, now())
  AND u.spent >= b.limit_usd * b.alert_share
RETURNING u.scope, u.subject, u.period_start, u.spent, b.limit_usd, b.period, b.alert_share
"""


def reset_text(budget: Budget) -> str:
    """When a budget's period ends, for a person."""
    if budget.resets_at is None:
        return "it does not reset"
    return f"it resets at {budget.resets_at.astimezone(UTC).isoformat(timespec='seconds')}"


def refusal_message(budget: Budget, cost: Decimal) -> str:
    """What `budget_exceeded` says: which budget, its figures, when it resets."""
    return (
        f"budget {budget.label()} would be exceeded: limit ${budget.limit:.2f}, "
        f"spent ${budget.spent:.4f}, reserved ${budget.reserved:.4f}, "
        f"this job may cost up to ${cost:.4f}; {reset_text(budget)}. "
        "Ask its owner to raise it (`modelyard budgets set`), or lower max_tokens."
    )


class Claim(msgspec.Struct, kw_only=True, frozen=True):
    """A job's worst-case cost, to reserve in every budget over its subjects,
    under `reservation` (this admission's own id)."""

    reservation: str
    job_id: str
    amount: Decimal
    subjects: tuple[tuple[Scope, str], ...]


# False: no budget applies; a Budget: refused by it; a Decimal: reserved,
# and the least any of its budgets has left after this reservation.
Verdict = Budget | Decimal | bool

_CURRENT = """
SELECT b.scope, b.subject, b.period, b.limit_usd, b.alert_share, b.timezone,
       budget_period_start(b.period, b.timezone, now()) AS period_start,
       budget_period_end(b.period, b.timezone, now()) AS resets_at
FROM budgets b
JOIN unnest($1::text[], $2::text[]) AS k(scope, subject)
  ON b.scope = k.scope AND b.subject = k.subject
ORDER BY b.scope, b.subject
"""
_ENSURE_USAGE = """
INSERT INTO budget_usage (scope, subject, period_start)
SELECT * FROM unnest($1::text[], $2::text[], $3::timestamptz[])
ON CONFLICT DO NOTHING
"""
_LOCK_USAGE = """
SELECT u.scope, u.subject, u.period_start, u.spent, u.reserved
FROM budget_usage u
JOIN unnest($1::text[], $2::text[], $3::timestamptz[]) AS k(scope, subject, period_start)
  ON u.scope = k.scope AND u.subject = k.subject AND u.period_start = k.period_start
ORDER BY u.scope, u.subject, u.period_start
FOR UPDATE OF u
"""
_WRITE_USAGE = """
UPDATE budget_usage u SET reserved = k.reserved
FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::numeric[])
  AS k(scope, subject, period_start, reserved)
WHERE u.scope = k.scope AND u.subject = k.subject AND u.period_start = k.period_start
"""
_WRITE_RESERVATIONS = """
INSERT INTO budget_reservations
    (reservation, job_id, scope, subject, period_start, amount, expires_at)
SELECT reservation, job_id, scope, subject, period_start, amount, now() + make_interval(secs => $7)
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::timestamptz[], $6::numeric[])
  AS k(reservation, job_id, scope, subject, period_start, amount)
"""


def _budget(row: Any) -> Budget:
    return Budget(
        scope=row["scope"],
        subject=row["subject"],
        period=row["period"],
        limit=row["limit_usd"],
        alert_share=row["alert_share"],
        timezone=row["timezone"],
        period_start=row["period_start"],
        resets_at=row["resets_at"],
    )


async def reserve(conn: Conn, claims: list[Claim], *, ttl_s: float) -> list[Verdict]:
    """Reserve each claim in every budget it falls under, in order, inside
    the caller's transaction; a claim that would take any of them past its
    limit is refused (the budget that refused it is its verdict) and
    reserves nothing. Every admission reserves afresh: a job admitted again
    (its message came back after a router crash) holds two reservations
    until the first expires, which refuses more, never spends more."""
    wanted = sorted({subject for claim in claims for subject in claim.subjects})
    current = await conn.fetch(_CURRENT, [s for s, _ in wanted], [s for _, s in wanted])
    if not current:
        return [False] * len(claims)
    budgets = {(row["scope"], row["subject"]): _budget(row) for row in current}
    columns = (
        [b.scope for b in budgets.values()],
        [b.subject for b in budgets.values()],
        [b.period_start for b in budgets.values()],
    )
    await conn.execute(_ENSURE_USAGE, *columns)
    # Every router queues here, in one order. Reservations past their time
    # are not returned here but by the ledger, once it has written every
    # cost event waiting for it (`expire`): one whose cost is still on its
    # way must not be given back first, or the budget could be spent twice.
    for row in await conn.fetch(_LOCK_USAGE, *columns):
        budget = budgets[(row["scope"], row["subject"])]
        budget.spent, budget.reserved = row["spent"], row["reserved"]
    verdicts: list[Verdict] = []
    taken: list[tuple[Claim, Budget]] = []
    for claim in claims:
        applicable = [budgets[s] for s in claim.subjects if s in budgets]
        if not applicable:
            verdicts.append(False)
            continue
        over = next((b for b in applicable if b.remaining < claim.amount), None)
        if over is not None:
            verdicts.append(msgspec.structs.replace(over))
            continue
        for budget in applicable:
            budget.reserved += claim.amount
            taken.append((claim, budget))
        verdicts.append(min(b.remaining for b in applicable))
    if taken:
        await conn.execute(_WRITE_USAGE, *columns, [b.reserved for b in budgets.values()])
        await conn.execute(
            _WRITE_RESERVATIONS,
            [c.reservation for c, _ in taken],
            [c.job_id for c, _ in taken],
            [b.scope for _, b in taken],
            [b.subject for _, b in taken],
            [b.period_start for _, b in taken],
            [c.amount for c, _ in taken],
            ttl_s,
        )
    return verdicts


_EXPIRE_ALL = _give_back("DELETE FROM budget_reservations r WHERE r.expires_at < now()")


async def expire(conn: Conn) -> int:
    """Return every expired reservation to its budget; how many budgets got some back."""
    rows = await conn.fetch(_EXPIRE_ALL)
    for row in rows:
        log.warning(
            "expired budget reservations returned",
            scope=row["scope"],
            subject=row["subject"],
            amount=str(row["amount"]),
        )
    return len(rows)


async def release(conn: Conn, reservations: list[str]) -> None:
    """Release the reservations of jobs that ended without a billed last call."""
    await conn.execute(RELEASE, reservations)


async def set_budget(
    conn: Conn,
    scope: Scope,
    subject: str,
    *,
    period: Period,
    limit: Decimal,
    alert_share: Decimal = Decimal("0.8"),
    timezone: str = "UTC",
) -> None:
    """Create or change a budget (in effect for the next admission, within
    the admission cache's few seconds)."""
    if scope == "global":
        subject = ""
    elif not subject:
        raise ValueError(f"a {scope} budget names its {scope}")
    if not limit.is_finite() or limit < 0:
        raise ValueError("the limit is a non-negative amount of USD")
    if not Decimal(0) < alert_share <= 1:
        raise ValueError("the alert share is above 0 and at most 1 (0.8 alerts at 80%)")
    try:
        ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(f"unknown time zone {timezone!r}") from exc
    await conn.execute(
        """
        INSERT INTO budgets (scope, subject, period, limit_usd, alert_share, timezone)
        VALUES ($1, $2, $3, $4, $5, $6)
        ON CONFLICT (scope, subject) DO UPDATE SET period = excluded.period,
            limit_usd = excluded.limit_usd, alert_share = excluded.alert_share,
            timezone = excluded.timezone, updated_at = now()
        """,
        scope,
        subject,
        period,
        limit,
        alert_share,
        timezone,
    )


async def current(conn: Conn) -> list[Budget]:
    """Every budget with its spend and reservations in its current period."""
    rows = await conn.fetch(
        """
        SELECT b.scope, b.subject, b.period, b.limit_usd, b.alert_share, b.timezone,
               budget_period_start(b.period, b.timezone, now()) AS period_start,
               budget_period_end(b.period, b.timezone, now()) AS resets_at,
               coalesce(u.spent, 0) AS spent, coalesce(u.reserved, 0) AS reserved
        FROM budgets b
        LEFT JOIN budget_usage u ON u.scope = b.scope AND u.subject = b.subject
            AND u.period_start = budget_period_start(b.period, b.timezone, now())
        ORDER BY b.scope, b.subject
        """
    )
    out = []
    for row in rows:
        budget = _budget(row)
        budget.spent, budget.reserved = row["spent"], row["reserved"]
        out.append(budget)
    return out


async def subjects(conn: Conn) -> set[tuple[str, str]]:
    """Which (scope, subject) pairs have a budget."""
    return {(row["scope"], row["subject"]) for row in await conn.fetch(_SUBJECTS)}


_SUBJECTS = "SELECT scope, subject FROM budgets"
