"""What operators probe and scrape, the same on every role: `GET /healthz`
(the process is alive), `GET /readyz` (broker and database reachable,
topology declared) and `GET /metrics` (Prometheus text format, from
`prometheus-client`).

The gateway serves these beside its API; router, worker and ledger
processes serve them on `ops.port` (or `--ops-port`) when one is set.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import asyncpg
import structlog
from aio_pika.abc import AbstractRobustConnection
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

log = structlog.get_logger("modelyard.ops")

# How long `/readyz` waits for the database before calling it unreachable.
READY_TIMEOUT_S = 2.0

Check = Callable[[], Awaitable[str | None]]  # None when fine, else what is wrong


class Readiness:
    """The checks `/readyz` runs: each returns None, or what is wrong."""

    def __init__(self) -> None:
        self.checks: dict[str, Check] = {}
        self.started = False  # set once the process has declared its topology

    def add(self, name: str, check: Check) -> None:
        """Run `check` on every probe, reported under `name`."""
        self.checks[name] = check

    async def report(self) -> tuple[bool, dict[str, str]]:
        """Whether every check passes, and each check's verdict."""
        names = list(self.checks)
        verdicts = await asyncio.gather(*(self.checks[n]() for n in names))
        report = {n: v or "ok" for n, v in zip(names, verdicts, strict=True)}
        report["topology"] = "ok" if self.started else "not declared yet"
        return all(v == "ok" for v in report.values()), report


def broker_check(connection: AbstractRobustConnection) -> Check:
    """The broker connection is open."""

    async def check() -> str | None:
        return "connection closed" if connection.is_closed else None

    return check


def database_check(url: str) -> Check:
    """The database answers `SELECT 1` within `READY_TIMEOUT_S`, on a
    connection of the probe's own, opened for the probe and closed after (a
    pool busy with work must not make a process look down, nor a probe
    queue behind work; probes are seconds apart)."""

    async def check() -> str | None:
        conn = None
        try:
            async with asyncio.timeout(READY_TIMEOUT_S):
                conn = await asyncpg.connect(url)
                await conn.fetchval("SELECT 1")
        except (TimeoutError, OSError, ConnectionError, asyncpg.PostgresError) as exc:
            return f"unreachable: {exc or type(exc).__name__}"
        finally:
            if conn is not None:
                await conn.close(timeout=READY_TIMEOUT_S)
        return None

    return check


def add_routes(app: web.Application, readiness: Readiness, registry: CollectorRegistry) -> None:
    """`/healthz`, `/readyz` and `/metrics` on `app`."""

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        ready, report = await readiness.report()
        return web.json_response(
            {"status": "ready" if ready else "not ready", "checks": report},
            status=200 if ready else 503,
        )

    async def metrics(_: web.Request) -> web.Response:
        response = web.Response(body=generate_latest(registry))
        response.content_type = CONTENT_TYPE_LATEST.split(";")[0]
        return response

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)


async def serve_app(app: web.Application, host: str, port: int) -> web.AppRunner:
    """Start serving `app`; the runner to clean up when stopping."""
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner


def bound_port(runner: web.AppRunner) -> int:
    """The port a runner's first site listens on (useful when asked for port 0)."""
    server = runner.addresses[0]
    return int(server[1])
