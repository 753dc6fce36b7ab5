"""Deterministic values that satisfy a JSON schema, for tool arguments and structured output.

Only the parts of JSON Schema that LLM APIs use are understood: types (also as
a list), enum, const, required properties, items, min/max bounds, anyOf/oneOf/
allOf (the first branch is taken) and local ``$ref`` into ``$defs`` or
``definitions``. Objects get their required properties only, which is always
valid and keeps the arguments predictable in tests.
"""

from __future__ import annotations

import math
from typing import Any

from modelyard.fake.text import Entropy

Schema = dict[str, Any]

_MAX_DEPTH = 16
_FORMATS = {
    "date": "2024-05-17",
    "date-time": "2024-05-17T09:30:00Z",
    "time": "09:30:00",
    "email": "someone@example.com",
    "uri": "https://example.com/",
    "uuid": "3f1c2a9e-8b4d-4e6f-9a1b-2c3d4e5f6a7b",
}


def sample(schema: Schema, entropy: Entropy) -> Any:
    """A value valid against schema, chosen by entropy."""
    return _Sampler(schema, entropy).value(schema, 0)


class _Sampler:
    """Walks a schema, resolving ``$ref`` against the root it started from."""

    def __init__(self, root: Schema, entropy: Entropy) -> None:
        self._root = root
        self._entropy = entropy

    def value(self, schema: Schema, depth: int) -> Any:
        """A value for one (sub)schema; past _MAX_DEPTH, recursion ends with an empty object."""
        schema = self._resolve(schema)
        if depth > _MAX_DEPTH:
            return {}
        if "const" in schema:
            return schema["const"]
        if schema.get("enum"):
            return schema["enum"][0]
        for combinator in ("anyOf", "oneOf", "allOf"):
            if schema.get(combinator):
                return self.value(_first_not_null(schema[combinator]), depth + 1)
        return self._typed(_type_of(schema), schema, depth)

    def _typed(self, kind: str, schema: Schema, depth: int) -> Any:
        """A value of one JSON type; null for a type the sampler does not know."""
        makers = {
            "object": self._object,
            "array": self._array,
            "string": self._string,
            "integer": self._integer,
            "number": self._number,
            "boolean": self._boolean,
        }
        maker = makers.get(kind)
        return maker(schema, depth) if maker else None

    def _object(self, schema: Schema, depth: int) -> dict[str, Any]:
        properties: dict[str, Schema] = schema.get("properties") or {}
        return {
            name: self.value(properties.get(name, {}), depth + 1)
            for name in schema.get("required") or ()
        }

    def _array(self, schema: Schema, depth: int) -> list[Any]:
        count = max(int(schema.get("minItems", 1)), 0)
        count = min(count, int(schema.get("maxItems", count)))
        items: Schema = schema.get("items") or {}
        return [self.value(items, depth + 1) for _ in range(count)]

    def _integer(self, schema: Schema, depth: int) -> int:
        return _bounded(self._entropy.byte() % 100, schema)

    def _number(self, schema: Schema, depth: int) -> float:
        return float(self._integer(schema, depth))

    def _boolean(self, schema: Schema, depth: int) -> bool:
        return self._entropy.byte() % 2 == 0

    def _string(self, schema: Schema, depth: int) -> str:
        text = _FORMATS.get(schema.get("format", ""), "") or self._entropy.word()
        while len(text) < int(schema.get("minLength", 0)):
            text += " " + self._entropy.word()
        return text[: int(schema.get("maxLength", len(text)))]

    def _resolve(self, schema: Schema) -> Schema:
        """Follow local ``$ref`` pointers ("#/$defs/Name"); unknown ones become an empty schema."""
        for _ in range(_MAX_DEPTH):
            ref = schema.get("$ref")
            if not isinstance(ref, str):
                return schema
            schema = _pointer(self._root, ref)
        return {}


def _pointer(root: Schema, ref: str) -> Schema:
    """The subschema a local JSON pointer names, or {} when it does not resolve."""
    node: Any = root
    for part in ref.removeprefix("#").strip("/").split("/"):
        if not part:
            continue
        node = (
            node.get(part.replace("~1", "/").replace("~0", "~")) if isinstance(node, dict) else None
        )
    return node if isinstance(node, dict) else {}


def _type_of(schema: Schema) -> str:
    """The JSON type to produce: the first non-null of a type list, else guessed from keywords."""
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if isinstance(kind, str):
        return kind
    if "properties" in schema or "required" in schema:
        return "object"
    if "items" in schema:
        return "array"
    return "string"


def _first_not_null(options: list[Schema]) -> Schema:
    """The first option that is not just ``{"type": "null"}``, so values stay informative."""
    return next((o for o in options if o.get("type") != "null"), options[0])


def _bounded(value: int, schema: Schema) -> int:
    """value moved inside the schema's numeric bounds, exclusive ones included."""
    lows = [math.ceil(b) for b in _numbers(schema, "minimum")]
    lows += [math.floor(b) + 1 for b in _numbers(schema, "exclusiveMinimum")]
    highs = [math.floor(b) for b in _numbers(schema, "maximum")]
    highs += [math.ceil(b) - 1 for b in _numbers(schema, "exclusiveMaximum")]
    return min([max([value, *lows]), *highs])


def _numbers(schema: Schema, keyword: str) -> list[float]:
    """The keyword's value as a one-item list when it is a number (draft 4 used booleans)."""
    bound = schema.get(keyword)
    return [bound] if isinstance(bound, int | float) and not isinstance(bound, bool) else []
