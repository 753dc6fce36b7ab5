"""Injected faults: each with OpenAI's status, body and headers, reproducible from the seed."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp
import pytest

from tests.fake.conftest import CHAT, FakeServer, user

REQUEST = {"model": "gpt-4o", "messages": [user("Hello")]}


def openai_error(message: str, type_: str, code: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


@pytest.mark.asyncio
async def test_rate_limit_is_a_retryable_429_with_retry_hints(server: FakeServer) -> None:
    await server.configure(rate_429=1.0, retry_after_s=2.5)

    answer = await server.chat(REQUEST)

    assert answer.status == 429
    assert answer.json() == openai_error(
        "Rate limit reached for gpt-4o in organization org-fake on requests per min (RPM):"
        " Limit 10000, Used 10000, Requested 1. Please try again in 2.5s. Visit"
        " https://platform.openai.com/account/rate-limits to learn more.",
        "requests",
        "rate_limit_exceeded",
    )
    assert answer.headers["retry-after"] == "3"
    assert answer.headers["retry-after-ms"] == "2500"
    assert answer.headers["x-ratelimit-remaining-requests"] == "0"
    assert answer.headers["x-request-id"].startswith("req_")


@pytest.mark.asyncio
async def test_quota_is_a_429_without_retry_hints(server: FakeServer) -> None:
    await server.configure(rate_quota=1.0)

    answer = await server.chat(REQUEST)

    assert answer.status == 429
    assert answer.json() == openai_error(
        "You exceeded your current quota, please check your plan and billing details. For more"
        " information on this error, read the docs:"
        " https://platform.openai.com/docs/guides/error-codes/api-errors.",
        "insufficient_quota",
        "insufficient_quota",
    )
    assert "retry-after" not in answer.headers


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("setting", "status", "message"),
    [
        (
            "rate_500",
            500,
            "The server had an error while processing your request. Sorry about that!",
        ),
        ("rate_503", 503, "The engine is currently overloaded, please try again later."),
    ],
)
async def test_server_errors_have_openais_bodies(
    server: FakeServer, setting: str, status: int, message: str
) -> None:
    await server.configure(**{setting: 1.0})

    answer = await server.chat(REQUEST)

    assert (answer.status, answer.json()) == (status, openai_error(message, "server_error", None))


@pytest.mark.asyncio
async def test_malformed_is_a_200_whose_json_is_cut_short(server: FakeServer) -> None:
    await server.configure(rate_malformed=1.0)

    answer = await server.chat(REQUEST)

    assert answer.status == 200
    assert answer.headers["Content-Type"] == "application/json"
    assert answer.body.startswith(b'{"id":"chatcmpl-')
    with pytest.raises(json.JSONDecodeError):
        json.loads(answer.body)
    [entry] = await server.log()
    assert (entry["status"], entry["fault"]) == (200, "malformed")


@pytest.mark.asyncio
async def test_malformed_stream_breaks_off_without_done(server: FakeServer) -> None:
    await server.configure(rate_malformed=1.0)

    answer = await server.chat({**REQUEST, "stream": True})

    assert answer.status == 200
    events = answer.body.decode().split("\n\n")
    assert "data: [DONE]" not in events
    with pytest.raises(json.JSONDecodeError):
        json.loads(events[-1].removeprefix("data: "))


@pytest.mark.asyncio
async def test_hang_answers_normally_after_hang_s(server: FakeServer) -> None:
    await server.configure(rate_hang=1.0, hang_s=0.3)

    started = time.monotonic()
    answer = await server.chat(REQUEST)

    assert time.monotonic() - started >= 0.3
    assert answer.status == 200
    [entry] = await server.log()
    assert (entry["status"], entry["fault"]) == (200, "hang")


@pytest.mark.asyncio
async def test_abandoned_hang_is_logged_when_the_client_leaves(server: FakeServer) -> None:
    await server.configure(rate_hang=1.0, hang_s=60)

    with pytest.raises(TimeoutError):
        await server.session.post(
            server.base + CHAT, json=REQUEST, timeout=aiohttp.ClientTimeout(total=0.2)
        )
    entries = await _wait_for_log(server)

    assert [(e["status"], e["fault"], e["completion_tokens"]) for e in entries] == [
        (499, "hang", 0)
    ]


@pytest.mark.asyncio
async def test_latency_delays_the_answer(server: FakeServer) -> None:
    await server.configure(latency_ms=200)

    started = time.monotonic()
    answer = await server.chat(REQUEST)

    assert time.monotonic() - started >= 0.2
    assert int(answer.headers["openai-processing-ms"]) >= 200


@pytest.mark.asyncio
async def test_jitter_stays_within_its_bounds(server: FakeServer) -> None:
    await server.configure(latency_ms=100, jitter_ms=50)

    for _ in range(3):
        answer = await server.chat(REQUEST)
        assert 50 <= int(answer.headers["openai-processing-ms"]) <= 200


@pytest.mark.asyncio
async def test_faults_replay_from_the_seed(server: FakeServer) -> None:
    settings = {"seed": 42, "rate_429": 0.3, "rate_500": 0.2}

    await server.configure(**settings)
    first = [(await server.chat(REQUEST)).status for _ in range(30)]
    await server.configure(**settings)
    again = [(await server.chat(REQUEST)).status for _ in range(30)]
    await server.configure(seed=43)
    other = [(await server.chat(REQUEST)).status for _ in range(30)]

    assert first == again
    assert other != first
    assert {200, 429, 500} == set(first)


@pytest.mark.asyncio
async def test_faults_are_logged_by_name(server: FakeServer) -> None:
    for setting in ("rate_429", "rate_quota", "rate_500", "rate_503"):
        await server.configure(**{setting: 1.0})
        await server.chat(REQUEST)
        await server.configure(**{setting: 0.0})

    entries = await server.log()

    assert [(e["fault"], e["status"]) for e in entries] == [
        ("rate_limit", 429),
        ("quota", 429),
        ("server_error", 500),
        ("overloaded", 503),
    ]


async def _wait_for_log(server: FakeServer) -> list[dict[str, Any]]:
    """The log once it has an entry (the server notices a disconnect a moment later)."""
    for _ in range(100):
        if entries := await server.log():
            return entries
        await asyncio.sleep(0.02)
    return []
