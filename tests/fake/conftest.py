"""An in-process fake provider per test, and a small client for its routes."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest_asyncio
from multidict import CIMultiDict

from modelyard.fake import FakeSettings, start

CHAT = "/v1/chat/completions"
_TOKEN = re.compile(r"\w+|[^\w\s]")


def tokens(text: str) -> int:
    """The fake's documented tokenizer, written out again so tests check it independently."""
    return len(_TOKEN.findall(text))


def user(content: str | list[dict[str, Any]]) -> dict[str, Any]:
    return {"role": "user", "content": content}


class Answer:
    """One HTTP answer: status, headers and raw body."""

    def __init__(self, status: int, headers: CIMultiDict[str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body)


class FakeServer:
    """Calls to one running fake provider."""

    def __init__(self, session: aiohttp.ClientSession, base: str) -> None:
        self.session = session
        self.base = base

    async def chat(self, body: dict[str, Any], headers: dict[str, str] | None = None) -> Answer:
        return await self.post_raw(CHAT, aiohttp.JsonPayload(body), headers)

    async def post(
        self, path: str, body: dict[str, Any], headers: dict[str, str] | None = None
    ) -> Answer:
        """POST body as JSON to path (which may carry a query string)."""
        return await self.post_raw(path, aiohttp.JsonPayload(body), headers)

    async def post_raw(self, path: str, data: Any, headers: dict[str, str] | None = None) -> Answer:
        async with self.session.post(self.base + path, data=data, headers=headers) as response:
            body = await response.read()
            return Answer(response.status, CIMultiDict(response.headers), body)

    async def log(self) -> list[dict[str, Any]]:
        async with self.session.get(f"{self.base}/_fake/requests") as response:
            entries: list[dict[str, Any]] = await response.json()
            return entries

    async def configure(self, **settings: Any) -> dict[str, Any]:
        async with self.session.put(f"{self.base}/_fake/settings", json=settings) as response:
            response.raise_for_status()
            current: dict[str, Any] = await response.json()
            return current


def sse(body: bytes) -> list[tuple[str | None, str]]:
    """(event name, data) of each server-sent event, CRLF or LF framed."""
    text = body.decode().replace("\r\n", "\n")
    assert text.endswith("\n\n")
    events: list[tuple[str | None, str]] = []
    for block in text[:-2].split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.split("\n"))
        events.append((fields.get("event"), fields["data"]))
    return events


@asynccontextmanager
async def running(settings: FakeSettings) -> AsyncIterator[FakeServer]:
    """A fake provider on a free port for the duration of the block."""
    runner, port = await start("127.0.0.1", 0, settings)
    try:
        async with aiohttp.ClientSession() as session:
            yield FakeServer(session, f"http://127.0.0.1:{port}")
    finally:
        await runner.cleanup()


@pytest_asyncio.fixture
async def server() -> AsyncIterator[FakeServer]:
    """A fake provider with default settings (change them with ``configure``)."""
    async with running(FakeSettings()) as fake:
        yield fake
