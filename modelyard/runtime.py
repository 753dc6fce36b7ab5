"""Running components: one process can host any mix of router, workers and ledger."""

from __future__ import annotations

import asyncio
import signal
from typing import Protocol

import structlog
from aio_pika.abc import AbstractRobustConnection
from aiohttp import web

from gateway.service import Gateway
from ledger.service import Ledger
from modelyard import broker, ops
from modelyard.config import Config
from modelyard.metrics import ProcessMetrics
from modelyard.ops import Readiness, broker_check, database_check
from modelyard.tracing import configure_tracing
from router.service import Router
from workers.pool import Worker

log = structlog.get_logger("modelyard.runtime")


class Component(Protocol):
    """What `run` needs of a component."""

    async def start(self) -> None: ...
    async def stop(self) -> None: ...


def install_uvloop() -> None:
    """Use uvloop where available: a faster event loop, same semantics."""
    try:
        import uvloop  # noqa: PLC0415
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def wait_for_signal() -> None:
    """Return on SIGINT or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def serve(config: Config, roles: list[str], pools: list[str], name: str) -> None:
    """Start the named roles on one broker connection; stop them cleanly on a signal."""
    configure_tracing()
    connection = await broker.connect(config.broker_url, name)
    started: list[Component] = []
    readiness = Readiness()
    readiness.add("broker", broker_check(connection))
    readiness.add("database", database_check(config.database_url))
    metrics = ProcessMetrics()
    ops_runner = await _serve_ops(config, readiness, metrics)
    try:
        for component in _components(config, roles, pools, connection, metrics):
            await component.start()
            started.append(component)
        readiness.started = True
        log.info("running", roles=roles, pools=pools)
        await wait_for_signal()
        log.info("stopping")
    finally:
        for component in reversed(started):
            await component.stop()
        if ops_runner is not None:
            await ops_runner.cleanup()
        await connection.close()


async def _serve_ops(
    config: Config, readiness: Readiness, metrics: ProcessMetrics
) -> web.AppRunner | None:
    """`/healthz`, `/readyz` and `/metrics` on `ops.port`, when one is set."""
    if config.ops.port is None:
        return None
    app = web.Application()
    ops.add_routes(app, readiness, metrics.registry)
    runner = await ops.serve_app(app, config.ops.host, config.ops.port)
    log.info("ops endpoints", url=f"http://{config.ops.host}:{ops.bound_port(runner)}")
    return runner


def _components(
    config: Config,
    roles: list[str],
    pools: list[str],
    connection: AbstractRobustConnection,
    metrics: ProcessMetrics,
) -> list[Component]:
    """The components for the roles, in start order: the ledger first (so cost
    events have a consumer), the router and gateway last (so jobs have workers)."""
    components: list[Component] = []
    if "ledger" in roles:
        components.append(Ledger(config, connection, metrics))
    if "worker" in roles:
        components.extend(Worker(config, pool, connection, metrics=metrics) for pool in pools)
    if "router" in roles:
        components.append(Router(config, connection, metrics))
    if "gateway" in roles:
        components.append(Gateway(config, connection, metrics=metrics))
    return components
