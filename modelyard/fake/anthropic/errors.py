"""Anthropic's error responses: ``{"type": "error", "error": {"type", "message"}}``.

Validation messages follow the real API, which reports pydantic-style
problems as ``<dotted.path>: <message>`` (``max_tokens: Field required``).
"""

from __future__ import annotations

import msgspec

from modelyard.fake.anthropic.wire import ErrorBody, ErrorDetail
from modelyard.fake.dialect import WireError
from modelyard.fake.validation import Problem, dotted

INVALID = "invalid_request_error"
_RATE_LIMITS_URL = "https://docs.claude.com/en/api/rate-limits"
_NOUNS = {
    "int": "integer",
    "float": "number",
    "str": "string",
    "bool": "boolean",
    "array": "list",
    "object": "dictionary",
    "null": "null",
}
_encode = msgspec.json.Encoder().encode


def error(status: int, type_: str, message: str, retry_after_s: float | None = None) -> WireError:
    """An Anthropic error answer."""
    return WireError(status, _encode(ErrorBody(ErrorDetail(type_, message))), retry_after_s)


def invalid(message: str) -> WireError:
    """A 400 invalid_request_error."""
    return error(400, INVALID, message)


def missing_version() -> WireError:
    return invalid("anthropic-version: header is required")


def missing_key() -> WireError:
    return error(401, "authentication_error", "x-api-key header is required")


def bad_key() -> WireError:
    return error(401, "authentication_error", "invalid x-api-key")


def unparsable_body() -> WireError:
    return invalid("There was an error parsing the body of your request: invalid JSON")


def from_problem(problem: Problem) -> WireError:
    """A decoding problem worded as the real API words it."""
    path = dotted(problem.path)
    if not path:
        return invalid("Input should be a valid dictionary or object to extract fields from")
    if problem.kind == "missing":
        return invalid(f"{path}: Field required")
    if problem.kind == "unknown":
        return invalid(f"{path}: Extra inputs are not permitted")
    if problem.kind == "type":
        return invalid(f"{path}: Input should be a valid {_NOUNS.get(problem.expected, 'value')}")
    return invalid(f"{path}: {problem.text}")


def prompt_too_long(tokens: int, limit: int) -> WireError:
    """The prompt does not fit the context window."""
    return invalid(f"prompt is too long: {tokens} tokens > {limit} maximum")


def rate_limited(retry_after_s: float) -> WireError:
    """The retryable 429; the handler adds ``retry-after``."""
    return error(
        429,
        "rate_limit_error",
        "This request would exceed the rate limit for your organization"
        " (1b9d6bcd-bbfd-4b2d-9b5d-ab8dfbbd4bed) of 10,000 requests per minute. For details,"
        f" refer to: {_RATE_LIMITS_URL}. You can see the response headers for current usage."
        " Please reduce the prompt length or the maximum tokens requested, or try again later."
        " You may also contact sales at https://www.anthropic.com/contact-sales to discuss your"
        " options for a rate limit increase.",
        retry_after_s,
    )


def billing() -> WireError:
    """The 402 that retrying does not fix: the account is out of credit."""
    return error(
        402,
        "billing_error",
        "Your credit balance is too low to access the Anthropic API. Please go to Plans &"
        " Billing to upgrade or purchase credits.",
    )


def api_error() -> WireError:
    """Anthropic's 500."""
    return error(500, "api_error", "Internal server error")


def overloaded() -> WireError:
    """Anthropic's 529."""
    return error(529, "overloaded_error", "Overloaded")


def overloaded_event() -> bytes:
    """The ``error`` event that ends a stream which failed after its 200."""
    body = _encode(ErrorBody(ErrorDetail("overloaded_error", "Overloaded")))
    return b"event: error\ndata: " + body + b"\n\n"
