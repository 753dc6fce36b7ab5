"""Mistral's error responses.

Most errors are ``{"object": "error", "message", "type", "param", "code"}``;
schema problems are 422s whose message holds pydantic's ``detail`` list
(``loc`` starting with "body", message items tagged by role); chat-template
problems are 400s (``invalid_request_message_order``, code "3230"); a wrong
key is answered by Mistral's gateway as ``{"message": "Unauthorized"}``.
"""

from __future__ import annotations

from typing import Any

import msgspec

from modelyard.fake.dialect import WireError
from modelyard.fake.mistral.wire import ROLE_TAGS, ErrorBody
from modelyard.fake.validation import Path, Problem, value_at

INVALID = "invalid_request_error"
MESSAGE_ORDER = "invalid_request_message_order"
_TYPES = {
    "int": ("int_type", "Input should be a valid integer"),
    "float": ("float_type", "Input should be a valid number"),
    "str": ("string_type", "Input should be a valid string"),
    "bool": ("bool_type", "Input should be a valid boolean"),
    "array": ("list_type", "Input should be a valid list"),
    "object": ("dict_type", "Input should be a valid dictionary"),
}
_encode = msgspec.json.Encoder().encode


def error(
    status: int, message: str | dict[str, Any], type_: str = INVALID, code: str | None = None
) -> WireError:
    """A Mistral error answer."""
    return WireError(status, _encode(ErrorBody("error", message, type_, None, code)))


def invalid(message: str) -> WireError:
    """A 400 invalid_request_error."""
    return error(400, message)


def message_order(message: str) -> WireError:
    return error(400, message, MESSAGE_ORDER, "3230")


def unauthorized() -> WireError:
    return WireError(401, _encode({"message": "Unauthorized"}))


def validation(detail: dict[str, Any]) -> WireError:
    """A 422 with one pydantic error."""
    return error(422, {"detail": [detail]})


def unparsable_body() -> WireError:
    return validation(
        {
            "type": "json_invalid",
            "loc": ["body", 0],
            "msg": "JSON decode error",
            "input": {},
            "ctx": {"error": "Expecting value"},
        }
    )


def from_problem(problem: Problem, body: bytes) -> WireError:
    """A decoding problem as pydantic reports it, quoting the offending input."""
    loc = _loc(problem.path, body)
    if problem.kind == "missing" and _is_role(problem.path):
        return validation(
            {
                "type": "union_tag_not_found",
                "loc": loc[:-1],
                "msg": "Unable to extract tag using discriminator 'role'",
                "input": value_at(body, problem.path[:-1]),
                "ctx": {"discriminator": "'role'"},
            }
        )
    if problem.kind == "missing":
        parent = value_at(body, problem.path[:-1])
        return validation({"type": "missing", "loc": loc, "msg": "Field required", "input": parent})
    value = value_at(body, problem.path)
    if problem.kind == "unknown":
        return validation(
            {
                "type": "extra_forbidden",
                "loc": loc,
                "msg": "Extra inputs are not permitted",
                "input": value,
            }
        )
    if problem.kind == "type" and problem.expected in _TYPES:
        kind, message = _TYPES[problem.expected]
        return validation({"type": kind, "loc": loc, "msg": message, "input": value})
    if _is_role(problem.path):
        expected = ", ".join(f"'{tag}'" for tag in ROLE_TAGS)
        return validation(
            {
                "type": "union_tag_invalid",
                "loc": loc[:-1],
                "msg": f"Input tag '{value}' found using 'role' does not match any of the"
                f" expected tags: {expected}",
                "input": value_at(body, problem.path[:-1]),
                "ctx": {"discriminator": "'role'", "tag": value, "expected_tags": expected},
            }
        )
    return validation({"type": "value_error", "loc": loc, "msg": problem.text, "input": value})


def enum(path: Path, value: object, allowed: tuple[str, ...]) -> WireError:
    """A 422 for a string outside its enumeration."""
    listing = ", ".join(f"'{v}'" for v in allowed[:-1]) + f" or '{allowed[-1]}'"
    return validation(
        {
            "type": "enum",
            "loc": ["body", *path],
            "msg": f"Input should be {listing}",
            "input": value,
            "ctx": {"expected": listing},
        }
    )


def tool_call_id(value: str) -> WireError:
    return invalid(f"Tool call id was {value} but must be a-z, A-Z, 0-9, with a length of 9.")


def context_length(tokens: int, limit: int) -> WireError:
    return invalid(
        f"Prompt contains {tokens} tokens and 0 draft tokens, too large for model with {limit}"
        " maximum context length"
    )


def content_policy() -> WireError:
    return invalid("Prompt was blocked by the moderation policy.")


def rate_limited() -> WireError:
    """The retryable 429; Mistral sends no retry-after."""
    return error(429, "Rate limit exceeded", "rate_limited", "1300")


def usage_limit() -> WireError:
    """The 429 that retrying does not fix: the workspace's monthly limit is spent."""
    return error(429, "Monthly usage limit exceeded", "usage_limit_exceeded")


def server_error() -> WireError:
    return error(500, "Internal server error", "internal_server_error")


def overloaded() -> WireError:
    return error(503, "Service tier capacity exceeded for this model.")


def _loc(path: Path, body: bytes) -> list[str | int]:
    """pydantic's location: "body" first, and each message's role after its index."""
    loc: list[str | int] = ["body", *path]
    if len(path) > 2 and path[0] == "messages" and isinstance(path[1], int):
        role = value_at(body, ("messages", path[1], "role"))
        if isinstance(role, str) and role in ROLE_TAGS:
            loc.insert(3, role)
    return loc


def _is_role(path: Path) -> bool:
    return len(path) == 3 and path[0] == "messages" and path[2] == "role"
