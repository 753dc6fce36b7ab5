"""OpenAI's error responses, with the messages, types and codes the real API uses.

OpenAI sends error bodies pretty-printed with four-space indentation; so does
the fake, in case a client matches on the raw text.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgspec

from modelyard.fake.dialect import WireError
from modelyard.fake.openai.headers import format_duration
from modelyard.fake.openai.wire import ErrorBody, ErrorDetail

_INVALID = "invalid_request_error"
_KEYS_URL = "https://platform.openai.com/account/api-keys"
_encode = msgspec.json.Encoder().encode


@dataclass(frozen=True, slots=True)
class ApiError:
    """An error answer: HTTP status and OpenAI's error object (with retry hints for a 429)."""

    status: int
    message: str
    type: str = _INVALID
    param: str | None = None
    code: str | None = None
    retry_after_s: float | None = None

    def body(self) -> bytes:
        """The JSON body, formatted the way OpenAI formats it."""
        detail = ErrorDetail(self.message, self.type, self.param, self.code)
        return msgspec.json.format(_encode(ErrorBody(detail)), indent=4) + b"\n"

    def wire(self) -> WireError:
        """The error ready to send."""
        return WireError(self.status, self.body(), self.retry_after_s)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    """A 400 invalid_request_error."""
    return ApiError(400, message, param=param, code=code)


def missing(param: str) -> ApiError:
    """A required parameter is absent."""
    return bad_request(
        f"Missing required parameter: '{param}'.", param, "missing_required_parameter"
    )


def invalid_value(param: str, value: str, supported: tuple[str, ...]) -> ApiError:
    """A parameter has a value outside its enumeration."""
    return bad_request(
        f"Invalid value: '{value}'. Supported values are: {_listing(supported)}.",
        param,
        "invalid_value",
    )


def unparsable_body() -> ApiError:
    """The body is not JSON at all."""
    return bad_request(
        "We could not parse the JSON body of your request. (HINT: This likely means you"
        " aren't using your HTTP library correctly. The OpenAI API expects a JSON payload,"
        " but what was sent was not valid JSON. If you have trouble figuring out how to"
        " fix this, please contact us through our help center at help.openai.com.)"
    )


def wrong_type(error: msgspec.ValidationError) -> ApiError:
    """A field has the wrong JSON type, or a nested required field is absent."""
    text, _, path = str(error).partition(" - at `$")
    param = path.rstrip("`").lstrip(".")
    if not param:  # the body itself is not an object: OpenAI cannot parse it either
        return unparsable_body()
    if text.startswith("Object missing required field `"):
        field = text.removeprefix("Object missing required field `").rstrip("`")
        return missing(f"{param}.{field}")
    return bad_request(
        f"Invalid type for '{param}': {text[:1].lower()}{text[1:]}.", param, "invalid_type"
    )


def bad_api_key(authorization: str | None) -> ApiError:
    """401 for a missing or wrong ``Authorization: Bearer`` key."""
    if not authorization:
        message = (
            "You didn't provide an API key. You need to provide your API key in an"
            " Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
            f" You can obtain an API key from {_KEYS_URL}."
        )
    else:
        key = authorization.removeprefix("Bearer ").strip()
        message = (
            f"Incorrect API key provided: {_redact(key)}. You can find your API key at {_KEYS_URL}."
        )
    return ApiError(401, message, code="invalid_api_key")


def rate_limited(model: str, retry_after_s: float) -> ApiError:
    """The retryable 429: too many requests per minute."""
    return ApiError(
        429,
        f"Rate limit reached for {model} in organization org-fake on requests per min (RPM):"
        f" Limit 10000, Used 10000, Requested 1. Please try again in"
        f" {format_duration(retry_after_s)}. Visit https://platform.openai.com/account/"
        "rate-limits to learn more.",
        type="requests",
        code="rate_limit_exceeded",
        retry_after_s=retry_after_s,
    )


def quota_exceeded() -> ApiError:
    """The 429 that retrying does not fix: the account is out of credit."""
    return ApiError(
        429,
        "You exceeded your current quota, please check your plan and billing details. For"
        " more information on this error, read the docs:"
        " https://platform.openai.com/docs/guides/error-codes/api-errors.",
        type="insufficient_quota",
        code="insufficient_quota",
    )


def server_error() -> ApiError:
    """OpenAI's 500."""
    return ApiError(
        500,
        "The server had an error while processing your request. Sorry about that!",
        type="server_error",
    )


def overloaded() -> ApiError:
    """OpenAI's 503."""
    return ApiError(
        503,
        "The engine is currently overloaded, please try again later.",
        type="server_error",
    )


def content_policy() -> ApiError:
    """The prompt tripped the safety system."""
    return bad_request(
        "Your request was rejected as a result of our safety system. Your prompt may contain"
        " text that is not allowed by our safety system.",
        code="content_policy_violation",
    )


def context_length(tokens: int, limit: int) -> ApiError:
    """The prompt does not fit the model's context window."""
    return bad_request(
        f"This model's maximum context length is {limit} tokens. However, your messages"
        f" resulted in {tokens} tokens. Please reduce the length of the messages.",
        "messages",
        "context_length_exceeded",
    )


def _listing(values: tuple[str, ...]) -> str:
    """'a', 'b', and 'c' — OpenAI's way of listing supported values."""
    quoted = [f"'{v}'" for v in values]
    return ", ".join(quoted[:-1]) + f", and {quoted[-1]}" if len(quoted) > 1 else quoted[0]


def _redact(key: str) -> str:
    """Key with its middle masked, as OpenAI shows it (sk-ab***wxyz)."""
    return f"{key[:5]}***{key[-4:]}" if len(key) > 12 else "***"
