"""The cost event: one per billed provider call, the ledger's only input."""

from __future__ import annotations

import uuid
from datetime import datetime
from decimal import Decimal
from typing import Any, Literal

import msgspec

from schemas.results import Usage

PriceSource = Literal["genai-prices", "override", "unknown"]


class CostEvent(msgspec.Struct, kw_only=True, omit_defaults=True):
    """What one provider call cost, and who it was for.

    `event_id` is unique per provider call and stable across redelivery, so
    the ledger can write it idempotently. `cost` is an exact decimal in USD;
    it is `None` only when `price_source` is `unknown` (never a silent zero).
    `raw_usage` keeps the provider's own counters for reconciliation.
    """

    event_id: uuid.UUID
    job_id: str
    occurred_at: datetime
    provider: str
    deployment: str
    provider_model: str
    model: str
    usage: Usage
    cost: Decimal | None
    price_source: PriceSource
    status: Literal["ok", "error"] = "ok"
    latency_ms: float = 0.0
    provider_request_id: str | None = None
    key_id: str | None = None
    team: str | None = None
    project: str | None = None
    user: str | None = None
    batch_id: str | None = None
    custom_id: str | None = None
    raw_usage: dict[str, Any] | None = None
    # The budget reservation the call settles (`CompletionJob.reservation`);
    # with `final`, the job ends with this call and the ledger releases the
    # reservation in the transaction that records this row.
    reservation: str | None = None
    final: bool = False
    currency: str = "USD"
    v: int = 1

    @property
    def price_unknown(self) -> bool:
        """True when no price was found: finance must look at this row."""
        return self.price_source == "unknown"


class CostBatch(msgspec.Struct, kw_only=True):
    """Cost events published together: one broker message for many calls.

    A worker sends events in batches because a message per call doubled the
    broker work per job; the ledger writes each event idempotently either way.
    """

    events: list[CostEvent]
    v: int = 1
    # Reservations of jobs that ended without a billed last call, released
    # (a job's last billed call says so with `final`).
    releases: list[str] = msgspec.field(default_factory=list)


class BudgetAlert(msgspec.Struct, kw_only=True):
    """A budget's spend crossed its alert share: sent once per budget and
    period, on the `modelyard.alerts` fan-out exchange, by the ledger."""

    scope: str
    subject: str
    period: str
    period_start: datetime
    spent: Decimal
    limit: Decimal
    alert_share: Decimal
    v: int = 1
