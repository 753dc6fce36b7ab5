"""Streamed answers: OpenAI's chunk sequence, reassembling to the non-streamed answer."""

from __future__ import annotations

import json
from typing import Any

import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from tests.fake.conftest import FakeServer, user
from tests.fake.test_tools import CLOCK, QUESTION, WEATHER

ESSAY = [user("Write a little about queues.")]


def sse_data(body: bytes) -> list[str]:
    """The data lines of a server-sent event stream, in order."""
    events = body.decode().split("\n\n")
    assert events[-1] == ""
    assert all(event.startswith("data: ") for event in events[:-1])
    return [event.removeprefix("data: ") for event in events[:-1]]


async def stream(server: FakeServer, **request: Any) -> list[ChatCompletionChunk]:
    answer = await server.chat({"model": "gpt-4o", "stream": True, **request})
    assert answer.status == 200
    assert answer.headers["Content-Type"] == "text/event-stream; charset=utf-8"
    data = sse_data(answer.body)
    assert data[-1] == "[DONE]"
    return [ChatCompletionChunk.model_validate(json.loads(line)) for line in data[:-1]]


async def whole(server: FakeServer, **request: Any) -> ChatCompletion:
    answer = await server.chat({"model": "gpt-4o", **request})
    return ChatCompletion.model_validate(answer.json())


@pytest.mark.asyncio
async def test_streamed_text_reassembles_to_the_non_streamed_answer(server: FakeServer) -> None:
    chunks = await stream(server, messages=ESSAY)
    expected = await whole(server, messages=ESSAY)

    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].choices[0].delta.content == ""
    assert [c.choices[0].finish_reason for c in chunks] == [None] * (len(chunks) - 1) + ["stop"]
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].id.startswith("chatcmpl-")
    assert all(c.object == "chat.completion.chunk" for c in chunks)


@pytest.mark.asyncio
async def test_one_chunk_per_token(server: FakeServer) -> None:
    chunks = await stream(server, messages=ESSAY, stream_options={"include_usage": True})

    content_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert chunks[-1].usage is not None
    assert len(content_chunks) == chunks[-1].usage.completion_tokens


@pytest.mark.asyncio
async def test_usage_comes_last_when_asked_for(server: FakeServer) -> None:
    chunks = await stream(server, messages=ESSAY, stream_options={"include_usage": True})
    expected = await whole(server, messages=ESSAY)

    *body, last = chunks
    assert last.choices == []
    assert last.usage == expected.usage
    assert all(c.usage is None for c in body)
    assert body[-1].choices[0].finish_reason == "stop"


@pytest.mark.asyncio
async def test_no_usage_field_unless_asked_for(server: FakeServer) -> None:
    answer = await server.chat({"model": "gpt-4o", "stream": True, "messages": ESSAY})

    assert all("usage" not in json.loads(line) for line in sse_data(answer.body)[:-1])


@pytest.mark.asyncio
async def test_streamed_truncation_ends_with_length(server: FakeServer) -> None:
    chunks = await stream(server, messages=ESSAY, max_tokens=3)

    assert len([c for c in chunks if c.choices[0].delta.content]) == 3
    assert chunks[-1].choices[0].finish_reason == "length"


@pytest.mark.asyncio
async def test_streamed_tool_calls_follow_openais_delta_protocol(server: FakeServer) -> None:
    chunks = await stream(server, messages=QUESTION, tools=[WEATHER, CLOCK])
    expected = await whole(server, messages=QUESTION, tools=[WEATHER, CLOCK])

    calls: dict[int, dict[str, str]] = {}
    for chunk in chunks:
        for delta in chunk.choices[0].delta.tool_calls or []:
            if delta.id is not None:  # the first delta of a call carries id, type and name
                assert delta.type == "function"
                assert delta.function is not None
                assert delta.function.name is not None
                calls[delta.index] = {"id": delta.id, "name": delta.function.name, "args": ""}
            assert delta.function is not None
            calls[delta.index]["args"] += delta.function.arguments or ""
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].choices[0].delta.tool_calls is not None
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert [
        {"id": c.id, "name": c.function.name, "args": c.function.arguments}
        for c in expected.choices[0].message.tool_calls or []
        if c.type == "function"
    ] == [calls[0], calls[1]]
