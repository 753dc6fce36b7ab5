"""JSON mode and structured outputs: the content parses and fits the schema."""

from __future__ import annotations

import json
from typing import Any, Literal

import pytest
from pydantic import BaseModel, Field

from modelyard.fake.schema import sample
from modelyard.fake.text import Entropy, digest_of
from tests.fake.conftest import FakeServer, user


class Address(BaseModel):
    street: str
    zip_code: str = Field(min_length=5, max_length=5)


class Person(BaseModel):
    name: str
    age: int = Field(ge=18, le=99)
    height_m: float = Field(gt=0)
    member: bool
    tags: list[str] = Field(min_length=2)
    role: Literal["admin", "user"]
    home: Address
    nickname: str | None


def json_schema_format(model: type[BaseModel]) -> dict[str, Any]:
    return {
        "type": "json_schema",
        "json_schema": {
            "name": model.__name__,
            "schema": model.model_json_schema(),
            "strict": True,
        },
    }


async def content(server: FakeServer, **request: Any) -> str:
    answer = await server.chat({"model": "gpt-4o", **request})
    assert answer.status == 200
    text: str = answer.json()["choices"][0]["message"]["content"]
    return text


@pytest.mark.asyncio
async def test_json_object_mode_answers_a_json_object(server: FakeServer) -> None:
    text = await content(
        server,
        messages=[user("Reply in JSON please.")],
        response_format={"type": "json_object"},
    )

    assert isinstance(json.loads(text), dict)


@pytest.mark.asyncio
async def test_json_schema_output_validates_against_the_schema(server: FakeServer) -> None:
    text = await content(
        server, messages=[user("Who is it?")], response_format=json_schema_format(Person)
    )

    person = Person.model_validate_json(text)
    assert person.role == "admin"
    assert len(person.tags) == 2


def test_sample_follows_refs_bounds_and_unions() -> None:
    schema = {
        "$defs": {
            "Item": {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
        },
        "type": "object",
        "properties": {
            "items": {"type": "array", "items": {"$ref": "#/$defs/Item"}, "minItems": 3},
            "score": {"type": "number", "exclusiveMinimum": 200, "maximum": 300},
            "maybe": {"anyOf": [{"type": "null"}, {"type": "string", "format": "date"}]},
            "kind": {"const": "fixed"},
            "either": {"type": ["null", "boolean"]},
            "optional": {"type": "string"},
        },
        "required": ["items", "score", "maybe", "kind", "either"],
    }

    value = sample(schema, Entropy(digest_of("seed")))

    assert sorted(value) == ["either", "items", "kind", "maybe", "score"]
    assert [sorted(item) for item in value["items"]] == [["n"], ["n"], ["n"]]
    assert all(isinstance(item["n"], int) for item in value["items"])
    assert 200 < value["score"] <= 300
    assert value["maybe"] == "2024-05-17"
    assert value["kind"] == "fixed"
    assert isinstance(value["either"], bool)


def test_sample_is_deterministic() -> None:
    schema = Person.model_json_schema()

    first = sample(schema, Entropy(digest_of("same")))
    again = sample(schema, Entropy(digest_of("same")))

    assert first == again
