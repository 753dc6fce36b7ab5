"""Deployment health end to end: workers' reports reach every router, a
failing deployment cools down everywhere and a probe brings it back, and
the latency and load strategies move traffic off a slow deployment."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from modelyard.client import Client, new_job
from modelyard.config import Config, parse
from schemas.chat import Message
from schemas.errors import ErrorKind
from schemas.jobs import Constraints
from schemas.results import JobResult
from tests.conftest import FAKE_KEY, FakeControl
from tests.pipeline import in_process
from tests.services import (
    Processes,
    config_document,
    fake_deployment,
    fake_provider,
    fresh_database,
    fresh_vhost,
    write_config,
)
from workers.providers import PROVIDERS

pytestmark = pytest.mark.asyncio(loop_scope="session")

# Quick to react, so the test takes seconds: reports every 100 ms, a
# deployment with 3 of its last calls failing cools down for 2 s.
HEALTH = {
    "report_every_ms": 100,
    "window_s": 10,
    "min_calls": 3,
    "failure_rate": 0.5,
    "cooldown_s": 2,
}


def ask(model: str, **kwargs: Any) -> Any:
    return new_job(model, [Message(role="user", content="How are you?")], **kwargs)


@pytest.fixture
def two_routers(
    tmp_path: Path, fake_port: int, own_fake_port: int
) -> Iterator[tuple[Processes, str]]:
    with fresh_vhost() as broker_url, fresh_database() as database_url:
        doc = config_document(broker_url, database_url, fake_port, log_level="info")
        doc["health"] = HEALTH
        doc["deployments"] |= {
            "sick": fake_deployment(own_fake_port, timeout_s=10),
            "well": fake_deployment(fake_port, timeout_s=10),
        }
        doc["models"] |= {
            "pair": {
                "deployments": [{"deployment": "sick"}, {"deployment": "well"}],
                "retry": {"retries": {"server_error": 0}},
            },
            "sick-only": {
                "deployments": [{"deployment": "sick"}],
                "retry": {"retries": {"server_error": 0}},
            },
            "sick-then-well": {
                "deployments": [{"deployment": "sick"}],
                "retry": {"retries": {"server_error": 0}},
                "fallbacks": ["well-only"],
            },
            "well-only": {"deployments": [{"deployment": "well"}]},
        }
        processes = Processes(write_config(tmp_path / "modelyard.yaml", doc), tmp_path)
        try:
            processes.start("ledger", "ledger")
            processes.start("worker", "worker", "--pool", "main")
            processes.start("router-1", "router")
            processes.start("router-2", "router")
            processes.wait_for("worker", "worker started")
            processes.wait_for("router-1", "router started")
            processes.wait_for("router-2", "router started")
            yield processes, broker_url
        finally:
            processes.stop()


async def wave(client: Client, model: str, count: int) -> list[JobResult]:
    return list(
        await asyncio.gather(*(client.complete(ask(model), timeout=30) for _ in range(count)))
    )


async def test_a_failing_deployment_cools_down_in_every_router_and_a_probe_brings_it_back(
    two_routers: tuple[Processes, str], fake: FakeControl, own_fake_port: int
) -> None:
    processes, broker_url = two_routers
    async with aiohttp.ClientSession() as session, await Client.connect(broker_url) as client:
        sick = FakeControl(session, own_fake_port)
        await sick.set(rate_500=1.0)

        # Failing: each job that meets `sick` moves on to `well` at once.
        first = [r for _ in range(4) for r in await wave(client, "pair", 8)]
        assert all(r.status == "ok" for r in first)
        # The next health report (every 100 ms) reaches both routers.
        for router in ("router-1", "router-2"):
            processes.wait_for(router, "deployment cooling down", timeout=5)
            cooled = processes.events(router, "deployment cooling down")
            assert [e["deployment"] for e in cooled][:1] == ["sick"], router

        # Cooling down: neither router sends it work (a probe each at most).
        await sick.clear()
        cooling = await wave(client, "pair", 40)
        assert all(r.status == "ok" and r.deployment == "well" for r in cooling)
        assert len(await sick.requests()) <= 3  # a probe each (a third router comes next)

        # A router started now knows within seconds what the others know.
        processes.start("router-3", "router")
        processes.wait_for("router-3", "deployment cooling down", timeout=10)

        # With every deployment of a model cooling down, the job still runs,
        # and its result says why it went where it went.
        (forced,) = await wave(client, "sick-only", 1)
        assert forced.status == "error"
        assert any("cooling down" in w for w in forced.warnings)
        # Said still when the job then fell back and was served elsewhere.
        (moved,) = await wave(client, "sick-then-well", 1)
        assert (moved.status, moved.deployment) == ("ok", "well")
        assert any("cooling down" in w for w in moved.warnings)

        # Healed: after the cooldown each router's probe succeeds, and the
        # deployment takes its share again.
        await sick.set(rate_500=0.0)
        await asyncio.sleep(HEALTH["cooldown_s"] + 0.5)
        served: Counter[str] = Counter()
        deadline = time.monotonic() + 30
        while served["sick"] < 5 and time.monotonic() < deadline:
            served.update(r.deployment or "" for r in await wave(client, "pair", 8))
            await asyncio.sleep(0.2)
        assert served["sick"] >= 5
        for router in ("router-1", "router-2"):
            assert processes.events(router, "deployment probed"), router
            assert processes.events(router, "deployment recovered"), router


async def test_a_router_started_after_the_probe_does_not_cool_the_deployment_again(
    two_routers: tuple[Processes, str], fake: FakeControl, own_fake_port: int
) -> None:
    """The late router sees the failures still in the window (more than
    half of its calls), but also that its calls since went well."""
    processes, broker_url = two_routers
    async with aiohttp.ClientSession() as session, await Client.connect(broker_url) as client:
        sick = FakeControl(session, own_fake_port)
        await sick.set(rate_500=1.0)
        failed = await wave(client, "sick-only", 12)
        assert all(r.status == "error" for r in failed)
        processes.wait_for("router-1", "deployment cooling down", timeout=5)
        await sick.set(rate_500=0.0)
        await asyncio.sleep(HEALTH["cooldown_s"] + 0.2)

        async def trickle(seconds: float) -> None:
            """A call now and then: the deployment is seen to work, while
            its failures stay most of the window's calls."""
            until = time.monotonic() + seconds
            while time.monotonic() < until:
                await wave(client, "sick-only", 1)
                await asyncio.sleep(0.4)

        await trickle(0.9)  # the probes go out and succeed
        assert processes.events("router-1", "deployment recovered")
        processes.start("router-late", "router")
        trickling = asyncio.create_task(trickle(30))
        try:
            await asyncio.to_thread(processes.wait_for, "router-late", "router started")
            await asyncio.sleep(1.0)  # its first reports
        finally:
            trickling.cancel()
        calls = len(await sick.requests())
        assert processes.events("router-late", "deployment cooling down") == []
        assert calls < 2 * 12  # the failures were still most of its calls


# Strategies, in one process (the strategy is the router's choice alone).

LATENCY_MS = 300


@pytest.fixture(scope="module")
def slow_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    with fake_provider(FAKE_KEY, tmp_path_factory.mktemp("slow") / "slow.log") as port:
        yield port


@pytest.fixture(scope="module")
def strategy_config(fake_port: int, slow_port: int) -> Iterator[Config]:
    with fresh_vhost() as broker_url, fresh_database() as database_url:
        both = [{"deployment": "slow"}, {"deployment": "quick"}]
        doc = {
            "broker_url": broker_url,
            "database_url": database_url,
            "log_level": "warning",
            "pools": {"main": {"concurrency": 32}},
            "health": HEALTH,
            "deployments": {
                "slow": fake_deployment(slow_port, timeout_s=10),
                "quick": fake_deployment(fake_port, timeout_s=10),
            },
            "models": {
                "fastest": {"deployments": both, "strategy": "lowest_latency"},
                "idlest": {"deployments": both, "strategy": "least_busy"},
                "either": {"deployments": both},
            },
        }
        yield parse(doc, {}, PROVIDERS)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def strategy_client(strategy_config: Config, slow_port: int) -> AsyncIterator[Client]:
    async with aiohttp.ClientSession() as session:
        await FakeControl(session, slow_port).set(latency_ms=LATENCY_MS)
    async with in_process(strategy_config, "test-health") as client:
        yield client


async def closed_loop(client: Client, model: str, *, callers: int, each: int) -> Counter[str]:
    """`callers` producers, each sending its next job when the last is answered."""
    served: Counter[str] = Counter()

    async def caller() -> None:
        for _ in range(each):
            result = await client.complete(ask(model), timeout=30)
            assert result.status == "ok"
            served[result.deployment or ""] += 1

    await asyncio.gather(*(caller() for _ in range(callers)))
    return served


async def test_weighted_routing_ignores_the_slow_deployment(strategy_client: Client) -> None:
    """The baseline the two strategies below are measured against."""
    served = await closed_loop(strategy_client, "either", callers=8, each=6)
    assert 0.25 < served["slow"] / 48 < 0.75


async def test_lowest_latency_moves_traffic_off_a_slow_deployment(
    strategy_client: Client,
) -> None:
    await closed_loop(strategy_client, "fastest", callers=4, each=2)  # both get measured
    await asyncio.sleep(0.3)  # a report or two
    served = await closed_loop(strategy_client, "fastest", callers=8, each=8)
    assert served["slow"] <= 64 * 0.1, served


async def test_least_busy_moves_traffic_off_a_slow_deployment(strategy_client: Client) -> None:
    await closed_loop(strategy_client, "idlest", callers=4, each=2)  # reports flowing
    await asyncio.sleep(0.3)
    served = await closed_loop(strategy_client, "idlest", callers=8, each=8)
    assert served["quick"] >= 64 * 0.75, served


async def test_a_job_whose_constraints_leave_no_deployment_is_refused(
    strategy_client: Client,
) -> None:
    result = await strategy_client.complete(
        ask("either", constraints=Constraints(providers=["anthropic"])), timeout=30
    )
    assert result.status == "error"
    assert result.error is not None
    assert result.error.kind == ErrorKind.INVALID_JOB
    assert result.error.field == "$.constraints"

    pinned = await strategy_client.complete(
        ask("either", constraints=Constraints(deployments=["slow"])), timeout=30
    )
    assert pinned.status == "ok"
    assert pinned.deployment == "slow"
