"""Admission: who the job is for, whether they may use its model, and whether
its worst-case cost fits every budget over it. A library: the router calls
it for each incoming message, and the HTTP gateway will call it in-process.

Batch-shaped: `admit` decides every job of a message at once, with at most
one key lookup, one approval refresh and one budget transaction, however
many jobs the message holds. What admission asks of Postgres (keys,
approvals, which budgets exist) is cached for `access.cache_s`, so a job
that needs no budget costs no database round trip at all.

What it changes on an admitted job: the virtual key is removed (it goes no
further than this module), `key_id` and the metadata's team, project and
user become the key's, the deployments it may reach are narrowed to those of
allowed, approved models (and the key's tags), a job under a budget without
`max_tokens` gets the configured cap, and `reservation` names the budget
reservation its end must release.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Generic, TypeVar

import msgspec
import structlog

from modelyard import budgets, ratewindow
from modelyard.budgets import Budget, Claim, Principal, refusal_message
from modelyard.config import Config, ModelGroup
from modelyard.database import Conn, Database
from modelyard.prices import estimated_cost, estimated_tokens, token_bound
from router import approvals
from router.keys import KeyCache, KeyRecord, by_id, newest_of
from router.routing import RouteTable
from schemas.chat import ChatRequest, Message
from schemas.errors import ErrorKind, JobError, job_error
from schemas.jobs import CompletionJob, Constraints

log = structlog.get_logger("modelyard.admission")

T = TypeVar("T")

# How long admission keeps trying a database that is away before it gives
# up (the gateway then answers 503). The router waits for as long as it
# takes instead (`database_patience_s=None`), holding the message: handed
# back again and again, it would reach the queue's delivery limit and be
# dead-lettered by the broker with the producer's key still in it.
DATABASE_PATIENCE_S = 10.0

# Stands in for the secret of a key identified before admission (`owner`).
_OWNER = "\x00owner"


class Admission:
    """Admission decisions for one router (or gateway) process."""

    def __init__(
        self,
        config: Config,
        routes: RouteTable,
        *,
        database_patience_s: float | None = DATABASE_PATIENCE_S,
    ) -> None:
        self.config = config
        self.settings = config.access
        self.routes = routes
        self.patience_s = database_patience_s
        self.db = Database(config.database_url)
        self.keys = KeyCache(self.settings.cache_s)
        self._approved: Cached[set[str]] = Cached(self.settings.cache_s)
        self._budgeted: Cached[set[tuple[str, str]]] = Cached(self.settings.cache_s)

    async def close(self) -> None:
        """Close the database pool."""
        await self.db.close()

    async def admit(
        self, jobs: list[CompletionJob], *, owner: KeyRecord | None = None
    ) -> list[JobError | None]:
        """One decision per job (None: admitted, and changed as the module
        says). Raises only when the database stayed away too long: the
        caller then hands the message back to the broker.

        `owner`: every job is for this key, identified earlier (a Batch API
        batch runs long after its key was shown, and only its id is kept);
        it is still refused if the key was revoked or expired since."""
        now = datetime.now(UTC)
        for job in jobs:
            job.constraints_asked = None  # set below, only by narrowing
        if owner is not None:
            for job in jobs:
                job.api_key = _OWNER
            records: dict[str, KeyRecord | None] = {_OWNER: owner}
        else:
            records = await self._key_records(jobs)
        approved = await self._approved_models() if self.settings.require_approval else None
        verdicts: list[JobError | None] = []
        for job in jobs:
            secret, job.api_key = job.api_key, None  # the key goes no further
            record = records.get(secret) if secret else None
            refusal = self._identify(job, secret, record, now)
            if refusal is None:
                self._team_pins(job)
                refusal = self._models(job, record, approved)
            verdicts.append(refusal)
        for step in (self._within_limits, self._reserve):
            admitted = [i for i, verdict in enumerate(verdicts) if verdict is None]
            refusals = await step([jobs[i] for i in admitted], records)
            for i, refusal in zip(admitted, refusals, strict=True):
                verdicts[i] = refusal
        return verdicts

    async def current_key(self, key_id: str) -> KeyRecord | None:
        """The key that stands for `key_id` now: the newest of its lineage
        (a rotation carries on to the new key), revoked or not (admission
        refuses a revoked one); None when there is no such key."""

        async def lookup(conn: Any) -> KeyRecord | None:
            record = await by_id(conn, key_id)
            return None if record is None else await newest_of(conn, record.lineage)

        return await self._db(lookup, "key lookup")

    async def identify(self, secret: str | None) -> KeyRecord | JobError | None:
        """The key a caller holds (None without one, where keys are
        optional), or why it is refused."""
        identified = await self._identified(secret)
        return identified if isinstance(identified, JobError) else identified[1]

    async def usable_models(self, secret: str | None) -> list[str] | JobError:
        """The model groups a caller holding `secret` may use now (allowed
        for its key and team, and approved where approval is required), or
        why the key is refused; for `GET /v1/models`."""
        identified = await self._identified(secret)
        if isinstance(identified, JobError):
            return identified
        probe, record = identified
        approved = await self._approved_models() if self.settings.require_approval else None
        usable = []
        for name in sorted(self.config.models):
            probe.request.model, probe.constraints = name, None
            if self._models(probe, record, approved) is None:
                usable.append(name)
        return usable

    # Who.

    async def _identified(
        self, secret: str | None
    ) -> tuple[CompletionJob, KeyRecord | None] | JobError:
        """A job standing for the caller holding `secret`, with its principal
        set as admission would set it, and the key's record; or why the key
        is refused."""
        probe = CompletionJob(
            id="probe", request=ChatRequest(model="-", messages=[Message(role="user")])
        )
        probe.api_key = secret
        record = (await self._key_records([probe])).get(secret) if secret else None
        refusal = self._identify(probe, secret, record, datetime.now(UTC))
        return refusal if refusal is not None else (probe, record)

    async def _key_records(self, jobs: list[CompletionJob]) -> dict[str, KeyRecord | None]:
        secrets = [job.api_key for job in jobs if job.api_key]
        if not secrets:
            return {}
        return await self._db(lambda conn: self.keys.lookup(conn, secrets), "key lookup")

    def _identify(
        self, job: CompletionJob, secret: str | None, record: KeyRecord | None, now: datetime
    ) -> JobError | None:
        """Set the job's principal from its key; refuse a missing, unknown,
        revoked or expired key. A job without a key (where none is required)
        keeps the principal its metadata names, but may not claim a key id."""
        job.key_id = None
        if secret is None:
            if self.settings.require_key:
                return job_error(
                    ErrorKind.UNAUTHORIZED,
                    "this gateway requires a virtual key in the job's `api_key`; "
                    "a platform owner issues one with `modelyard keys create`",
                    field="$.api_key",
                )
            return None
        if record is None:
            return job_error(
                ErrorKind.UNAUTHORIZED,
                "the job's `api_key` is not a key this gateway issued "
                "(check for a typo, or ask a platform owner for a new one)",
                field="$.api_key",
            )
        if (problem := record.refusal(now)) is not None:
            return job_error(ErrorKind.UNAUTHORIZED, problem, field="$.api_key")
        job.key_id = record.id
        job.metadata.team, job.metadata.project = record.team, record.project
        job.metadata.user = record.user
        if record.allowed_tags:
            _narrow(job, tags=record.allowed_tags)
        return None

    def _team_pins(self, job: CompletionJob) -> None:
        """Pin the job to its team's deployment tags, if the team has some."""
        team = self.settings.teams.get(job.metadata.team or "")
        if team is not None and team.tags:
            _narrow(job, tags=team.tags)

    # Which models.

    def _models(
        self, job: CompletionJob, record: KeyRecord | None, approved: set[str] | None
    ) -> JobError | None:
        """Refuse a model the key may not use or nobody approved; narrow the
        job's fallbacks to models it may use."""
        group = self.routes.resolve(job.request.model)
        if group is None:
            return None  # answered `unknown_model` by routing
        allowed: set[str] | None = None
        for who, models in self._model_lists(job, record):
            allowed = set(models) if allowed is None else allowed & set(models)
            if not _names(group) & set(models):
                listed = ", ".join(sorted(models))
                return job_error(
                    ErrorKind.MODEL_NOT_ALLOWED,
                    f"{who} may not use {job.request.model!r}; it may use: {listed}. "
                    "Ask a platform owner to widen it",
                    field="$.request.model",
                )
        if approved is not None and group.name not in approved:
            return job_error(
                ErrorKind.MODEL_NOT_APPROVED,
                f"model {group.name!r} is not approved for use here; a platform owner can "
                f"approve it with `modelyard models approve {group.name} --by NAME`",
                field="$.request.model",
            )
        if allowed is not None or approved is not None:
            usable = self._usable_deployments(job, allowed, approved)
            _narrow(job, deployments=sorted(usable))
        return None

    def _model_lists(
        self, job: CompletionJob, record: KeyRecord | None
    ) -> list[tuple[str, list[str]]]:
        """The allowed-model lists over a job: its key's and its team's."""
        lists = []
        if record is not None and record.allowed_models:
            lists.append((f"key {record.id}", record.allowed_models))
        team = self.settings.teams.get(job.metadata.team or "")
        if team is not None and team.models:
            lists.append((f"team {job.metadata.team}", team.models))
        return lists

    def _usable_deployments(
        self, job: CompletionJob, allowed: set[str] | None, approved: set[str] | None
    ) -> set[str]:
        """Deployments of every model the job may reach that it may use."""
        return {
            target.deployment
            for group in self._reachable(job)
            if (allowed is None or _names(group) & allowed)
            and (approved is None or group.name in approved)
            for target in group.deployments
        }

    def _reachable(self, job: CompletionJob) -> list[ModelGroup]:
        """The job's model and every model its chains may move it to."""
        group = self.routes.resolve(job.request.model)
        if group is None:
            return []
        own = job.fallbacks if self.config.allow_job_fallbacks else None
        seen: dict[str, ModelGroup] = {group.name: group}
        frontier = [group]
        while frontier:  # every chain, from every model reached (a fallback's own chains too)
            current = frontier.pop()
            for reason in (
                ErrorKind.SERVER_ERROR,
                ErrorKind.CONTEXT_WINDOW_EXCEEDED,
                ErrorKind.CONTENT_POLICY,
            ):
                for reached in self.routes.chain(current, reason, own):
                    if reached.name not in seen:
                        seen[reached.name] = reached
                        frontier.append(reached)
        return list(seen.values())

    async def _approved_models(self) -> set[str]:
        return await self._approved.get(lambda: self._db(approvals.approved, "approval refresh"))

    # How much.

    # How fast.

    def _limits_of(
        self, job: CompletionJob, by_id: dict[str, KeyRecord]
    ) -> list[tuple[str, int | None, int | None]]:
        """The per-minute limits over a job: its key's and its team's."""
        limits: list[tuple[str, int | None, int | None]] = []
        record = by_id.get(job.key_id or "")
        if record is not None and (record.rpm or record.tpm):
            limits.append((f"key:{record.id}", record.rpm, record.tpm))
        team = self.settings.teams.get(job.metadata.team or "")
        if team is not None:
            limits.append((f"team:{job.metadata.team}", team.rpm, team.tpm))
        return limits

    async def _within_limits(
        self, jobs: list[CompletionJob], records: dict[str, KeyRecord | None]
    ) -> list[JobError | None]:
        """Count jobs against their key's and team's per-minute limits, in
        order, in one transaction; a job over one is refused `rate_limited`
        with the seconds until there is room."""
        by_id = {r.id: r for r in records.values() if r is not None}
        limited = [(job, self._limits_of(job, by_id)) for job in jobs]
        subjects = sorted({subject for _, limits in limited for subject, _, _ in limits})
        if not subjects:
            return [None] * len(jobs)
        return await self._db(lambda conn: self._count(conn, limited, subjects), "rate limits")

    async def _count(
        self,
        conn: Conn,
        limited: list[tuple[CompletionJob, list[tuple[str, int | None, int | None]]]],
        subjects: list[str],
    ) -> list[JobError | None]:
        now = await ratewindow.clock(conn)
        bucket, _ = ratewindow.bucket_at(now)
        windows = {s: await ratewindow.lock(conn, s, bucket) for s in subjects}  # in one order
        used = {s: [w.requests, w.tokens] for s, w in windows.items()}
        added = {s: [0, 0] for s in subjects}
        refusals: list[JobError | None] = []
        for job, limits in limited:
            tokens = sum(estimated_tokens(job.request))
            over = next(
                (
                    (subject, rpm, tpm)
                    for subject, rpm, tpm in limits
                    if (rpm is not None and used[subject][0] + 1 > rpm)
                    or (tpm is not None and used[subject][1] + tokens > tpm)
                ),
                None,
            )
            if over is not None:
                refusals.append(_over_limit(*over, ratewindow.reopens_in(windows[over[0]], now)))
                continue
            for subject, _, _ in limits:
                for counts in (used[subject], added[subject]):
                    counts[0] += 1
                    counts[1] += tokens
            refusals.append(None)
        for subject, (requests, tokens) in added.items():
            if requests:
                await ratewindow.add(conn, subject, bucket, requests, tokens)
        return refusals

    # How much.

    async def _reserve(
        self, jobs: list[CompletionJob], _records: dict[str, KeyRecord | None]
    ) -> list[JobError | None]:
        """Reserve each job's worst case in its budgets, in one transaction."""
        if not jobs:
            return []
        budgeted = await self._budgeted.get(lambda: self._db(budgets.subjects, "budget refresh"))
        refusals: list[JobError | None] = [None] * len(jobs)
        claims: list[tuple[int, Claim]] = []
        for i, job in enumerate(jobs):
            subjects = tuple(s for s in _principal(job).subjects() if s in budgeted)
            if not subjects:
                continue
            amount = self._worst_case(job)
            if isinstance(amount, JobError):
                refusals[i] = amount
                continue
            claim = Claim(
                reservation=uuid.uuid4().hex,
                job_id=job.id,
                amount=amount,
                subjects=subjects,
            )
            claims.append((i, claim))
        if not claims:
            return refusals
        ttl = self.settings.reservation_ttl_s
        verdicts = await self._db(
            lambda conn: budgets.reserve(conn, [c for _, c in claims], ttl_s=ttl),
            "budget reservation",
        )
        for (i, claim), verdict in zip(claims, verdicts, strict=True):
            if isinstance(verdict, Budget):
                refusals[i] = _over_budget(verdict, claim.amount)
            elif isinstance(verdict, Decimal):
                jobs[i].reservation = claim.reservation
                jobs[i].reserved_until = time.time() + ttl
                jobs[i].budget_left = verdict
        return refusals

    def _worst_case(self, job: CompletionJob) -> Decimal | JobError:
        """The most the job can cost: its token bound at the dearest
        deployment it may reach. Caps its output when it set none."""
        settings = self.settings
        if job.request.output_limit() is None:
            job.request.max_tokens = settings.max_output_tokens
        tokens = token_bound(
            job.request,
            image_tokens=settings.image_tokens,
            max_output=settings.max_output_tokens,
        )
        worst = Decimal(0)
        for group in self._reachable(job):
            for target in self.routes.allowed(group.deployments, job.constraints):
                cost = estimated_cost(self.routes.prices[target.deployment], *tokens)
                if cost is None:
                    if settings.unpriced == "refuse":
                        return job_error(
                            ErrorKind.BUDGET_EXCEEDED,
                            f"deployment {target.deployment!r} has no known price, and budgets "
                            "here refuse what they cannot price (access.unpriced: refuse); "
                            "give it a `price` in the config",
                        )
                    cost = Decimal(repr(settings.unpriced_reservation_usd))
                worst = max(worst, cost)
        return worst

    async def _db(self, work: Callable[[Conn], Awaitable[T]], what: str) -> T:
        return await self.db.run(work, what=what, give_up_after_s=self.patience_s)


class Cached(Generic[T]):
    """One value from the database, fetched again after `ttl_s` (one fetch
    at a time, however many messages ask together)."""

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._value: T | None = None
        self._until = 0.0
        self._lock = asyncio.Lock()

    async def get(self, fetch: Callable[[], Awaitable[T]]) -> T:
        """The cached value, or a fresh one when it is older than `ttl_s`."""
        if self._value is not None and time.monotonic() < self._until:
            return self._value
        async with self._lock:
            if self._value is None or time.monotonic() >= self._until:
                self._value = await fetch()
                self._until = time.monotonic() + self.ttl_s
        return self._value


def _names(group: ModelGroup) -> set[str]:
    return {group.name, *group.aliases}


def _principal(job: CompletionJob) -> Principal:
    meta = job.metadata
    return Principal(key_id=job.key_id, team=meta.team, project=meta.project, user=meta.user)


def _narrow(
    job: CompletionJob, *, deployments: list[str] | None = None, tags: list[str] | None = None
) -> None:
    """Narrow the job's constraints, keeping what the producer asked first."""
    if job.constraints_asked is None:
        asked = job.constraints
        job.constraints_asked = msgspec.structs.replace(asked) if asked else Constraints()
    job.constraints = _narrowed(job.constraints, deployments=deployments, tags=tags)


def _narrowed(
    constraints: Constraints | None,
    *,
    deployments: list[str] | None = None,
    tags: list[str] | None = None,
) -> Constraints:
    """The job's constraints, narrowed further (never widened)."""
    c = constraints or Constraints()
    if deployments is not None:
        own = c.deployments
        c.deployments = [d for d in deployments if own is None or d in own] or ["(none)"]
    if tags is not None:
        own_tags = c.tags
        c.tags = [t for t in tags if own_tags is None or t in own_tags] or ["(none)"]
    return c


def _over_limit(subject: str, rpm: int | None, tpm: int | None, wait_s: float) -> JobError:
    scope, _, name = subject.partition(":")
    limits = ", ".join(f"{v} {k}" for k, v in (("requests", rpm), ("tokens", tpm)) if v)
    return job_error(
        ErrorKind.RATE_LIMITED,
        f"{scope} {name} is over its limit of {limits} a minute; "
        f"try again in {wait_s:.0f}s, or ask for a higher limit",
        retry_after_s=round(wait_s, 3),
    )


def _over_budget(budget: Budget, amount: Decimal) -> JobError:
    retry_after = None
    if budget.resets_at is not None:
        retry_after = max((budget.resets_at - datetime.now(UTC)).total_seconds(), 0.0)
    return job_error(
        ErrorKind.BUDGET_EXCEEDED, refusal_message(budget, amount), retry_after_s=retry_after
    )
