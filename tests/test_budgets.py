"""Hard budgets and virtual keys across real processes: three routers racing
for one budget never overspend it, a router killed holding reservations
strands nothing, revoked and expired keys stop on every router, a team
pinned to `eu` deployments stays there, and no key is kept anywhere."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from decimal import ROUND_UP, Decimal
from pathlib import Path
from typing import Any, TypeVar

import aio_pika
import aiohttp
import asyncpg
import msgspec
import pytest
import yaml

from modelyard import budgets
from modelyard.client import Client, new_job
from modelyard.config import parse
from modelyard.prices import estimated_cost, price_card, token_bound
from modelyard.topology import ALERTS_EXCHANGE, DEAD_QUEUE
from router import approvals, keys
from schemas.chat import Message
from schemas.costs import BudgetAlert
from schemas.errors import ErrorKind
from schemas.jobs import CompletionJob, Metadata
from schemas.results import JobResult
from tests.conftest import FakeControl
from tests.pipeline import eventually
from tests.services import (
    Processes,
    TcpProxy,
    config_document,
    fake_deployment,
    free_port,
    fresh_database,
    fresh_vhost,
    write_config,
)
from workers.providers import PROVIDERS

pytestmark = pytest.mark.asyncio

T = TypeVar("T")

PRICE = {"input_per_mtok": "1.00", "output_per_mtok": "4.00"}
MAX_TOKENS = 40


def metered(fake_port: int, **extra: Any) -> dict[str, Any]:
    return fake_deployment(fake_port, price=PRICE, **extra)


Stack = tuple[Processes, str, str]


@pytest.fixture
def stack(tmp_path: Path, fake_port: int) -> Iterator[Stack]:
    """Processes on a vhost and database of their own (started by each test)."""
    with fresh_vhost() as broker_url, fresh_database() as database_url:
        doc = config_document(broker_url, database_url, fake_port, log_level="info")
        doc["access"] = {"cache_s": 0.5}
        doc["deployments"] |= {
            "metered-eu": metered(fake_port, tags=["eu"]),
            "metered-us": metered(fake_port, tags=["us"]),
        }
        doc["models"] |= {
            "metered": {
                "deployments": [{"deployment": "metered-eu"}, {"deployment": "metered-us"}]
            },
        }
        processes = Processes(write_config(tmp_path / "modelyard.yaml", doc), tmp_path)
        try:
            yield processes, broker_url, database_url
        finally:
            processes.stop()


def configure(processes: Processes, **settings: Any) -> None:
    """Change config sections before the processes start."""
    doc = yaml.safe_load(processes.config.read_text())
    for section, values in settings.items():
        doc[section] = {**doc.get(section, {}), **values}
    write_config(processes.config, doc)


def start(processes: Processes, *roles: str) -> None:
    for role in roles:
        args = ["worker", "--pool", "main"] if role == "worker" else [role.split("-")[0]]
        processes.start(role, *args)
    for role in roles:
        processes.wait_for(role, f"{role.split('-')[0]} started")


def ask(text: str, *, team: str = "acme", key: str | None = None) -> CompletionJob:
    job = new_job(
        "metered",
        [Message(role="user", content=text)],
        metadata=Metadata(team=team),
        priority="batch",
        max_tokens=MAX_TOKENS,
    )
    job.api_key = key
    return job


def worst_case(processes: Processes, job: CompletionJob) -> Decimal:
    """What admission reserves for `job` (every deployment has one price)."""
    doc = yaml.safe_load(processes.config.read_text())
    config = parse(doc, {}, PROVIDERS)
    tokens = token_bound(job.request, image_tokens=3000, max_output=4096)
    cost = estimated_cost(price_card(config.deployments["metered-eu"]), *tokens)
    assert cost is not None
    return cost


async def run(broker_url: str, jobs: list[CompletionJob], timeout: float = 120) -> list[JobResult]:
    queue = f"budget-{jobs[0].id[:8]}"
    results: dict[str, JobResult] = {}
    async with await Client.connect(broker_url) as client:
        await client.declare_results_queue(queue)
        await client.submit_many(jobs, queue)
        async with asyncio.timeout(timeout), contextlib.aclosing(client.results(queue)) as answers:
            async for result in answers:
                results.setdefault(result.job_id, result)
                if len(results) == len(jobs):
                    break
        await client.delete_queue(queue)
    return list(results.values())


async def figures(database_url: str, team: str = "acme") -> dict[str, Any]:
    conn = await asyncpg.connect(database_url)
    try:
        usage = await conn.fetchrow(
            "SELECT coalesce(sum(spent), 0) AS spent, coalesce(sum(reserved), 0) AS reserved "
            "FROM budget_usage WHERE scope = 'team' AND subject = $1",
            team,
        )
        ledger = await conn.fetchval(
            "SELECT coalesce(sum(cost), 0) FROM ledger WHERE team = $1", team
        )
        held = await conn.fetchval("SELECT count(*) FROM budget_reservations")
        assert usage is not None
        return {
            "spent": usage["spent"],
            "reserved": usage["reserved"],
            "ledger": ledger,
            "held": held,
        }
    finally:
        await conn.close()


async def in_db(database_url: str, work: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
    """`work` on a connection of its own."""
    conn = await asyncpg.connect(database_url)
    try:
        return await work(conn)
    finally:
        await conn.close()


async def set_budget(database_url: str, limit: Decimal, team: str = "acme") -> None:
    await in_db(
        database_url,
        lambda conn: budgets.set_budget(conn, "team", team, period="monthly", limit=limit),
    )


async def table_text(database_url: str, table: str) -> str:
    """Every row of a table, as text."""
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(f"SELECT row_to_json(t)::text AS row FROM {table} t")
        return "\n".join(row["row"] for row in rows)
    finally:
        await conn.close()


async def dead_letters(broker_url: str) -> list[str]:
    """The bodies and headers parked on the dead queue (left there)."""
    connection = await aio_pika.connect(broker_url)
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(DEAD_QUEUE, passive=True)
        kept = []
        while (message := await queue.get(no_ack=False, fail=False)) is not None:
            kept.append(message.body.decode() + str(message.headers))
        return kept
    finally:
        await connection.close()  # unacked: they stay parked


def settled(f: dict[str, Any]) -> bool:
    return bool(f["held"] == 0 and f["reserved"] == 0 and f["spent"] == f["ledger"])


async def test_three_routers_racing_for_one_budget_never_overspend_it(stack: Stack) -> None:
    processes, broker_url, database_url = stack
    jobs = [ask(f"question {i}") for i in range(1000)]
    limit = (worst_case(processes, jobs[0]) * 100).quantize(Decimal("0.01"), ROUND_UP)
    await set_budget(database_url, limit)
    start(processes, "ledger", "worker", "router-1", "router-2", "router-3")

    results = await run(broker_url, jobs)
    final = await eventually(lambda: figures(database_url), settled, timeout=30)

    kinds = Counter(r.error.kind if r.error else "ok" for r in results)
    assert len(results) == 1000
    assert set(kinds) == {"ok", ErrorKind.BUDGET_EXCEEDED}
    assert kinds[ErrorKind.BUDGET_EXCEEDED] > 0  # the budget did bind
    assert final["spent"] <= limit
    assert final["spent"] == final["ledger"] == sum(r.cost or 0 for r in results)
    assert (final["held"], final["reserved"]) == (0, 0)
    refusal = next(r.error for r in results if r.error)
    assert "team acme (monthly)" in refusal.message
    assert f"limit ${limit:.2f}" in refusal.message
    # Every router took part: the guarantee held across processes.
    for router in ("router-1", "router-2", "router-3"):
        assert processes.events(router, "job refused"), router


async def test_a_router_killed_holding_reservations_strands_nothing(stack: Stack) -> None:
    processes, broker_url, database_url = stack
    await set_budget(database_url, Decimal("10"))
    # Reservations last 8 s (a call may take 5, a stream too); the router
    # holds jobs 1 s before dispatching them.
    doc = yaml.safe_load(processes.config.read_text())
    for deployment in doc["deployments"].values():
        deployment["stream_timeout_s"] = 5
    write_config(processes.config, doc)
    configure(
        processes,
        access={"reservation_ttl_s": 8},
        batch_lane={"max_jobs": 500, "linger_ms": 1000},
    )
    start(processes, "ledger", "router")
    jobs = [ask(f"held {i}") for i in range(20)]
    async with await Client.connect(broker_url) as client:
        await client.declare_results_queue("held")
        await client.submit_many(jobs, "held")
        await eventually(lambda: figures(database_url), lambda f: f["held"] == 20)
        processes.kill("router")  # reserved, not yet dispatched, not acked

        whole = await eventually(
            lambda: figures(database_url), lambda f: f["reserved"] == 0, timeout=30
        )
        configure(processes, batch_lane={"max_jobs": 32, "linger_ms": 5})
        start(processes, "router-2", "worker")
        answers: dict[str, JobResult] = {}
        async with asyncio.timeout(60), contextlib.aclosing(client.results("held")) as stream:
            async for result in stream:
                answers.setdefault(result.job_id, result)
                if len(answers) == len(jobs):
                    break
    final = await eventually(lambda: figures(database_url), settled, timeout=30)

    assert (whole["held"], whole["reserved"]) == (0, 0)  # expired: the budget whole again
    assert all(r.status == "ok" for r in answers.values())
    assert final["spent"] == final["ledger"] > 0


async def test_keys_approval_and_pins_hold_on_every_router_and_no_key_is_kept(
    stack: Stack,
) -> None:
    processes, broker_url, database_url = stack
    configure(processes, access={"require_key": True, "require_approval": True})
    eu_team = await in_db(database_url, lambda c: keys.create(c, team="acme", allowed_tags=["eu"]))
    doomed = await in_db(database_url, lambda c: keys.create(c, team="acme"))
    secrets = [eu_team.secret, doomed.secret]
    start(processes, "ledger", "worker", "router-1", "router-2")

    unapproved = await run(broker_url, [ask("before approval", key=eu_team.secret)])
    await in_db(database_url, lambda c: approvals.record(c, "metered", "approve", actor="alice"))
    await asyncio.sleep(0.6)  # every router's cache
    pinned = await run(broker_url, [ask(f"eu {i}", key=eu_team.secret) for i in range(40)])
    before = await run(broker_url, [ask(f"doomed {i}", key=doomed.secret) for i in range(10)])
    await in_db(database_url, lambda c: keys.revoke(c, doomed.record.id))
    await asyncio.sleep(0.6)
    after = await run(broker_url, [ask(f"revoked {i}", key=doomed.secret) for i in range(10)])
    # An undecodable job carrying a key, with nobody to answer: parked.
    async with await Client.connect(broker_url) as client:
        await client.broker.submit(
            b'{"id": "bad", "api_key": "' + doomed.secret.encode() + b'", "request": 7}',
            correlation_id="bad",
            reply_to=None,
        )
    parked = await eventually(lambda: dead_letters(broker_url), lambda bodies: bodies != [])
    ledger = await table_text(database_url, "ledger")
    stored = await table_text(database_url, "api_keys")

    (refused,) = unapproved
    assert refused.error is not None
    assert refused.error.kind == ErrorKind.MODEL_NOT_APPROVED
    assert "modelyard models approve metered" in refused.error.message
    assert all(r.status == "ok" and r.deployment == "metered-eu" for r in pinned)
    assert all(r.status == "ok" for r in before)
    assert {r.error.kind if r.error else None for r in after} == {ErrorKind.UNAUTHORIZED}
    assert all("revoked" in (r.error.message if r.error else "") for r in after)
    # Both routers saw the revocation (each refused some of the jobs).
    for router in ("router-1", "router-2"):
        assert processes.events(router, "job refused"), router
    # No key in the ledger (the key id is), the key table, results, dead letters or logs.
    assert eu_team.record.id in ledger
    answers = [*unapproved, *pinned, *before, *after]
    kept = [ledger, stored, *parked, *(msgspec.json.encode(r).decode() for r in answers)]
    kept += [processes.log_text(name) for name in processes.names()]
    assert any('"id": "bad"' in text or '"id":"bad"' in text for text in parked)
    for secret in secrets:
        assert not any(secret in text for text in kept)
        assert not any(secret[3:20] in text for text in kept)


def zone_with_midnight_at(moment: float) -> str:
    """A POSIX time zone whose local midnight falls at `moment` (unix seconds)."""
    offset = -round(moment) % 86400  # east of UTC, seconds
    if offset > 43200:
        offset -= 86400
    sign = "-" if offset >= 0 else "+"  # POSIX counts west as positive
    hours, rest = divmod(abs(offset), 3600)
    return f"MYZ{sign}{hours:02d}:{rest // 60:02d}:{rest % 60:02d}"


async def test_a_daily_budget_rolls_over_under_load_losing_and_doubling_nothing(
    stack: Stack,
) -> None:
    processes, broker_url, database_url = stack
    start(processes, "ledger", "worker", "router")
    midnight = time.time() + 8
    zone = zone_with_midnight_at(midnight)
    await in_db(
        database_url,
        lambda c: c.execute(
            "INSERT INTO budgets (scope, subject, period, limit_usd, timezone) "
            "VALUES ('team', 'acme', 'daily', 1000, $1)",
            zone,
        ),
    )
    await asyncio.sleep(1)  # every router's cache
    answered: list[JobResult] = []
    async with await Client.connect(broker_url) as client:
        while time.time() < midnight + 5:  # jobs in flight across the turn of the day
            wave = [ask(f"rollover {len(answered) + i}") for i in range(10)]
            answered += await asyncio.gather(*(client.complete(j, timeout=30) for j in wave))
    final = await eventually(lambda: figures(database_url), settled, timeout=30)
    periods = await in_db(
        database_url,
        lambda c: c.fetch(
            "SELECT period_start, spent FROM budget_usage WHERE scope = 'team' "
            "ORDER BY period_start"
        ),
    )

    assert all(r.status == "ok" for r in answered)
    assert [p["period_start"].timestamp() for p in periods] == [
        pytest.approx(midnight - 86400, abs=1),
        pytest.approx(midnight, abs=1),
    ]
    assert all(p["spent"] > 0 for p in periods)  # both days had spend
    assert sum(p["spent"] for p in periods) == final["ledger"]  # none lost, none twice
    assert (final["held"], final["reserved"]) == (0, 0)


async def test_a_budget_alert_reaches_a_queue_bound_to_the_alerts_exchange(
    stack: Stack,
) -> None:
    processes, broker_url, database_url = stack
    await set_budget(database_url, Decimal("1"))
    await in_db(
        database_url,
        lambda c: c.execute("UPDATE budgets SET alert_share = 0.00001"),  # alert from $0.00001
    )
    start(processes, "ledger", "worker", "router")
    connection = await aio_pika.connect(broker_url)
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(exclusive=True)
        await queue.bind(ALERTS_EXCHANGE)
        await run(broker_url, [ask(f"alert {i}") for i in range(5)])
        message = await eventually(lambda: queue.get(fail=False), lambda m: m is not None)
        second = await queue.get(fail=False)
    finally:
        await connection.close()

    assert message is not None
    alert = msgspec.json.decode(message.body, type=BudgetAlert)
    assert (alert.scope, alert.subject, alert.period) == ("team", "acme", "monthly")
    assert alert.spent > 0
    assert second is None  # once per period


async def test_falling_back_to_a_dearer_deployment_never_breaks_the_limit(
    stack: Stack, own_fake_port: int, fake_port: int
) -> None:
    processes, broker_url, database_url = stack
    cheap = {
        **metered(own_fake_port),
        "price": {"input_per_mtok": "0.01", "output_per_mtok": "0.01"},
    }
    dear = {**metered(fake_port), "price": {"input_per_mtok": "30", "output_per_mtok": "60"}}
    doc = yaml.safe_load(processes.config.read_text())
    doc["deployments"] |= {"cheap": cheap, "dear": dear}
    doc["models"] |= {
        "thrifty": {
            "deployments": [{"deployment": "cheap"}],
            "fallbacks": ["premium"],
            "retry": {"retries": {"server_error": 0}},
        },
        "premium": {"deployments": [{"deployment": "dear"}]},
    }
    write_config(processes.config, doc)
    jobs = [ask(f"thrifty {i}") for i in range(200)]
    for job in jobs:
        job.request.model = "thrifty"
    tokens = token_bound(jobs[0].request, image_tokens=3000, max_output=4096)
    dearest = estimated_cost(price_card(parse(doc, {}, PROVIDERS).deployments["dear"]), *tokens)
    assert dearest is not None
    limit = (dearest * 20).quantize(Decimal("0.01"), ROUND_UP)  # about 20 at the dear price
    await set_budget(database_url, limit)
    async with aiohttp.ClientSession() as session:
        await FakeControl(session, own_fake_port).set(rate_500=1.0)
    start(processes, "ledger", "worker", "router")

    results = await run(broker_url, jobs)
    final = await eventually(lambda: figures(database_url), settled, timeout=30)

    served = Counter(r.deployment for r in results if r.status == "ok")
    assert set(served) == {"dear"}  # every answer came from the fallback
    assert any(r.error and r.error.kind == ErrorKind.BUDGET_EXCEEDED for r in results)
    assert final["spent"] <= limit
    assert (final["held"], final["reserved"]) == (0, 0)


async def test_two_gateways_share_one_budget_without_overspending_it(stack: Stack) -> None:
    processes, _, database_url = stack
    issued = await in_db(database_url, lambda c: keys.create(c, team="acme"))
    body = {
        "model": "metered",
        "messages": [{"role": "user", "content": "question"}],
        "max_tokens": MAX_TOKENS,
    }
    limit = (worst_case(processes, ask("question")) * 60).quantize(Decimal("0.01"), ROUND_UP)
    await set_budget(database_url, limit)
    start(processes, "ledger", "worker")
    ports = [free_port(), free_port()]
    for n, port in enumerate(ports, 1):
        processes.start(f"gateway-{n}", "gateway", "--port", str(port))
    for n in (1, 2):
        processes.wait_for(f"gateway-{n}", "gateway started")

    async def one(session: aiohttp.ClientSession, i: int) -> tuple[int, str, str | None]:
        url = f"http://127.0.0.1:{ports[i % 2]}/v1/chat/completions"
        async with session.post(url, json=body) as response:
            answer = await response.json()
            code = answer["error"]["code"] if response.status != 200 else "ok"
            return response.status, code, response.headers.get("x-modelyard-cost")

    headers = {"authorization": f"Bearer {issued.secret}"}
    connector = aiohttp.TCPConnector(limit=64)
    async with aiohttp.ClientSession(headers=headers, connector=connector) as session:
        answers = await asyncio.gather(*(one(session, i) for i in range(300)))
    final = await eventually(lambda: figures(database_url), settled, timeout=30)

    codes = Counter(code for _, code, _ in answers)
    assert set(codes) == {"ok", "budget_exceeded"}
    assert codes["budget_exceeded"] > 0  # the budget did bind
    assert all(status == 429 for status, code, _ in answers if code == "budget_exceeded")
    assert final["spent"] <= limit
    billed = sum(Decimal(cost) for status, _, cost in answers if status == 200 and cost)
    assert final["spent"] == final["ledger"] == billed
    # Both gateways admitted and refused: the guarantee held across processes.
    for i in (0, 1):
        mine = [code for n, (_, code, _) in enumerate(answers) if n % 2 == i]
        assert "ok" in mine
        assert "budget_exceeded" in mine


async def test_a_router_waits_out_a_database_outage_holding_its_messages(
    stack: Stack, tmp_path: Path
) -> None:
    """Admission needs Postgres (the key): while it is away the router holds
    the message instead of handing it back until the broker's delivery limit
    dead-letters it with the producer's key in it; once Postgres is back the
    job runs."""
    processes, broker_url, database_url = stack
    issued = await in_db(database_url, lambda c: keys.create(c, team="acme"))
    proxy = TcpProxy(target_port=5432)
    await proxy.start()
    doc = yaml.safe_load(processes.config.read_text())
    doc["database_url"] = database_url.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")
    router = Processes(write_config(tmp_path / "router.yaml", doc), tmp_path)
    start(processes, "ledger", "worker")
    router.start("router", "router")
    try:
        router.wait_for("router", "router started")
        await proxy.cut()
        job = ask("while the database is away", key=issued.secret)
        async with await Client.connect(broker_url) as client:
            answer = asyncio.ensure_future(client.complete(job, timeout=90))
            await asyncio.sleep(15)  # past the 10 s a gateway would wait
            assert not answer.done()
            await proxy.start()
            result = await answer
    finally:
        router.stop()
        await proxy.cut()

    assert result.status == "ok"
    assert not result.redelivered  # held, never handed back
    assert not router.events("router", "handler failed; message requeued")
    assert issued.secret not in "".join(await dead_letters(broker_url))
