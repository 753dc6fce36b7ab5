"""The adapter seam: pure translation functions plus one thin HTTP call.

An adapter turns a normalized `ChatRequest` into the provider's HTTP request,
and the provider's HTTP response into a normalized `ProviderReply` or a typed
`JobError`. Adapters never touch sockets (see `workers.transport`), so every
translation is tested as a plain function.
"""

from __future__ import annotations

import email.utils
import time
from collections.abc import Mapping
from typing import Any, Protocol

import msgspec

from modelyard.config import Deployment
from schemas.chat import ChatRequest
from schemas.errors import ErrorKind, JobError, job_error
from schemas.results import Completion, FinishReason, ToolCallDelta, Usage


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


def error_for_status(
    status: int, message: str, code: str | None, headers: Mapping[str, str]
) -> JobError:
    """The taxonomy's default reading of an HTTP status; adapters refine it."""
    kind = {
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
