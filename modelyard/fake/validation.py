"""msgspec's validation errors, read into parts each wire format phrases its own way.

msgspec reports the first problem as text ("Expected `int`, got `str` - at
`$.messages[0].max_tokens`"). Providers word the same problem differently
(OpenAI names a param, Anthropic a dotted path, Mistral a pydantic ``loc``,
Google a proto field), so the text is parsed once here into a ``Problem``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

import msgspec

Kind = Literal["missing", "unknown", "type", "value"]
Path = tuple[str | int, ...]

_LOCATION = re.compile(r"^(?P<text>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.DOTALL)
_STEP = re.compile(r"\.([^.\[]+)|\[(\d+)\]")
_FIELD = re.compile(r"field `([^`]*)`")
_EXPECTED = re.compile(r"^Expected `([^`]*)`, got `([^`]*)`")


@dataclass(frozen=True, slots=True)
class Problem:
    """What is wrong and where.

    path leads to the offending value; for a missing or unknown field it ends
    with that field's name. expected and got are msgspec's type names
    ("int", "str", "array", "object"...) for a type problem, else empty.
    """

    kind: Kind
    path: Path
    text: str
    expected: str = ""
    got: str = ""


def problem(error: msgspec.ValidationError) -> Problem:
    """The problem msgspec found first."""
    match = _LOCATION.match(str(error))
    text = match["text"] if match else str(error)
    path = _path(match["path"] or "") if match else ()
    if text.startswith("Object missing required field"):
        return Problem("missing", (*path, _field(text)), text)
    if text.startswith("Object contains unknown field"):
        return Problem("unknown", (*path, _field(text)), text)
    if expected := _EXPECTED.match(text):
        return Problem("type", path, text, _not_null(expected[1]), expected[2])
    return Problem("value", path, text)


def value_at(body: bytes, path: Path) -> Any:
    """The JSON value at path in body, or None; for error messages that quote the input."""
    node: Any = msgspec.json.decode(body)
    for step in path:
        if isinstance(step, int) and isinstance(node, list) and step < len(node):
            node = node[step]
        elif isinstance(step, str) and isinstance(node, dict):
            node = node.get(step)
        else:
            return None
    return node


def dotted(path: Path) -> str:
    """path as "messages.0.content", the way pydantic-based APIs print a location."""
    return ".".join(str(step) for step in path)


def _path(location: str) -> Path:
    """ ".messages[0].role" as ("messages", 0, "role")."""
    return tuple(int(index) if index else name for name, index in _STEP.findall(location))


def _not_null(expected: str) -> str:
    """ "int | null" as "int": an optional field that got the wrong type expected the type."""
    kinds = [kind for kind in expected.split(" | ") if kind != "null"]
    return kinds[0] if len(kinds) == 1 else expected


def _field(text: str) -> str:
    match = _FIELD.search(text)
    return match[1] if match else ""


class _ModelOnly(msgspec.Struct):
    model: str | None = None


def model_in_body(body: bytes) -> str | None:
    """Best-effort model name of a JSON request body that failed to parse,
    for the request log (the providers that name the model in the body)."""
    try:
        return msgspec.json.decode(body, type=_ModelOnly).model
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
