"""Tool calls: when the fake calls tools, which ones, and with what arguments."""

from __future__ import annotations

import json
from typing import Any

import pytest
from openai.types.chat import ChatCompletion

from tests.fake.conftest import FakeServer, tokens, user

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "detailed": {"type": "boolean"},
            },
            "required": ["city", "days", "unit"],
        },
    },
}
CLOCK = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string"}},
            "required": ["zone"],
        },
    },
}
QUESTION = [user("Weather and time in Paris?")]


async def completion(server: FakeServer, **request: Any) -> ChatCompletion:
    answer = await server.chat({"model": "gpt-4o", **request})
    assert answer.status == 200
    return ChatCompletion.model_validate(answer.json())


@pytest.mark.asyncio
async def test_two_tools_are_called_in_parallel_by_default(server: FakeServer) -> None:
    result = await completion(server, messages=QUESTION, tools=[WEATHER, CLOCK])

    choice = result.choices[0]
    calls = choice.message.tool_calls or []
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    assert [c.function.name for c in calls if c.type == "function"] == ["get_weather", "get_time"]
    assert all(c.id.startswith("call_") for c in calls)
    assert len({c.id for c in calls}) == 2


@pytest.mark.asyncio
async def test_arguments_hold_the_required_properties_with_their_types(
    server: FakeServer,
) -> None:
    result = await completion(server, messages=QUESTION, tools=[WEATHER])

    [call] = result.choices[0].message.tool_calls or []
    assert call.type == "function"
    arguments = json.loads(call.function.arguments)
    assert sorted(arguments) == ["city", "days", "unit"]
    assert isinstance(arguments["city"], str)
    assert isinstance(arguments["days"], int)
    assert 1 <= arguments["days"] <= 7
    assert arguments["unit"] == "celsius"


@pytest.mark.asyncio
async def test_tool_calls_are_deterministic(server: FakeServer) -> None:
    first = await completion(server, messages=QUESTION, tools=[WEATHER, CLOCK])
    again = await completion(server, messages=QUESTION, tools=[WEATHER, CLOCK])

    assert first.choices[0].message == again.choices[0].message


@pytest.mark.asyncio
async def test_one_call_when_parallel_calls_are_off(server: FakeServer) -> None:
    result = await completion(
        server, messages=QUESTION, tools=[WEATHER, CLOCK], parallel_tool_calls=False
    )

    calls = result.choices[0].message.tool_calls or []
    assert [c.function.name for c in calls if c.type == "function"] == ["get_weather"]


@pytest.mark.asyncio
async def test_named_tool_choice_calls_that_tool(server: FakeServer) -> None:
    choice = {"type": "function", "function": {"name": "get_time"}}

    result = await completion(server, messages=QUESTION, tools=[WEATHER, CLOCK], tool_choice=choice)

    calls = result.choices[0].message.tool_calls or []
    assert [c.function.name for c in calls if c.type == "function"] == ["get_time"]


@pytest.mark.asyncio
async def test_tool_choice_none_answers_with_text(server: FakeServer) -> None:
    result = await completion(server, messages=QUESTION, tools=[WEATHER], tool_choice="none")

    assert result.choices[0].message.tool_calls is None
    assert result.choices[0].message.content
    assert result.choices[0].finish_reason == "stop"


@pytest.mark.asyncio
async def test_after_the_tool_result_the_answer_is_text(server: FakeServer) -> None:
    first = await completion(server, messages=QUESTION, tools=[WEATHER])
    [call] = first.choices[0].message.tool_calls or []
    history = [
        *QUESTION,
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'},
    ]

    result = await completion(server, messages=history, tools=[WEATHER])

    assert result.choices[0].message.tool_calls is None
    assert result.choices[0].message.content
    assert result.choices[0].finish_reason == "stop"


@pytest.mark.asyncio
async def test_tool_call_usage_counts_name_and_arguments(server: FakeServer) -> None:
    answer = await server.chat({"model": "gpt-4o", "messages": QUESTION, "tools": [CLOCK]})

    body = answer.json()
    call = body["choices"][0]["message"]["tool_calls"][0]["function"]
    # 3 template tokens per call, then the name and the arguments
    expected = 3 + tokens("get_time") + tokens(call["arguments"])
    assert body["usage"]["completion_tokens"] == expected
