"""The official OpenAI SDK, pointed at the fake, sees a real OpenAI."""

from __future__ import annotations

from collections.abc import AsyncIterator

import openai
import pytest
import pytest_asyncio
from openai import AsyncOpenAI

from modelyard.fake import FakeSettings
from tests.fake.conftest import FakeServer, running

KEY = "sk-fake-0123456789abcdef"


@pytest_asyncio.fixture
async def guarded() -> AsyncIterator[FakeServer]:
    async with running(FakeSettings(api_key=KEY)) as server:
        yield server


def client(server: FakeServer, key: str = KEY) -> AsyncOpenAI:
    return AsyncOpenAI(api_key=key, base_url=f"{server.base}/v1", max_retries=0)


@pytest.mark.asyncio
async def test_sdk_completion_and_stream_agree(guarded: FakeServer) -> None:
    async with client(guarded) as sdk:
        completion = await sdk.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "Hello"}]
        )
        stream = await sdk.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "Hello"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        pieces = [chunk async for chunk in stream]

    text = "".join(c.choices[0].delta.content or "" for c in pieces if c.choices)
    assert text == completion.choices[0].message.content
    assert pieces[-1].usage == completion.usage


@pytest.mark.asyncio
async def test_sdk_raises_its_typed_errors(guarded: FakeServer) -> None:
    messages: list[openai.types.chat.ChatCompletionMessageParam] = [
        {"role": "user", "content": "Hi"}
    ]
    async with client(guarded, key="sk-wrong-key-000000") as sdk:
        with pytest.raises(openai.AuthenticationError) as auth:
            await sdk.chat.completions.create(model="gpt-4o", messages=messages)
    async with client(guarded) as sdk:
        with pytest.raises(openai.BadRequestError) as bad:
            await sdk.chat.completions.create(model="gpt-4o", messages=[])
        await guarded.configure(rate_429=1.0)
        with pytest.raises(openai.RateLimitError) as limited:
            await sdk.chat.completions.create(model="gpt-4o", messages=messages)
        await guarded.configure(rate_429=0.0, rate_503=1.0)
        with pytest.raises(openai.InternalServerError) as overloaded:
            await sdk.chat.completions.create(model="gpt-4o", messages=messages)

    assert auth.value.code == "invalid_api_key"
    assert (bad.value.code, bad.value.param) == ("empty_array", "messages")
    assert limited.value.code == "rate_limit_exceeded"
    assert limited.value.response.headers["retry-after-ms"] == "1000"
    assert overloaded.value.status_code == 503
    assert auth.value.request_id is not None


@pytest.mark.asyncio
async def test_sdk_parses_structured_output(guarded: FakeServer) -> None:
    from pydantic import BaseModel  # noqa: PLC0415

    class Forecast(BaseModel):
        city: str
        celsius: float
        rain: bool

    async with client(guarded) as sdk:
        completion = await sdk.chat.completions.parse(
            model="gpt-4o",
            messages=[{"role": "user", "content": "Forecast?"}],
            response_format=Forecast,
        )

    assert isinstance(completion.choices[0].message.parsed, Forecast)
