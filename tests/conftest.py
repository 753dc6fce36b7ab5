"""Shared fixtures: real broker, real database, the project's fake provider.

One vhost, one database and one fake provider per test session; tests that
kill processes make their own (see `fresh_vhost` / `fresh_database`).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from ledger.service import Ledger
from modelyard import broker
from modelyard.client import Client
from modelyard.config import Config, parse
from router.service import Router
from tests.services import (
    config_document,
    fake_provider,
    fresh_database,
    fresh_vhost,
)
from workers.pool import Worker
from workers.providers import PROVIDERS

FAKE_KEY = "test-key"
os.environ["TEST_FAKE_KEY"] = FAKE_KEY
os.environ["TEST_WRONG_KEY"] = "not-the-key"


@pytest.fixture(scope="session")
def broker_url() -> Iterator[str]:
    with fresh_vhost() as url:
        yield url


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    with fresh_database() as url:
        yield url


@pytest.fixture(scope="session")
def fake_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """The fake provider, in its own process like a real provider."""
    with fake_provider(FAKE_KEY, tmp_path_factory.mktemp("fake") / "fake.log") as port:
        yield port


@pytest.fixture
def own_fake_port(tmp_path: Path) -> Iterator[int]:
    """A fake provider of the test's own: its faults and request log are the test's."""
    with fake_provider(FAKE_KEY, tmp_path / "own-fake.log") as port:
        yield port


@pytest.fixture(scope="session")
def config_doc(broker_url: str, database_url: str, fake_port: int) -> dict[str, Any]:
    return config_document(broker_url, database_url, fake_port)


@pytest.fixture(scope="session")
def config(config_doc: dict[str, Any]) -> Config:
    return parse(config_doc, {}, PROVIDERS)


class FakeControl:
    """The fake provider's admin API: its request log and fault settings."""

    def __init__(self, session: aiohttp.ClientSession, port: int) -> None:
        self.session = session
        self.base = f"http://127.0.0.1:{port}/_fake"

    async def requests(self) -> list[dict[str, Any]]:
        async with self.session.get(f"{self.base}/requests") as r:
            entries: list[dict[str, Any]] = await r.json()
            return entries

    async def clear(self) -> None:
        async with self.session.delete(f"{self.base}/requests") as r:
            r.raise_for_status()

    async def set(self, **settings: Any) -> None:
        async with self.session.put(f"{self.base}/settings", json=settings) as r:
            r.raise_for_status()


@pytest_asyncio.fixture(scope="session")
async def fake(fake_port: int) -> AsyncIterator[FakeControl]:
    async with aiohttp.ClientSession() as session:
        yield FakeControl(session, fake_port)


@pytest_asyncio.fixture(scope="session")
async def pipeline(config: Config) -> AsyncIterator[None]:
    """Router, ledger and the main and providers worker pools, in this process."""
    connection = await broker.connect(config.broker_url, "test-pipeline")
    components = [
        Ledger(config, connection),
        Worker(config, "main", connection),
        Worker(config, "providers", connection),
        Router(config, connection),
    ]
    for component in components:
        await component.start()
    yield
    for component in reversed(components):
        await component.stop()
    await connection.close()


@pytest_asyncio.fixture(scope="session")
async def client(config: Config, pipeline: None) -> AsyncIterator[Client]:
    async with await Client.connect(config.broker_url) as c:
        yield c


@pytest.fixture
def tmp_config(tmp_path: Path, config_doc: dict[str, Any]) -> Path:
    from tests.services import write_config  # noqa: PLC0415

    return write_config(tmp_path / "modelyard.yaml", config_doc)
