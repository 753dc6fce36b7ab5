"""`modelyard keys`, `modelyard models` and `modelyard budgets`: the platform
owner's commands. Each is a thin shell over the functions in `router/keys.py`,
`router/approvals.py` and `modelyard/budgets.py`, which the admin HTTP API
calls too; every listing is a table, or JSON with `--format json`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any, Literal, NamedTuple

import msgspec

from modelyard.budgets import Period, Scope
from modelyard.config import Config
from modelyard.database import Conn, connect

Runner = Callable[[Coroutine[Any, Any, Any]], Any]


def add_parsers(sub: Any, run_command: Callable[[argparse.Namespace], int]) -> None:
    """Add the three command groups to the CLI's subparsers."""
    keys = sub.add_parser("keys", help="virtual keys: create, list, rotate, revoke")
    kactions = keys.add_subparsers(dest="action", required=True)
    create = kactions.add_parser("create", help="issue a key (its secret is shown once)")
    create.add_argument("--name", default="")
    create.add_argument("--team")
    create.add_argument("--project")
    create.add_argument("--user")
    create.add_argument("--models", help="comma-separated models the key may use (default: any)")
    create.add_argument("--tags", help="comma-separated deployment tags it is pinned to")
    create.add_argument("--expires-in", help="e.g. 30d, 12h (default: never)")
    create.add_argument("--metadata", help="a JSON object kept with the key")
    create.add_argument("--rpm", type=int, help="requests per minute it may send (default: any)")
    create.add_argument("--tpm", type=int, help="tokens per minute it may send (default: any)")
    klist = kactions.add_parser("list", help="keys (never their secrets)")
    klist.add_argument("--all", action="store_true", help="include revoked keys")
    rotate = kactions.add_parser("rotate", help="a new secret; the old one stops after --grace")
    rotate.add_argument("key_id")
    rotate.add_argument("--grace", default="0s", help="how long the old secret still works")
    revoke = kactions.add_parser("revoke", help="stop a key now")
    revoke.add_argument("key_id")
    models = sub.add_parser("models", help="model approval: list, approve, revoke")
    mactions = models.add_subparsers(dest="action", required=True)
    mactions.add_parser("list", help="every configured model and whether it is approved")
    for verb in ("approve", "revoke"):
        action = mactions.add_parser(verb, help=f"{verb} a model (recorded with who and why)")
        action.add_argument("model")
        action.add_argument("--by", required=True, help="who decides (kept in the record)")
        action.add_argument("--note", default="")
    history = mactions.add_parser("history", help="every approval and revocation")
    history.add_argument("model", nargs="?")
    budgets = sub.add_parser("budgets", help="hard budgets: set, list, show")
    bactions = budgets.add_subparsers(dest="action", required=True)
    bset = bactions.add_parser("set", help="create or change a budget")
    bset.add_argument("scope", choices=["global", "team", "project", "user", "key"])
    bset.add_argument("subject", nargs="?", default="", help="the team, project, user or key id")
    bset.add_argument("--limit", required=True, help="USD, e.g. 50 or 49.99")
    bset.add_argument("--period", choices=["none", "daily", "weekly", "monthly"], required=True)
    bset.add_argument("--alert-at", default="0.8", help="share of the limit that alerts")
    bset.add_argument("--timezone", default="UTC", help="where the period boundary is")
    bactions.add_parser("list", help="budgets with spend, reserved and remaining")
    show = bactions.add_parser("show", help="one budget")
    show.add_argument("scope", choices=["global", "team", "project", "user", "key"])
    show.add_argument("subject", nargs="?", default="")
    for group in (kactions, mactions, bactions):
        for parser in group.choices.values():
            parser.add_argument("--format", choices=["table", "json"], default="table")
    for parser in (keys, models, budgets):
        parser.set_defaults(func=run_command)


# The operations, one Struct each: the CLI builds them from its arguments,
# the admin HTTP API (`gateway/admin_api.py`) from JSON, and `perform` runs
# them, so both call the same code.


class CreateKey(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Issue a key for a team, project or user; its secret is in the answer only."""

    name: str = ""
    team: str | None = None
    project: str | None = None
    user: str | None = None
    models: list[str] | None = None
    tags: list[str] | None = None
    expires_in: str | None = None  # 30d, 12h, ...
    metadata: dict[str, Any] | None = None
    rpm: int | None = None
    tpm: int | None = None


class ListKeys(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Keys, never their secrets."""

    all: bool = False  # revoked ones too


class RotateKey(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A new secret; the old one keeps working for `grace`."""

    key_id: str
    grace: str = "0s"


class RevokeKey(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Stop a key now."""

    key_id: str


class ListModels(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Every configured model and whether it is approved."""


class DecideModel(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Approve or revoke a model, recorded with who and why."""

    model: str
    action: Literal["approve", "revoke"]
    by: str
    note: str = ""


class ModelHistory(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Every approval and revocation (of one model, or all)."""

    model: str | None = None


class SetBudget(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Create or change a budget."""

    scope: Scope
    subject: str = ""
    limit: str  # USD, exact: "50" or "49.99"
    period: Period
    alert_at: str = "0.8"
    timezone: str = "UTC"


class ShowBudget(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """One budget with spend, reserved and remaining."""

    scope: Scope
    subject: str = ""


class ListBudgets(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Every budget with spend, reserved and remaining."""


Operation = (
    CreateKey
    | ListKeys
    | RotateKey
    | RevokeKey
    | ListModels
    | DecideModel
    | ModelHistory
    | SetBudget
    | ShowBudget
    | ListBudgets
)


class NotFound(ValueError):
    """The operation names a key, model or budget that does not exist."""


class Outcome(NamedTuple):
    """An operation's rows, and what to tell the person who asked."""

    rows: list[dict[str, Any]]
    note: str | None = None


async def perform(conn: Conn, op: Operation, config: Config) -> Outcome:
    """Run one operation; `ValueError` (or `NotFound`) says what was wrong with it."""
    if isinstance(op, CreateKey | ListKeys | RotateKey | RevokeKey):
        return await _keys(conn, op)
    if isinstance(op, ListModels | DecideModel | ModelHistory):
        return await _models(conn, op, config)
    return await _budgets(conn, op)


def operation(args: argparse.Namespace) -> Operation:
    """The operation a command line asks for."""
    if args.command == "keys":
        return _key_operation(args)
    if args.command == "models":
        if args.action in ("approve", "revoke"):
            return DecideModel(model=args.model, action=args.action, by=args.by, note=args.note)
        return ModelHistory(model=args.model) if args.action == "history" else ListModels()
    if args.action == "set":
        return SetBudget(
            scope=args.scope,
            subject=args.subject,
            limit=args.limit,
            period=args.period,
            alert_at=args.alert_at,
            timezone=args.timezone,
        )
    return (
        ShowBudget(scope=args.scope, subject=args.subject)
        if args.action == "show"
        else ListBudgets()
    )


def _key_operation(args: argparse.Namespace) -> Operation:
    if args.action == "create":
        return CreateKey(
            name=args.name,
            team=args.team,
            project=args.project,
            user=args.user,
            models=_list(args.models),
            tags=_list(args.tags),
            expires_in=args.expires_in,
            metadata=_json_object(args.metadata),
            rpm=args.rpm,
            tpm=args.tpm,
        )
    if args.action == "list":
        return ListKeys(all=args.all)
    if args.action == "rotate":
        return RotateKey(key_id=args.key_id, grace=args.grace)
    return RevokeKey(key_id=args.key_id)


def command(args: argparse.Namespace, config: Config, run: Runner) -> int:
    """Run one admin command against the config's database."""
    op = operation(args)

    async def main() -> Outcome:
        conn = await connect(config.database_url)
        try:
            return await perform(conn, op, config)
        finally:
            await conn.close()

    outcome = run(main())
    if outcome.note:
        _say(outcome.note)
    _print(outcome.rows, args.format)
    return 0


async def _keys(conn: Conn, op: CreateKey | ListKeys | RotateKey | RevokeKey) -> Outcome:
    from router import keys  # noqa: PLC0415

    if isinstance(op, CreateKey):
        issued = await keys.create(
            conn,
            name=op.name,
            team=op.team,
            project=op.project,
            user=op.user,
            allowed_models=op.models or None,
            allowed_tags=op.tags or None,
            metadata=op.metadata,
            expires_at=datetime.now(UTC) + _duration(op.expires_in) if op.expires_in else None,
            rpm=op.rpm,
            tpm=op.tpm,
        )
        note = f"key {issued.record.id} created; its secret is shown once, keep it now:"
        return Outcome([{"id": issued.record.id, "secret": issued.secret}], note)
    if isinstance(op, ListKeys):
        return Outcome([_key_row(r) for r in await keys.listing(conn, include_revoked=op.all)])
    if isinstance(op, RotateKey):
        grace = _duration(op.grace).total_seconds()
        rotated = await keys.rotate(conn, op.key_id, grace_s=grace)
        if rotated is None:
            raise NotFound(f"no live key {op.key_id}")
        note = f"key {op.key_id} replaced by {rotated.record.id}; the new secret is shown once:"
        row = {"id": rotated.record.id, "secret": rotated.secret, "replaces": op.key_id}
        return Outcome([row], note)
    if not await keys.revoke(conn, op.key_id):
        raise NotFound(f"no live key {op.key_id}")
    return Outcome([{"id": op.key_id, "revoked": True}])


def _key_row(record: Any) -> dict[str, Any]:
    return {
        "id": record.id,
        "prefix": record.prefix + "...",
        "name": record.name,
        "team": record.team,
        "project": record.project,
        "user": record.user,
        "models": ",".join(record.allowed_models or []) or "any",
        "tags": ",".join(record.allowed_tags or []) or "any",
        "rpm": record.rpm or "any",
        "tpm": record.tpm or "any",
        "expires": record.expires_at,
        "revoked": record.revoked_at,
    }


async def _models(
    conn: Conn, op: ListModels | DecideModel | ModelHistory, config: Config
) -> Outcome:
    from router import approvals  # noqa: PLC0415

    if isinstance(op, DecideModel):
        if op.model not in config.models:
            known = ", ".join(sorted(config.models))
            raise NotFound(f"no model named {op.model!r} in the config (one of: {known})")
        decision = await approvals.record(conn, op.model, op.action, actor=op.by, note=op.note)
        return Outcome([msgspec.to_builtins(decision)])
    if isinstance(op, ModelHistory):
        return Outcome([msgspec.to_builtins(d) for d in await approvals.history(conn, op.model)])
    latest = await approvals.latest(conn)
    rows = []
    for name in sorted(config.models):
        last = latest.get(name)
        rows.append(
            {
                "model": name,
                "approved": last is not None and last.action == "approve",
                "by": last.actor if last else "",
                "at": last.at if last else None,
                "note": last.note if last else "",
                "enforced": config.access.require_approval,
            }
        )
    return Outcome(rows)


async def _budgets(conn: Conn, op: SetBudget | ShowBudget | ListBudgets) -> Outcome:
    from modelyard import budgets  # noqa: PLC0415

    if isinstance(op, SetBudget):
        await budgets.set_budget(
            conn,
            op.scope,
            op.subject,
            period=op.period,
            limit=_money(op.limit),
            alert_share=_money(op.alert_at),
            timezone=op.timezone,
        )
    rows = [_budget_row(b) for b in await budgets.current(conn)]
    if isinstance(op, SetBudget | ShowBudget):
        subject = "" if op.scope == "global" else op.subject
        rows = [r for r in rows if (r["scope"], r["subject"]) == (op.scope, subject)]
        if not rows:
            raise NotFound(f"no budget for {op.scope} {subject}".rstrip())
    return Outcome(rows)


def _budget_row(budget: Any) -> dict[str, Any]:
    return {
        "scope": budget.scope,
        "subject": budget.subject,
        "period": budget.period,
        "limit": budget.limit,
        "spent": budget.spent,
        "reserved": budget.reserved,
        "remaining": budget.remaining,
        "resets": budget.resets_at,
        "timezone": budget.timezone,
    }


def _print(rows: list[dict[str, Any]], form: str) -> None:
    if form == "json":
        print(json.dumps(rows, default=str, indent=2))
        return
    from rich.console import Console  # noqa: PLC0415
    from rich.table import Table  # noqa: PLC0415

    table = Table()
    for column in rows[0] if rows else ["(none)"]:
        table.add_column(column)
    for row in rows:
        table.add_row(*("" if v is None else str(v) for v in row.values()))
    Console(width=None if sys.stdout.isatty() else 200).print(table)


def _say(text: str) -> None:
    print(text, file=sys.stderr)


def _list(value: str | None) -> list[str] | None:
    items = [item.strip() for item in (value or "").split(",") if item.strip()]
    return items or None


def _json_object(value: str | None) -> dict[str, Any] | None:
    if value is None:
        return None
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--metadata is not JSON: {exc}") from exc
    if not isinstance(parsed, dict):
        raise ValueError("--metadata must be a JSON object")  # noqa: TRY004  (a usage error)
    return parsed


def _money(value: str) -> Decimal:
    try:
        amount = Decimal(value)
    except InvalidOperation as exc:
        raise ValueError(f"not an amount: {value!r}") from exc
    return amount


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _duration(value: str) -> timedelta:
    """`90s`, `15m`, `12h`, `30d`."""
    try:
        return timedelta(seconds=float(value[:-1]) * _UNITS[value[-1]])
    except (KeyError, ValueError, IndexError) as exc:
        raise ValueError(f"not a duration (like 90s, 15m, 12h, 30d): {value!r}") from exc
