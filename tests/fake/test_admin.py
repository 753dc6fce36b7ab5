"""API key checks and the admin routes tests use to steer and observe the fake."""

from __future__ import annotations

import time

import pytest

from modelyard.fake import FakeSettings
from tests.fake.conftest import FakeServer, running, user

REQUEST = {"model": "gpt-4o", "messages": [user("Hello")]}
KEY = "sk-test-0123456789abcdef"


@pytest.mark.asyncio
async def test_api_key_is_required_when_set() -> None:
    async with running(FakeSettings(api_key=KEY)) as server:
        missing = await server.chat(REQUEST)
        wrong = await server.chat(REQUEST, {"Authorization": "Bearer sk-wrong-0123456789"})
        right = await server.chat(REQUEST, {"Authorization": f"Bearer {KEY}"})

    assert (missing.status, wrong.status, right.status) == (401, 401, 200)
    assert wrong.json() == {
        "error": {
            "message": "Incorrect API key provided: sk-wr***6789. You can find your API key at"
            " https://platform.openai.com/account/api-keys.",
            "type": "invalid_request_error",
            "param": None,
            "code": "invalid_api_key",
        }
    }
    assert missing.json()["error"]["message"].startswith("You didn't provide an API key.")
    assert missing.json()["error"]["code"] == "invalid_api_key"


@pytest.mark.asyncio
async def test_log_records_each_exchange(server: FakeServer) -> None:
    before = time.time()
    ok = await server.chat(REQUEST)
    await server.chat({**REQUEST, "stream": True, "model": "o4-mini"})
    await server.chat({"model": "gpt-4o"})

    entries = await server.log()

    assert [(e["model"], e["status"], e["stream"]) for e in entries] == [
        ("gpt-4o", 200, False),
        ("o4-mini", 200, True),
        ("gpt-4o", 400, False),
    ]
    first = entries[0]
    usage = ok.json()["usage"]
    assert first["request_id"] == ok.headers["x-request-id"]
    assert (first["provider"], first["path"], first["fault"]) == (
        "openai",
        "/v1/chat/completions",
        None,
    )
    assert (first["prompt_tokens"], first["completion_tokens"], first["cached_tokens"]) == (
        usage["prompt_tokens"],
        usage["completion_tokens"],
        0,
    )
    assert entries[1]["reasoning_tokens"] > 0
    assert before <= first["at"] <= entries[1]["at"] <= time.time()
    assert before <= first["received_at"] <= first["at"]


@pytest.mark.asyncio
async def test_log_can_be_cleared(server: FakeServer) -> None:
    await server.chat(REQUEST)

    async with server.session.delete(f"{server.base}/_fake/requests") as response:
        assert response.status == 204
    await server.chat(REQUEST)

    assert len(await server.log()) == 1


@pytest.mark.asyncio
async def test_settings_can_be_read_and_partly_replaced(server: FakeServer) -> None:
    updated = await server.configure(latency_ms=5, api_key="k")

    async with server.session.get(f"{server.base}/_fake/settings") as response:
        current = await response.json()

    assert updated == current
    assert current == {
        "latency_ms": 5,
        "jitter_ms": 0,
        "rate_429": 0,
        "retry_after_s": 1.0,
        "rate_quota": 0,
        "rate_500": 0,
        "rate_503": 0,
        "rate_hang": 0,
        "hang_s": 600,
        "rate_malformed": 0,
        "api_key": "k",
        "seed": 0,
        "context_window": 128_000,
        "stream_gap_ms": 0.0,
        "echo_key": False,
    }
    assert (await server.chat(REQUEST)).status == 401


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "patch",
    [{"rate_429": 1.5}, {"rate_429": 0.6, "rate_500": 0.6}, {"no_such_field": 1}, {"seed": "x"}],
)
async def test_invalid_settings_are_refused(server: FakeServer, patch: dict[str, object]) -> None:
    async with server.session.put(f"{server.base}/_fake/settings", json=patch) as response:
        status = response.status

    assert status == 400
    assert (await server.configure())["rate_429"] == 0


def test_settings_reject_rates_that_cannot_be_honoured() -> None:
    with pytest.raises(ValueError, match="at most 1"):
        FakeSettings(rate_429=0.5, rate_503=0.6)
