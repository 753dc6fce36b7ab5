"""Google's error responses: ``{"error": {"code", "message", "status", "details"?}}``.

Google pretty-prints error bodies with two-space indentation and sends them
as ``application/json; charset=UTF-8``; so does the fake. Request problems
are worded like the Generative Language API words them, field paths in
snake_case (``generation_config.max_output_tokens``).
"""

from __future__ import annotations

import math
import re
from typing import Any

import msgspec

from modelyard.fake.dialect import WireError
from modelyard.fake.gemini.wire import ErrorBody, Status
from modelyard.fake.validation import Path, Problem, value_at

JSON = "application/json; charset=UTF-8"
_SERVICE = "generativelanguage.googleapis.com"
_RATE_LIMITS_URL = "https://ai.google.dev/gemini-api/docs/rate-limits"
_TYPES = {"int": "TYPE_INT32", "float": "TYPE_FLOAT", "str": "TYPE_STRING", "bool": "TYPE_BOOL"}
_CAMEL = re.compile(r"(?<!^)(?=[A-Z])")
_encode = msgspec.json.Encoder().encode


def error(
    code: int,
    status: str,
    message: str,
    details: list[dict[str, Any]] | None = None,
    retry_after_s: float | None = None,
) -> WireError:
    """A Google error answer."""
    body = ErrorBody(Status(code, message, status, details if details else msgspec.UNSET))
    return WireError(
        code, msgspec.json.format(_encode(body), indent=2) + b"\n", retry_after_s, JSON
    )


def invalid(message: str) -> WireError:
    """A 400 INVALID_ARGUMENT."""
    return error(400, "INVALID_ARGUMENT", message)


def field_problem(field: str, message: str) -> WireError:
    """A 400 about one field, in the ``* Request.field: message`` form."""
    return invalid(f"* GenerateContentRequest.{field}: {message}\n")


def bad_api_key() -> WireError:
    """Google answers a wrong key with a 400, not a 401; the reason says what happened."""
    message = "API key not valid. Please pass a valid API key."
    return error(
        400,
        "INVALID_ARGUMENT",
        message,
        [
            {
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": "API_KEY_INVALID",
                "domain": "googleapis.com",
                "metadata": {"service": _SERVICE},
            },
            {
                "@type": "type.googleapis.com/google.rpc.LocalizedMessage",
                "locale": "en-US",
                "message": message,
            },
        ],
    )


def missing_api_key() -> WireError:
    return error(
        403,
        "PERMISSION_DENIED",
        "Method doesn't allow unregistered callers (callers without established identity)."
        " Please use API Key or other form of API consumer identity to call this API.",
    )


def unknown_method(method: str) -> WireError:
    return error(404, "NOT_FOUND", f"Method not found: {method}.")


def unparsable_body() -> WireError:
    return invalid("Invalid JSON payload received. Unexpected token.")


def from_problem(problem: Problem, body: bytes) -> WireError:
    """A decoding problem worded as Google's JSON parser words it, quoting the bad value."""
    field = snake_path(problem.path)
    if problem.kind == "type" and problem.expected in _TYPES:
        value = _encode(value_at(body, problem.path)).decode()
        return invalid(f"Invalid value at '{field}' ({_TYPES[problem.expected]}), {value}")
    if problem.kind == "type" and problem.expected == "array":
        return invalid(
            f"Invalid JSON payload received. Unknown name \"{_last(field)}\" at '{_parent(field)}':"
            " Proto field is not repeating, cannot start list."
        )
    return invalid(f"Invalid JSON payload received. Invalid value at '{field}'.")


def snake_path(path: Path) -> str:
    """("generationConfig", "maxOutputTokens") as "generation_config.max_output_tokens"."""
    text = ""
    for step in path:
        if isinstance(step, int):
            text += f"[{step}]"
        else:
            text += ("." if text else "") + _CAMEL.sub("_", step).lower()
    return text


def context_length(tokens: int, limit: int) -> WireError:
    return invalid(
        f"The input token count ({tokens}) exceeds the maximum number of tokens allowed ({limit})."
    )


def rate_limited(model: str, retry_after_s: float) -> WireError:
    """The retryable 429: a per-minute quota, with the delay in a RetryInfo detail."""
    return _exhausted(model, "GenerateRequestsPerMinutePerProjectPerModel-FreeTier", retry_after_s)


def quota_exceeded(model: str) -> WireError:
    """The 429 retrying soon does not fix: the daily quota is spent (no RetryInfo)."""
    return _exhausted(model, "GenerateRequestsPerDayPerProjectPerModel-FreeTier", None)


def internal() -> WireError:
    return error(
        500,
        "INTERNAL",
        "An internal error has occurred. Please retry or report in"
        " https://developers.generativeai.google/guide/troubleshooting",
    )


def unavailable() -> WireError:
    return error(503, "UNAVAILABLE", "The model is overloaded. Please try again later.")


def _exhausted(model: str, quota_id: str, retry_after_s: float | None) -> WireError:
    details: list[dict[str, Any]] = [
        {
            "@type": "type.googleapis.com/google.rpc.QuotaFailure",
            "violations": [
                {
                    "quotaMetric": f"{_SERVICE}/generate_content_free_tier_requests",
                    "quotaId": quota_id,
                    "quotaDimensions": {"location": "global", "model": model},
                    "quotaValue": "10",
                }
            ],
        },
        {
            "@type": "type.googleapis.com/google.rpc.Help",
            "links": [
                {"description": "Learn more about Gemini API quotas", "url": _RATE_LIMITS_URL}
            ],
        },
    ]
    if retry_after_s is not None:
        details.append(
            {
                "@type": "type.googleapis.com/google.rpc.RetryInfo",
                "retryDelay": _duration(retry_after_s),
            }
        )
    return error(
        429,
        "RESOURCE_EXHAUSTED",
        "You exceeded your current quota, please check your plan and billing details. For more"
        f" information on this error, head to: {_RATE_LIMITS_URL}.",
        details,
        retry_after_s,
    )


def _duration(seconds: float) -> str:
    """A protobuf Duration in JSON: "38s", or "1.5s"."""
    return f"{seconds:g}s" if seconds != math.floor(seconds) else f"{int(seconds)}s"


def _last(field: str) -> str:
    return field.rpartition(".")[2]


def _parent(field: str) -> str:
    return field.rpartition(".")[0]
