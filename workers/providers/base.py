"""The adapter seam: pure translation functions plus one thin HTTP call.

An adapter turns a normalized `ChatRequest` into the provider's HTTP request,
and the provider's HTTP response into a normalized `ProviderReply` or a typed
`JobError`. Adapters never touch sockets (see `workers.transport`), so every
translation is tested as a plain function.
"""

from __future__ import annotations

import email.utils
import re
import time
from collections.abc import Mapping
from datetime import datetime
from typing import Any, Protocol

import msgspec

from modelyard.config import Deployment
from schemas.chat import ChatRequest
from schemas.errors import ErrorKind, JobError, job_error
from schemas.results import Completion, FinishReason, RateLimits, ToolCallDelta, Usage


class HttpRequest(msgspec.Struct, kw_only=True):
    """Everything the transport needs to make the call. Holds the API key:
    it lives only in worker memory and is never encoded into a message."""

    method: str
    url: str
    headers: dict[str, str]
    body: bytes


class HttpResponse(msgspec.Struct, kw_only=True):
    """A provider's answer; header names are lower-case."""

    status: int
    headers: Mapping[str, str]
    body: bytes


class ProviderReply(msgspec.Struct, kw_only=True):
    """A successful call, normalized. `raw_usage` is the provider's own usage
    object, kept for reconciliation with its invoices."""

    completion: Completion
    usage: Usage
    raw_usage: dict[str, Any]
    request_id: str | None = None


class StreamDelta(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One normalized piece of a streamed answer (OpenAI chunk semantics)."""

    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None
    finish_reason: FinishReason | None = None


class StreamDecoder(Protocol):
    """Reads one streamed response, event by event (SSE framing is the
    transport's job). Keeps what it needs to build the final reply."""

    def feed(self, event: str | None, data: str) -> list[StreamDelta]:
        """Deltas for one SSE event (`event:` name, if any, and its `data:`)."""
        ...

    def finish(self) -> ProviderReply | JobError:
        """The whole answer with usage, or the error the stream ended with
        (including an error event sent after HTTP 200)."""
        ...

    def usage_so_far(self) -> tuple[Usage, dict[str, Any]] | None:
        """Usage the provider reported before the stream broke off, if any:
        those tokens are billed even though the answer failed."""
        ...


class AdapterError(Exception):
    """Raised by an adapter's pure functions; carries the typed error."""

    def __init__(self, error: JobError) -> None:
        super().__init__(error.message)
        self.error = error


class Adapter(Protocol):
    """What every provider adapter provides."""

    @property
    def name(self) -> str:
        """The `provider` value deployments use."""
        ...

    @property
    def request_id_header(self) -> str | None:
        """The response header carrying the provider's request id (None: in the body)."""
        ...

    def check_deployment(self, deployment: Deployment) -> str | None:
        """What is missing from a deployment's config for this provider, if anything
        (checked when the config loads, so it never surfaces as a failed job)."""
        ...

    def build_request(
        self, request: ChatRequest, deployment: Deployment, api_key: str | None
    ) -> HttpRequest:
        """Translate a normalized request; raise `AdapterError` for what cannot map."""
        ...

    def parse_response(self, response: HttpResponse) -> ProviderReply | JobError:
        """Translate any provider response (success or error) into our terms."""
        ...

    def ignored(self, request: ChatRequest, deployment: Deployment) -> list[str]:
        """Parameters this job sets that the provider has no equivalent for and
        that are left out (best-effort hints such as `seed` or `user`): put on
        the result as warnings, so nothing is dropped silently."""
        ...

    def rate_limits(self, headers: Mapping[str, str]) -> RateLimits | None:
        """The provider's rate-limit headers, if it sends any."""
        ...

    def stream_decoder(self, request_id: str | None) -> StreamDecoder:
        """A decoder for one streamed 200 response (errors before the stream
        starts go through `parse_response`)."""
        ...


def retry_after_s(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds to wait, from `retry-after-ms`, or `retry-after` (seconds or an HTTP date)."""
    if (ms := headers.get("retry-after-ms")) is not None:
        try:
            return max(float(ms) / 1000, 0.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None
    return max(when - (time.time() if now is None else now), 0.0)


_DURATION = re.compile(r"(?P<value>\d+(?:\.\d+)?)(?P<unit>ms|h|m|s)")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def duration_s(text: str | None) -> float | None:
    """OpenAI's reset durations (`1s`, `6m0s`, `20ms`, `1h2m3.5s`) in seconds."""
    if not text:
        return None
    parts = _DURATION.findall(text)
    if not parts or "".join(v + u for v, u in parts) != text.strip():
        return None
    return sum(float(value) * _UNIT_S[unit] for value, unit in parts)


def seconds_until(timestamp: str | None, now: float | None = None) -> float | None:
    """Seconds from now to an RFC 3339 timestamp (Anthropic's resets)."""
    if not timestamp:
        return None
    try:
        when = datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None
    return max(when - (time.time() if now is None else now), 0.0)


def integer(text: str | None) -> int | None:
    """A header's integer value, or None when absent or not a number."""
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def openai_rate_limits(headers: Mapping[str, str]) -> RateLimits | None:
    """`x-ratelimit-*` headers (OpenAI, Azure and most compatible servers)."""
    limits = RateLimits(
        limit_requests=integer(headers.get("x-ratelimit-limit-requests")),
        remaining_requests=integer(headers.get("x-ratelimit-remaining-requests")),
        reset_requests_s=duration_s(headers.get("x-ratelimit-reset-requests")),
        limit_tokens=integer(headers.get("x-ratelimit-limit-tokens")),
        remaining_tokens=integer(headers.get("x-ratelimit-remaining-tokens")),
        reset_tokens_s=duration_s(headers.get("x-ratelimit-reset-tokens")),
        retry_after_s=retry_after_s(headers),
    )
    return limits if limits != RateLimits() else None


def options_problem(options: dict[str, Any], kind: type[msgspec.Struct]) -> str | None:
    """Why a deployment's `options` do not fit the provider's option struct
    (unknown keys included: a typo must not silently do nothing)."""
    try:
        msgspec.convert(options, kind)
    except msgspec.ValidationError as exc:
        text = str(exc)
        path, _, where = text.rpartition(" - at `$")
        return f"options{where.rstrip('`')}: {path}" if path else f"options: {text}"
    return None


def set_params(request: ChatRequest, names: tuple[str, ...]) -> list[str]:
    """Which of the named top-level request parameters the job sets."""
    return [name for name in names if getattr(request, name, None) is not None]


# How servers without structured error codes word these two refusals (vLLM,
# Mistral, Ollama, most OpenAI-compatible servers): read from the message.
_CONTEXT_WORDING = re.compile(
    r"maximum context length|context (?:length|window)|too (?:long|large) for (?:the )?model"
    r"|prompt is too long|exceeds the maximum number of tokens",
    re.IGNORECASE,
)
_POLICY_WORDING = re.compile(
    r"moderation|content (?:policy|filter|management)|safety system", re.IGNORECASE
)


def kind_from_wording(message: str) -> ErrorKind | None:
    """A context-window or content-policy refusal recognised by its wording."""
    if _CONTEXT_WORDING.search(message):
        return ErrorKind.CONTEXT_WINDOW_EXCEEDED
    if _POLICY_WORDING.search(message):
        return ErrorKind.CONTENT_POLICY
    return None


def error_for_status(
    status: int, message: str, code: str | None, headers: Mapping[str, str]
) -> JobError:
    """The taxonomy's reading of an HTTP status (a 400/413/422's wording may
    reveal a context-window or content-policy refusal); adapters refine it."""
    worded = kind_from_wording(message) if status in (400, 413, 422) else None
    kind = worded or {
        400: ErrorKind.BAD_REQUEST,
        401: ErrorKind.AUTH,
        403: ErrorKind.AUTH,
        404: ErrorKind.NOT_FOUND,
        408: ErrorKind.TIMEOUT,
        413: ErrorKind.CONTEXT_WINDOW_EXCEEDED,
        422: ErrorKind.BAD_REQUEST,
        429: ErrorKind.RATE_LIMITED,
        503: ErrorKind.OVERLOADED,
        529: ErrorKind.OVERLOADED,
    }.get(status, ErrorKind.SERVER_ERROR if status >= 500 else ErrorKind.BAD_REQUEST)
    return job_error(
        kind,
        message,
        provider_status=status,
        provider_code=code,
        retry_after_s=retry_after_s(headers),
    )


def malformed(status: int, detail: str) -> JobError:
    """A response we could not read: treated as a provider fault, so retryable."""
    return job_error(
        ErrorKind.SERVER_ERROR,
        f"provider returned an unreadable response: {detail}",
        provider_status=status,
    )
