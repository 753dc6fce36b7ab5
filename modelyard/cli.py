"""The `modelyard` command.

Every subcommand validates its input before starting anything and reports a
bad config, file or flag as one clear line on stderr (exit 2), never a
traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Callable, Coroutine
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import msgspec

from modelyard import admin, logs
from modelyard.config import Config, ConfigError, load

DEFAULT_CONFIG = "modelyard.yaml"


class UsageError(Exception):
    """A problem with what the user asked for; printed without a traceback."""


def _config(args: argparse.Namespace) -> Config:
    config = load(args.config)
    logs.configure(args.log_level or config.log_level, log_prompts=config.log_prompts)
    return config


def _run(coro: Coroutine[Any, Any, Any]) -> Any:
    from modelyard.runtime import install_uvloop  # noqa: PLC0415  (keeps `--help` fast)

    install_uvloop()
    return asyncio.run(coro)


def cmd_serve(roles: list[str]) -> Callable[[argparse.Namespace], int]:
    """A command that runs the given roles until SIGINT/SIGTERM."""

    def command(args: argparse.Namespace) -> int:
        from modelyard.runtime import serve  # noqa: PLC0415

        config = _config(args)
        if getattr(args, "ops_port", None) is not None:
            config.ops.port = args.ops_port
        if getattr(args, "port", None) is not None:
            config.gateway.port = args.port
        wanted = [r for r in roles if not (r == "gateway" and getattr(args, "no_gateway", False))]
        pools = config.pool_names()
        if getattr(args, "pool", None):
            unknown = [p for p in args.pool if p not in pools]
            if unknown:
                raise UsageError(f"no pool named {', '.join(unknown)} (pools: {', '.join(pools)})")
            pools = args.pool
        if getattr(args, "fake_provider", False):
            return int(
                _run(_with_fake(serve(config, wanted, pools, "modelyard-up"), args.fake_port))
            )
        _run(serve(config, wanted, pools, f"modelyard-{'-'.join(wanted)}"))
        return 0

    return command


async def _with_fake(main: Coroutine[Any, Any, None], port: int) -> int:
    from modelyard.fake import FakeSettings, start  # noqa: PLC0415

    runner, bound = await start("127.0.0.1", port, FakeSettings())
    print(f"fake provider on http://127.0.0.1:{bound}", file=sys.stderr)
    try:
        await main
    finally:
        await runner.cleanup()
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from modelyard.database import migrate  # noqa: PLC0415

    config = _config(args)
    applied = _run(migrate(config.database_url))
    print(f"applied {len(applied)} migration(s): {', '.join(applied) or 'none pending'}")
    return 0


def cmd_fake_provider(args: argparse.Namespace) -> int:
    from modelyard.fake import FakeSettings, serve  # noqa: PLC0415

    chosen = {f.name: getattr(args, f.name) for f in msgspec.structs.fields(FakeSettings)}
    settings = FakeSettings(**{k: v for k, v in chosen.items() if v is not None})
    print(f"fake provider on http://{args.host}:{args.port}", file=sys.stderr)
    _run(serve(args.host, args.port, settings))
    return 0


def _fake_settings_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per fake-provider setting (`--rate-429 0.1`, `--latency-ms 20`, ...)."""
    from modelyard.fake import FakeSettings  # noqa: PLC0415

    for field in msgspec.structs.fields(FakeSettings):
        kind = field.type if field.type in (int, float) else str
        parser.add_argument(
            "--" + field.name.replace("_", "-"),
            dest=field.name,
            type=kind,
            help=f"default: {field.default}",
        )


def cmd_submit(args: argparse.Namespace) -> int:
    from modelyard.batch import BatchInputError, run_batch  # noqa: PLC0415
    from modelyard.client import Client, ResultsBusyError  # noqa: PLC0415
    from schemas.jobs import Metadata  # noqa: PLC0415

    config = _config(args)
    source = Path(args.file)
    if not source.is_file():
        raise UsageError(f"input file {source} does not exist")
    output = Path(args.output or source.with_suffix(".output.jsonl"))

    async def main() -> int:
        async with await Client.connect(config.broker_url, "modelyard-submit") as client:
            try:
                summary = await run_batch(
                    client,
                    source,
                    output,
                    owner=Metadata(team=args.team, project=args.project, user=args.user),
                    show_progress=not args.quiet,
                )
            except (BatchInputError, ResultsBusyError) as exc:
                raise UsageError(str(exc)) from exc
        print(
            f"batch {summary.batch_id}: {summary.total} lines, {summary.ok} ok, "
            f"{summary.errors} errors, {summary.skipped} already done; "
            f"cost ${summary.cost} -> {output}"
        )
        return 0

    return int(_run(main()))


def cmd_report(args: argparse.Namespace) -> int:
    from rich.console import Console  # noqa: PLC0415
    from rich.table import Table  # noqa: PLC0415

    from modelyard import report  # noqa: PLC0415
    from modelyard.database import connect  # noqa: PLC0415

    config = _config(args)
    group_by = [g.strip() for g in args.group_by.split(",") if g.strip()]
    report.report_sql(group_by)  # validate before connecting
    until = args.until or datetime.now(UTC).date()
    since = args.since or until - timedelta(days=30)

    async def main() -> list[dict[str, Any]]:
        conn = await connect(config.database_url)
        try:
            return await report.fetch_report(conn, group_by, since, until)
        finally:
            await conn.close()

    rows = _run(main())
    columns = [*group_by, *report.MEASURES]
    if args.format == "csv":
        sys.stdout.write(report.render_csv(rows, columns))
    elif args.format == "json":
        print(report.render_json(rows))
    else:
        table = Table(title=f"Spend {since} to {until}")
        for column in columns:
            measure = column in report.MEASURES
            table.add_column(
                report.LABELS.get(column, column), justify="right" if measure else "left"
            )
        for row in rows:
            table.add_row(*(report.cell(c, row[c]) for c in columns))
        sums = report.totals(rows)
        table.add_section()
        table.add_row(
            "total",
            *[""] * (len(group_by) - 1),
            *(report.cell(m, sums[m]) for m in report.MEASURES),
        )
        # Off a terminal (a pipe, CI logs) do not squeeze columns to 80 characters.
        Console(width=None if sys.stdout.isatty() else 200).print(table)
    return 0


def cmd_admin(args: argparse.Namespace) -> int:
    return admin.command(args, _config(args), _run)


def cmd_topology(args: argparse.Namespace) -> int:
    from modelyard.topology import build_topology, definitions  # noqa: PLC0415

    config = _config(args)
    text = json.dumps(definitions(build_topology(config.pool_names()), args.vhost), indent=2) + "\n"
    if args.export:
        Path(args.export).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


def cmd_dead(args: argparse.Namespace) -> int:
    """List, replay or purge what the dead queue holds."""
    from rich.console import Console  # noqa: PLC0415
    from rich.table import Table  # noqa: PLC0415

    from modelyard import broker, deadletters  # noqa: PLC0415

    config = _config(args)
    wanted = _dead_selection(args)

    async def main() -> Any:
        connection = await broker.connect(config.broker_url, f"modelyard-dead-{args.action}")
        try:
            if args.action == "list":
                return await deadletters.list_dead(connection, args.limit)
            if args.action == "replay":
                publisher = broker.Broker(connection)
                return await deadletters.replay(connection, publisher, wanted)
            return await deadletters.purge(connection, wanted)
        finally:
            await connection.close()

    outcome = _run(main())
    if args.action == "list":
        if args.format == "json":
            print(msgspec.json.encode(outcome).decode())
            return 0
        table = Table(title=f"{len(outcome)} message(s) on the dead queue")
        for column in ("id", "kind", "jobs", "parked at", "reason"):
            table.add_column(column)
        for letter in outcome:
            when = letter.dead_at.isoformat(timespec="seconds") if letter.dead_at else "?"
            table.add_row(letter.key, letter.kind, str(letter.jobs), when, letter.reason)
        Console(width=None if sys.stdout.isatty() else 200).print(table)
        return 0
    if args.action == "replay":
        replayed, refused = outcome
        print(f"replayed {len(replayed)} message(s) through the router")
        if refused:
            print(f"not replayable (not a job): {', '.join(refused)}", file=sys.stderr)
            return 1
        return 0
    print(f"purged {len(outcome)} message(s)")
    return 0


def _dead_selection(args: argparse.Namespace) -> Callable[[Any], bool]:
    """Which parked messages `replay` or `purge` act on; refuses to guess."""
    if args.action == "list":
        return lambda _: True
    ids = set(args.id or [])
    if getattr(args, "older_than", None) is not None:
        from modelyard.deadletters import older_than  # noqa: PLC0415

        age = older_than(args.older_than)
        return lambda letter: age(letter) and (not ids or letter.key in ids)
    if ids:
        return lambda letter: letter.key in ids
    if args.all:
        return lambda _: True
    raise UsageError(f"dead {args.action}: say which messages: --id ID ..., or --all")


def _duration(value: str) -> float:
    """`90s`, `15m`, `12h` or `7d` in seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        return float(value[:-1]) * units[value[-1]]
    except (KeyError, ValueError, IndexError) as exc:
        raise argparse.ArgumentTypeError(f"not a duration like 7d, 12h, 15m: {value!r}") from exc


def _day(value: str) -> date:
    try:
        return date.fromisoformat(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a date (YYYY-MM-DD): {value!r}") from exc


def _add_serving(sub: Any) -> None:
    """The commands that run roles until stopped."""
    up = sub.add_parser(
        "up", help="router, every worker pool, the ledger and the HTTP gateway in one process"
    )
    up.add_argument("--fake-provider", action="store_true", help="also start the fake provider")
    up.add_argument("--fake-port", type=int, default=8900)
    up.add_argument("--no-gateway", action="store_true", help="no HTTP gateway")
    up.add_argument("--port", type=int, help="the gateway's port (default: gateway.port)")
    up.set_defaults(func=cmd_serve(["ledger", "worker", "router", "gateway"]))
    router = sub.add_parser("router", help="run a router")
    router.set_defaults(func=cmd_serve(["router"]))
    worker = sub.add_parser("worker", help="run worker pool(s)")
    worker.add_argument("--pool", action="append", required=True, help="pool name (repeatable)")
    worker.set_defaults(func=cmd_serve(["worker"]))
    ledger = sub.add_parser("ledger", help="run the ledger writer")
    ledger.set_defaults(func=cmd_serve(["ledger"]))
    gateway = sub.add_parser("gateway", help="run the HTTP gateway (OpenAI and Anthropic APIs)")
    gateway.add_argument("--port", type=int, help="default: the config's gateway.port")
    gateway.set_defaults(func=cmd_serve(["gateway"]))
    for serving in (up, router, worker, ledger):
        serving.add_argument(
            "--ops-port",
            type=int,
            help="serve /healthz, /readyz, /metrics here (default: ops.port)",
        )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    parser = argparse.ArgumentParser(prog="modelyard", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--config",
        default=os.environ.get("MODELYARD_CONFIG", DEFAULT_CONFIG),
        help="config file (default: $MODELYARD_CONFIG or ./modelyard.yaml)",
    )
    parser.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        help="default: the config's log_level",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _add_serving(sub)
    sub.add_parser("migrate", help="create the database and apply migrations").set_defaults(
        func=cmd_migrate
    )

    fake = sub.add_parser("fake-provider", help="run the fake LLM provider (tests, demo, bench)")
    fake.add_argument("--host", default="127.0.0.1")
    fake.add_argument("--port", type=int, default=8900)
    _fake_settings_flags(fake)
    fake.set_defaults(func=cmd_fake_provider)

    submit = sub.add_parser("submit", help="run an OpenAI Batch API .jsonl file")
    submit.add_argument("file")
    submit.add_argument("-o", "--output", help="output .jsonl (default: FILE.output.jsonl)")
    submit.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    submit.add_argument("--team", help="team billed for the batch (ledger attribution)")
    submit.add_argument("--project", help="project billed for the batch")
    submit.add_argument("--user", help="user who ran the batch")
    submit.set_defaults(func=cmd_submit)

    rep = sub.add_parser("report", help="spend from the ledger")
    rep.add_argument("--group-by", default="team,model,day")
    rep.add_argument("--since", type=_day, help="first day (default: 30 days before --until)")
    rep.add_argument("--until", type=_day, help="last day (default: today, UTC)")
    rep.add_argument("--format", choices=["table", "csv", "json"], default="table")
    rep.set_defaults(func=cmd_report)

    dead = sub.add_parser("dead", help="list, replay or purge the dead queue")
    actions = dead.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", help="what is parked, and why")
    listing.add_argument("--format", choices=["table", "json"], default="table")
    listing.add_argument("--limit", type=int, default=1000)
    again = actions.add_parser("replay", help="send parked jobs back through the router")
    gone = actions.add_parser("purge", help="remove parked messages")
    for action in (again, gone):
        action.add_argument("--id", action="append", help="a job id (repeatable)")
        action.add_argument("--all", action="store_true", help="every parked message")
    gone.add_argument("--older-than", type=_duration, help="only those parked longer ago (7d)")
    dead.set_defaults(func=cmd_dead)

    admin.add_parsers(sub, cmd_admin)

    topo = sub.add_parser("topology", help="print the RabbitMQ definitions for this config")
    topo.add_argument("--export", help="write to this file instead of stdout")
    topo.add_argument("--vhost", default="/")
    topo.set_defaults(func=cmd_topology)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (ConfigError, UsageError, ValueError) as exc:
        print(f"modelyard: error: {exc}", file=sys.stderr)
        return 2
    except (asyncpg.UndefinedTableError, asyncpg.UndefinedFunctionError):
        print(
            "modelyard: error: the database is not migrated: run `modelyard migrate`",
            file=sys.stderr,
        )
        return 2
    except asyncpg.PostgresError as exc:
        print(f"modelyard: error: database: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except OSError as exc:
        print(f"modelyard: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
