"""Keys, approvals and budgets against the real database, and admission as a
library (no broker): what is stored, what is refused and why, what is
reserved, settled, released and expired."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import pytest
import pytest_asyncio

from ledger import store
from modelyard import budgets
from modelyard.budgets import Budget, Claim
from modelyard.client import new_job
from modelyard.config import Config, parse
from modelyard.database import Database
from router import approvals, keys
from router.admission import Admission
from router.routing import build_route_table
from schemas.chat import Message
from schemas.costs import CostEvent
from schemas.errors import ErrorKind
from schemas.jobs import CompletionJob
from schemas.results import Usage
from tests.services import fresh_database
from workers.providers import PROVIDERS
from workers.ratelimit import DeploymentLimiter

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest.fixture(scope="module")
def access_db() -> Iterator[str]:
    """A database of this module's own: its budgets bind nobody else's jobs."""
    with fresh_database() as url:
        yield url


@pytest_asyncio.fixture(loop_scope="module")
async def conn(access_db: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(access_db)
    yield connection
    await connection.execute(
        "TRUNCATE api_keys, model_approvals, budgets, budget_usage, budget_reservations"
    )
    await connection.close()


# Keys.


async def test_a_key_is_stored_only_as_a_hash_and_found_by_its_secret(
    conn: asyncpg.Connection,
) -> None:
    issued = await keys.create(conn, team="acme", allowed_models=["chat"], name="ci")

    assert issued.secret.startswith("my-")
    assert len(issued.secret) >= 35
    dump = await conn.fetchval("SELECT row_to_json(k)::text FROM api_keys k")
    assert issued.secret not in dump
    assert issued.secret[10:] not in dump  # not even most of it
    found = await keys.KeyCache().lookup(conn, [issued.secret, "my-" + "x" * 32])
    assert found[issued.secret] is not None
    assert found[issued.secret].team == "acme"  # type: ignore[union-attr]
    assert found["my-" + "x" * 32] is None


async def test_revoked_and_expired_keys_are_refused_with_the_reason(
    conn: asyncpg.Connection,
) -> None:
    now = datetime.now(UTC)
    revoked = await keys.create(conn, user="bob")
    expired = await keys.create(conn, user="bob", expires_at=now - timedelta(seconds=1))
    assert await keys.revoke(conn, revoked.record.id)
    assert not await keys.revoke(conn, revoked.record.id)  # already

    found = await keys.KeyCache().lookup(conn, [revoked.secret, expired.secret])
    now = datetime.now(UTC)
    assert "was revoked" in (found[revoked.secret].refusal(now) or "")  # type: ignore[union-attr]
    assert "expired" in (found[expired.secret].refusal(now) or "")  # type: ignore[union-attr]


async def test_rotation_keeps_the_principal_and_lets_the_old_secret_run_out(
    conn: asyncpg.Connection,
) -> None:
    old = await keys.create(conn, team="acme", project="search", allowed_tags=["eu"])
    new = await keys.rotate(conn, old.record.id, grace_s=60)
    assert new is not None
    found = await keys.KeyCache().lookup(conn, [old.secret, new.secret])
    now = datetime.now(UTC)
    old_record, new_record = found[old.secret], found[new.secret]
    assert old_record is not None
    assert new_record is not None
    assert (new_record.team, new_record.project, new_record.allowed_tags) == (
        "acme",
        "search",
        ["eu"],
    )
    assert old_record.refusal(now) is None  # within its grace
    assert old_record.refusal(now + timedelta(seconds=61)) is not None
    assert old_record.replaced_by == new_record.id


async def test_a_revocation_reaches_a_cached_key_within_the_cache_time(
    conn: asyncpg.Connection,
) -> None:
    issued = await keys.create(conn, team="acme")
    cache = keys.KeyCache(ttl_s=0.3)
    assert (await cache.lookup(conn, [issued.secret]))[issued.secret] is not None
    await keys.revoke(conn, issued.record.id)
    await asyncio.sleep(0.35)
    record = (await cache.lookup(conn, [issued.secret]))[issued.secret]
    assert record is not None
    assert record.refusal(datetime.now(UTC)) is not None


# Approvals.


async def test_approvals_keep_their_whole_history(conn: asyncpg.Connection) -> None:
    await approvals.record(conn, "chat", "approve", actor="alice", note="DPA signed")
    await approvals.record(conn, "chat", "revoke", actor="carol", note="incident 42")
    await approvals.record(conn, "other", "approve", actor="alice")

    assert await approvals.approved(conn) == {"other"}
    trail = [(d.model, d.action, d.actor, d.note) for d in await approvals.history(conn, "chat")]
    assert trail == [
        ("chat", "approve", "alice", "DPA signed"),
        ("chat", "revoke", "carol", "incident 42"),
    ]
    with pytest.raises(ValueError, match="who decides"):
        await approvals.record(conn, "chat", "approve", actor=" ")


# Budgets.


def claim(amount: str, team: str = "acme", job_id: str | None = None) -> Claim:
    return Claim(
        reservation=uuid.uuid4().hex,
        job_id=job_id or uuid.uuid4().hex,
        amount=Decimal(amount),
        subjects=(("global", ""), ("team", team)),
    )


async def reserve(conn: asyncpg.Connection, claims: list[Claim], ttl_s: float = 60) -> Any:
    async with conn.transaction():
        return await budgets.reserve(conn, claims, ttl_s=ttl_s)


async def test_reservations_stop_at_the_limit_and_say_which_budget(
    conn: asyncpg.Connection,
) -> None:
    await budgets.set_budget(conn, "team", "acme", period="monthly", limit=Decimal("1.00"))
    first = [claim("0.30") for _ in range(4)]

    verdicts = await reserve(conn, first)

    # Reserved: each says what its budget had left after it.
    assert verdicts[:3] == [Decimal("0.70"), Decimal("0.40"), Decimal("0.10")]
    refused = verdicts[3]
    assert isinstance(refused, Budget)
    assert (refused.scope, refused.subject, refused.reserved) == ("team", "acme", Decimal("0.9"))
    message = budgets.refusal_message(refused, Decimal("0.30"))
    assert "team acme (monthly)" in message
    assert "limit $1.00" in message
    assert "resets at" in message
    # The same job id admitted again (a producer reusing it, or a redelivery
    # after a router crash) is a new reservation: no room for it here.
    again = claim("0.30", job_id=first[0].job_id)
    assert isinstance((await reserve(conn, [again]))[0], Budget)
    (acme,) = await budgets.current(conn)
    assert acme.reserved == Decimal("0.9")
    # A team without a budget is not limited by acme's.
    assert await reserve(conn, [claim("5", team="other")]) == [False]


async def test_concurrent_admissions_on_many_connections_never_pass_the_limit(
    access_db: str, conn: asyncpg.Connection
) -> None:
    await budgets.set_budget(conn, "team", "acme", period="none", limit=Decimal("10"))
    pool = await asyncpg.create_pool(access_db, min_size=6, max_size=6)

    async def one_message() -> list[Any]:
        async with pool.acquire() as c, c.transaction():
            return await budgets.reserve(c, [claim("0.07") for _ in range(8)], ttl_s=60)

    try:
        results = await asyncio.gather(*(one_message() for _ in range(60)))
    finally:
        await pool.close()
    admitted = sum(1 for verdicts in results for v in verdicts if isinstance(v, Decimal))
    assert admitted == int(Decimal("10") / Decimal("0.07"))  # exactly what fits: 142
    (acme,) = await budgets.current(conn)
    assert acme.reserved == Decimal("0.07") * admitted
    assert acme.reserved <= acme.limit


def cost_event(
    job_id: str,
    cost: str,
    *,
    final: bool = False,
    team: str = "acme",
    reservation: str | None = None,
) -> CostEvent:
    return CostEvent(
        event_id=uuid.uuid4(),
        job_id=job_id,
        occurred_at=datetime.now(UTC),
        provider="openai",
        deployment="d",
        provider_model="gpt-4o-mini",
        model="chat",
        usage=Usage(input_tokens=10, output_tokens=5),
        cost=Decimal(cost),
        price_source="override",
        team=team,
        final=final,
        reservation=reservation,
    )


async def test_the_ledger_settles_spend_once_and_releases_with_the_last_call(
    conn: asyncpg.Connection,
) -> None:
    await budgets.set_budget(conn, "team", "acme", period="daily", limit=Decimal("1"))
    job = claim("0.50")
    assert await reserve(conn, [job]) == [Decimal("0.50")]
    billed_failure = cost_event(job.job_id, "0.01", reservation=job.reservation)
    last = cost_event(job.job_id, "0.04", final=True, reservation=job.reservation)

    await store.write_batch(conn, [billed_failure])
    (acme,) = await budgets.current(conn)
    assert (acme.spent, acme.reserved) == (Decimal("0.01"), Decimal("0.5"))  # still running
    await store.write_batch(conn, [last])
    await store.write_batch(conn, [billed_failure, last])  # redelivered: nothing twice

    (acme,) = await budgets.current(conn)
    assert (acme.spent, acme.reserved) == (Decimal("0.05"), Decimal("0"))
    assert await conn.fetchval("SELECT count(*) FROM budget_reservations") == 0
    unbilled = claim("0.5")
    await reserve(conn, [unbilled])
    await store.write_batch(conn, [], releases=[unbilled.reservation])  # ended unbilled
    (acme,) = await budgets.current(conn)
    assert acme.reserved == Decimal("0")


async def test_reservations_nobody_settles_expire_and_the_budget_is_whole_again(
    conn: asyncpg.Connection,
) -> None:
    await budgets.set_budget(conn, "team", "acme", period="none", limit=Decimal("1"))
    assert await reserve(conn, [claim("0.9")], ttl_s=1) == [Decimal("0.1")]  # its process then dies
    assert isinstance((await reserve(conn, [claim("0.9")]))[0], Budget)  # refused

    await asyncio.sleep(1.1)

    assert await budgets.expire(conn) == 1  # the team budget got its share back
    (acme,) = await budgets.current(conn)
    assert acme.reserved == Decimal("0")
    assert await reserve(conn, [claim("0.9")]) == [Decimal("0.1")]


async def test_a_period_is_taken_in_the_budgets_time_zone(conn: asyncpg.Connection) -> None:
    at = datetime(2026, 3, 31, 22, 30, tzinfo=UTC)  # already April 1st in Berlin
    starts = {
        period: await conn.fetchval(
            "SELECT budget_period_start($1, 'Europe/Berlin', $2)", period, at
        )
        for period in ("daily", "weekly", "monthly", "none")
    }
    assert starts["daily"] == datetime(2026, 3, 31, 22, 0, tzinfo=UTC)
    assert starts["monthly"] == datetime(2026, 3, 31, 22, 0, tzinfo=UTC)
    assert starts["weekly"] == datetime(2026, 3, 29, 22, 0, tzinfo=UTC)  # Monday, local
    assert starts["none"] == datetime(1970, 1, 1, tzinfo=UTC)


async def test_spend_lands_in_the_period_its_job_was_admitted_in(
    conn: asyncpg.Connection,
) -> None:
    """A job admitted just before midnight and billed just after counts in
    the day that reserved it: the new day's check never missed it."""
    await budgets.set_budget(conn, "team", "acme", period="daily", limit=Decimal("1"))
    job = claim("0.2")
    await reserve(conn, [job])
    yesterday = datetime.now(UTC) - timedelta(days=1)
    await conn.execute(
        "UPDATE budget_usage SET period_start = period_start - interval '1 day'"
    )  # as if it had been admitted yesterday
    await conn.execute(
        "UPDATE budget_reservations SET period_start = period_start - interval '1 day'"
    )

    await store.write_batch(
        conn, [cost_event(job.job_id, "0.15", final=True, reservation=job.reservation)]
    )

    rows = await conn.fetch(
        "SELECT period_start, spent, reserved FROM budget_usage "
        "WHERE scope = 'team' ORDER BY period_start"
    )
    assert [(r["spent"], r["reserved"]) for r in rows] == [(Decimal("0.15"), Decimal("0"))]
    assert rows[0]["period_start"] < yesterday + timedelta(hours=1)


# Admission as a library.


def access_config(
    database_url: str,
    *,
    more_deployments: dict[str, Any] | None = None,
    more_models: dict[str, Any] | None = None,
    **access: Any,
) -> Config:
    deployment = {"provider": "openai", "model": "gpt-4o-mini", "pool": "p"}
    doc = {
        "database_url": database_url,
        "access": access,
        "deployments": {
            "eu-mini": {**deployment, "tags": ["eu"], "price": _price("0.15", "0.60")},
            "us-mini": {**deployment, "tags": ["us"], "price": _price("0.15", "0.60")},
            "big": {**deployment, "model": "gpt-4o", "price": _price("2.50", "10")},
            "mystery": {**deployment, "model": "in-house"},
        },
        "models": {
            "chat": {
                "deployments": [{"deployment": "eu-mini"}, {"deployment": "us-mini"}],
                "fallbacks": ["large"],
            },
            "large": {"deployments": [{"deployment": "big"}]},
            "odd": {"deployments": [{"deployment": "mystery"}]},
        },
    }
    doc["deployments"] |= more_deployments or {}
    doc["models"] |= more_models or {}
    return parse(doc, {}, PROVIDERS)


def _price(inp: str, out: str) -> dict[str, str]:
    return {"input_per_mtok": inp, "output_per_mtok": out}


def job(model: str = "chat", key: str | None = None, **params: Any) -> CompletionJob:
    j = new_job(model, [Message(role="user", content="hello")], **params)
    j.api_key = key
    return j


@pytest_asyncio.fixture(loop_scope="module")
async def admission(access_db: str) -> AsyncIterator[Any]:
    made: list[Admission] = []

    def make(**access: Any) -> Admission:
        config = access_config(access_db, **access)
        made.append(Admission(config, build_route_table(config)))
        return made[-1]

    yield make
    for a in made:
        await a.close()


async def test_admission_takes_the_principal_from_the_key_and_removes_the_key(
    conn: asyncpg.Connection, admission: Any
) -> None:
    issued = await keys.create(conn, team="acme", project="p1", user="ann", allowed_tags=["eu"])
    forged = job(key=issued.secret, metadata=None)
    forged.metadata.team = "someone-else"
    forged.key_id = "key_forged"

    (verdict,) = await admission(require_key=True).admit([forged])

    assert verdict is None
    assert forged.api_key is None
    assert (forged.key_id, forged.metadata.team, forged.metadata.project) == (
        issued.record.id,
        "acme",
        "p1",
    )
    assert forged.constraints is not None
    assert forged.constraints.tags == ["eu"]


async def test_admission_keeps_what_the_producer_asked_before_narrowing_it(
    conn: asyncpg.Connection, admission: Any
) -> None:
    """The key's tags narrow the job's constraints; what the producer asked
    is kept beside them (a replay is narrowed afresh from it), and a
    producer cannot set it."""
    from schemas.jobs import Constraints  # noqa: PLC0415

    issued = await keys.create(conn, team="acme", allowed_tags=["eu"])
    asked = job(key=issued.secret)
    asked.constraints = Constraints(providers=["openai"])
    asked.constraints_asked = Constraints(providers=["anthropic"])  # forged

    (verdict,) = await admission(require_key=True).admit([asked])

    assert verdict is None
    assert asked.constraints is not None
    assert (asked.constraints.providers, asked.constraints.tags) == (["openai"], ["eu"])
    assert asked.constraints_asked == Constraints(providers=["openai"])


async def test_admission_refusals_say_what_to_do(conn: asyncpg.Connection, admission: Any) -> None:
    only_large = await keys.create(conn, team="acme", allowed_models=["large"])
    gone = await keys.create(conn, team="acme")
    await keys.revoke(conn, gone.record.id)
    await approvals.record(conn, "large", "approve", actor="alice")
    strict = admission(require_key=True, require_approval=True, cache_s=0.1)

    verdicts = await strict.admit(
        [
            job(),  # no key
            job(key="my-" + "z" * 32),  # not ours
            job(key=gone.secret),
            job(key=only_large.secret),  # chat: not allowed for this key
            job("large", key=only_large.secret),  # allowed and approved
        ]
    )
    kinds = [v.kind if v else None for v in verdicts]
    assert kinds == [
        ErrorKind.UNAUTHORIZED,
        ErrorKind.UNAUTHORIZED,
        ErrorKind.UNAUTHORIZED,
        ErrorKind.MODEL_NOT_ALLOWED,
        None,
    ]
    assert "modelyard keys create" in verdicts[0].message  # type: ignore[union-attr]
    assert "revoked" in verdicts[2].message  # type: ignore[union-attr]
    assert "it may use: large" in verdicts[3].message  # type: ignore[union-attr]

    anyone = await keys.create(conn, team="acme")
    (unapproved,) = await strict.admit([job(key=anyone.secret)])
    assert unapproved is not None
    assert unapproved.kind == ErrorKind.MODEL_NOT_APPROVED
    assert "modelyard models approve chat" in unapproved.message


async def test_a_job_reserves_its_worst_case_at_the_dearest_deployment_it_may_reach(
    conn: asyncpg.Connection, admission: Any
) -> None:
    await budgets.set_budget(conn, "team", "acme", period="none", limit=Decimal("100"))
    gate = admission()
    capped = job(metadata=None)
    capped.metadata.team = "acme"

    (verdict,) = await gate.admit([capped])

    assert verdict is None
    assert capped.reservation is not None
    assert capped.request.max_tokens == 4096  # the cap, enforced from now on
    amount = await conn.fetchval(
        "SELECT amount FROM budget_reservations WHERE job_id = $1 AND scope = 'team'", capped.id
    )
    # Priced at `big` (its fallback), the dearest: 4096 output tokens at $10/M and more.
    assert amount > Decimal("4096") * Decimal("10") / 1_000_000
    unpriced = job("odd", metadata=None)
    unpriced.metadata.team = "acme"
    (refused,) = await gate.admit([unpriced])
    assert refused is not None
    assert refused.kind == ErrorKind.BUDGET_EXCEEDED
    assert "no known price" in refused.message


# Rate limits (the lease bookkeeping; tests/test_ratelimit.py runs the minute).


async def test_rate_limit_leases_are_shared_and_stop_at_the_limit(access_db: str) -> None:
    from modelyard.database import Database  # noqa: PLC0415
    from workers.ratelimit import DeploymentLimiter  # noqa: PLC0415

    db_a, db_b = Database(access_db), Database(access_db)
    deployment = f"limited-{uuid.uuid4().hex[:6]}"
    # Two processes' limiters on one deployment at 10 requests a minute.
    a = DeploymentLimiter(db_a, deployment, rpm=10, tpm=None)
    b = DeploymentLimiter(db_b, deployment, rpm=10, tpm=None)
    try:
        for limiter in (a, b) * 5:
            await limiter.acquire(tokens=10)
        blocked = asyncio.create_task(a.acquire(tokens=10))
        done, _ = await asyncio.wait({blocked}, timeout=1.0)
        blocked.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await blocked
        conn = await asyncpg.connect(access_db)
        try:
            counted = await conn.fetchval(
                "SELECT sum(requests) FROM rate_usage WHERE deployment = $1", deployment
            )
        finally:
            await conn.close()
    finally:
        await db_a.close()
        await db_b.close()
    assert not done  # the eleventh call of the minute waits
    assert counted == 10


async def test_a_keys_and_a_teams_requests_per_minute_are_held_at_admission(
    conn: asyncpg.Connection, admission: Any
) -> None:
    five_a_minute = await keys.create(conn, team="acme", rpm=5)
    other = await keys.create(conn, team="capped")
    gate = admission(teams={"capped": {"rpm": 3}})

    first = await gate.admit([job(key=five_a_minute.secret) for _ in range(4)])
    second = await gate.admit([job(key=five_a_minute.secret) for _ in range(3)])
    team = await gate.admit([job(key=other.secret) for _ in range(4)])

    assert first == [None] * 4
    assert [v.kind if v else None for v in second] == [
        None,
        ErrorKind.RATE_LIMITED,
        ErrorKind.RATE_LIMITED,
    ]
    refusal = second[1]
    assert refusal is not None
    assert refusal.retry_after_s is not None
    assert 0 < refusal.retry_after_s <= 65.1
    assert (
        f"key {five_a_minute.record.id} is over its limit of 5 requests a minute" in refusal.message
    )
    assert [v.kind if v else None for v in team] == [None, None, None, ErrorKind.RATE_LIMITED]
    assert "team capped" in team[3].message  # type: ignore[union-attr]


async def test_crossing_the_alert_share_is_announced_once_per_period(
    conn: asyncpg.Connection,
) -> None:
    await budgets.set_budget(
        conn, "team", "acme", period="daily", limit=Decimal("1"), alert_share=Decimal("0.5")
    )
    below = await store.write_batch(conn, [cost_event(uuid.uuid4().hex, "0.40")])
    crossing = await store.write_batch(conn, [cost_event(uuid.uuid4().hex, "0.20")])
    beyond = await store.write_batch(conn, [cost_event(uuid.uuid4().hex, "0.20")])

    assert below == []
    assert [(a.scope, a.subject, a.period, a.spent, a.limit) for a in crossing] == [
        ("team", "acme", "daily", Decimal("0.6"), Decimal("1"))
    ]
    assert beyond == []  # once per budget and period


async def test_a_team_is_held_to_its_models_and_deployment_tags(
    conn: asyncpg.Connection, admission: Any
) -> None:
    eu_only = await keys.create(conn, team="regulated")
    gate = admission(teams={"regulated": {"models": ["chat"], "tags": ["eu"]}})

    allowed, refused = await gate.admit([job(key=eu_only.secret), job("large", key=eu_only.secret)])

    assert allowed is None
    assert refused is not None
    assert refused.kind == ErrorKind.MODEL_NOT_ALLOWED
    assert "team regulated may not use 'large'; it may use: chat" in refused.message
    routes = build_route_table(access_config(gate.config.database_url))
    pinned = job(key=eu_only.secret)
    await gate.admit([pinned])
    group = routes.resolve("chat")
    assert group is not None
    assert [t.deployment for t in routes.allowed(group.deployments, pinned.constraints)] == [
        "eu-mini"
    ]
    # Its fallback (`large`) is not a model the team may use: never reached.
    assert pinned.constraints is not None
    assert "big" not in (pinned.constraints.deployments or [])


async def test_the_worst_case_reaches_every_chain_of_every_fallback(access_db: str) -> None:
    """`chat` falls back to `large`, whose context-window fallback is `huge`:
    a job for `chat` may end on `huge`, so it is priced there too."""
    giant = {"provider": "openai", "model": "gpt-4o", "pool": "p", "price": _price("100", "400")}
    config = access_config(
        access_db,
        more_deployments={"giant": giant},
        more_models={
            "large": {"deployments": [{"deployment": "big"}], "context_window_fallbacks": ["huge"]},
            "huge": {"deployments": [{"deployment": "giant"}]},
        },
    )
    gate = Admission(config, build_route_table(config))
    try:
        reached = {group.name for group in gate._reachable(job())}
    finally:
        await gate.close()

    assert reached == {"chat", "large", "huge"}


async def test_rate_limit_buckets_follow_the_database_clock_not_the_hosts(
    access_db: str, conn: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker whose host clock is an hour ahead still counts its lease in
    the bucket every other worker is counting in now."""
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 3600)
    db = Database(access_db)
    try:
        limiter = DeploymentLimiter(db, "skewed", rpm=600, tpm=None)
        await limiter.acquire(10)
    finally:
        await db.close()
    buckets = await conn.fetch(
        "SELECT bucket, requests, now() AS db_now FROM rate_usage WHERE deployment = 'skewed'"
    )
    assert len(buckets) == 1
    assert buckets[0]["requests"] == 12  # one slice, 2% of 600
    assert abs((buckets[0]["db_now"] - buckets[0]["bucket"]).total_seconds()) < 10
