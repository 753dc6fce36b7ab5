"""Batch-lane job claims against the real database: which copies are skipped."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import msgspec
import pytest
import pytest_asyncio

from modelyard.client import new_job
from schemas.chat import Message
from schemas.errors import ErrorKind
from schemas.jobs import Attempt, CompletionJob, Route
from workers.claims import Claims

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest_asyncio.fixture(loop_scope="session")
async def claims(database_url: str) -> AsyncIterator[Claims]:
    """The claim table as a worker sees it."""
    table = Claims(database_url)
    yield table
    await table.close()


def routed(job: CompletionJob, at: float, *, repeat: bool = False) -> CompletionJob:
    """A copy of `job` as a router that routed it at `at` sends it."""
    return msgspec.structs.replace(
        job,
        route=Route(deployment="mini", pool="main", routed_at=at),
        redelivered=repeat,
        attempts=list(job.attempts),
    )


def fresh(count: int) -> list[CompletionJob]:
    return [
        new_job("fast", [Message(role="user", content=f"claim {i}")], job_id=uuid.uuid4().hex)
        for i in range(count)
    ]


async def test_a_router_repeat_of_a_claimed_job_is_skipped(claims: Claims) -> None:
    jobs = fresh(3)
    first = [routed(job, 1.0) for job in jobs]
    assert await claims.repeats(first) == set()
    # The next router routes the first two again (marked), and a third
    # job it never saw before.
    extra = fresh(1)
    again = [routed(job, 2.0, repeat=True) for job in [*jobs[:2], *extra]]
    assert await claims.repeats(again) == {jobs[0].id, jobs[1].id}


async def test_the_same_routing_delivered_again_runs(claims: Claims) -> None:
    """A copy from the routing that claimed the job (a worker died holding
    it, or handed it back unstarted) must run: it may never have finished."""
    jobs = [routed(job, 1.0) for job in fresh(2)]
    await claims.repeats(jobs)
    same = [routed(job, 1.0, repeat=True) for job in jobs]
    assert await claims.repeats(same) == set()


async def test_a_producer_reusing_an_id_is_not_skipped(claims: Claims) -> None:
    jobs = fresh(1)
    await claims.repeats([routed(jobs[0], 1.0)])
    assert await claims.repeats([routed(jobs[0], 5.0)]) == set()


async def test_a_resent_message_skips_only_jobs_another_copy_claimed(claims: Claims) -> None:
    jobs = fresh(2)
    await claims.repeats([routed(jobs[0], 1.0)])
    copy = [routed(job, 1.0) for job in jobs]
    assert await claims.repeats(copy, resent=True) == {jobs[0].id}


async def test_an_unreachable_database_skips_nothing_and_never_raises() -> None:
    claims = Claims("postgresql://postgres@127.0.0.1:1/nowhere")
    jobs = [routed(job, 2.0, repeat=True) for job in fresh(2)]
    assert await claims.repeats(jobs) == set()
    await claims.close()


async def test_a_first_copy_arriving_after_its_repeat_ran_is_skipped(claims: Claims) -> None:
    """The repeat went to another pool and was claimed first: the first copy,
    arriving later, must not run the job again."""
    jobs = fresh(1)
    assert await claims.repeats([routed(jobs[0], 2.0, repeat=True)]) == set()
    assert await claims.repeats([routed(jobs[0], 1.0)]) == {jobs[0].id}


async def test_jobs_handed_back_unstarted_are_released(claims: Claims) -> None:
    """A stopping worker hands back jobs it claimed but never started; even
    if that hand-back is resent after a lost confirm, the copy runs."""
    jobs = [routed(job, 1.0) for job in fresh(2)]
    await claims.repeats(jobs)
    await claims.release(jobs[:1])
    assert await claims.repeats(jobs, resent=True) == {jobs[1].id}


async def test_a_retried_job_is_a_new_claim(claims: Claims) -> None:
    job = routed(fresh(1)[0], 1.0)
    await claims.repeats([job])
    retried = routed(job, 5.0, repeat=True)
    retried.attempts.append(
        Attempt(
            deployment="mini",
            provider="openai",
            started_at=1.0,
            finished_at=2.0,
            outcome="error",
            error=ErrorKind.RATE_LIMITED,
        )
    )
    assert await claims.repeats([retried]) == set()
