"""Running components: one process can host any mix of router, workers and ledger."""

from __future__ import annotations

import asyncio
import signal
from typing import Protocol

import structlog
from aio_pika.abc import AbstractRobustConnection

from ledger.service import Ledger
from modelyard import broker
from modelyard.config import Config
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
    try:
        for component in _components(config, roles, pools, connection):
            await component.start()
            started.append(component)
        log.info("running", roles=roles, pools=pools)
        await wait_for_signal()
        log.info("stopping")
    finally:
        for component in reversed(started):
            await component.stop()
        await connection.close()


def _components(
    config: Config, roles: list[str], pools: list[str], connection: AbstractRobustConnection
) -> list[Component]:
    """The components for the roles, in start order: the ledger first (so cost
    events have a consumer), the router last (so jobs have workers)."""
    components: list[Component] = []
    if "ledger" in roles:
        components.append(Ledger(config, connection))
    if "worker" in roles:
        components.extend(Worker(config, pool, connection) for pool in pools)
    if "router" in roles:
        components.append(Router(config, connection))
    return components
