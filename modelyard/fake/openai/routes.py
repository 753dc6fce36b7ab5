"""``POST /v1/chat/completions``: OpenAI's dialect for the shared request handler.

The handler (``modelyard.fake.handler``) owns the order of events; this
module says how OpenAI checks keys, which errors it answers with, which
headers it sends and how a malformed stream breaks (cut mid-chunk, no
``[DONE]``).
"""

from __future__ import annotations

import secrets

from aiohttp import web

from modelyard.fake.conversation import Reply
from modelyard.fake.dialect import WireError, cut_events
from modelyard.fake.handler import handler
from modelyard.fake.limits import RateLimits
from modelyard.fake.openai import errors, headers, render
from modelyard.fake.openai.errors import ApiError
from modelyard.fake.openai.parse import Parsed, parse
from modelyard.fake.screen import ContextWindow, Rejection
from modelyard.fake.settings import Fault
from modelyard.fake.validation import model_in_body

PATH = "/v1/chat/completions"
JSON = "application/json"
EVENT_STREAM = "text/event-stream; charset=utf-8"


def add_routes(app: web.Application) -> None:
    """Mount the OpenAI routes on app (which must hold a ``FakeState`` under ``STATE``)."""
    app.router.add_post(PATH, handler(OpenAIDialect()))


class OpenAIDialect:
    """OpenAI Chat Completions."""

    provider = "openai"

    def request_id(self) -> str:
        return f"req_{secrets.token_hex(16)}"

    def authorize(self, request: web.Request, api_key: str) -> WireError | None:
        authorization = request.headers.get("Authorization")
        if authorization == f"Bearer {api_key}":
            return None
        return errors.bad_api_key(authorization).wire()

    def parse(self, request: web.Request, body: bytes) -> Parsed | WireError:
        parsed = parse(body)
        return parsed.wire() if isinstance(parsed, ApiError) else parsed

    def requested_model(self, request: web.Request, body: bytes) -> str | None:
        return model_in_body(body)

    def reject(self, rejection: Rejection, parsed: Parsed) -> WireError | None:
        return reject(rejection).wire()

    def fault(self, fault: Fault, parsed: Parsed, retry_after_s: float) -> WireError | None:
        error = fault_error(fault, parsed.conversation.model, retry_after_s)
        return None if error is None else error.wire()

    def headers(
        self, request_id: str, elapsed_ms: int, limits: RateLimits, retry_after_s: float | None
    ) -> dict[str, str]:
        sent = headers.common(request_id, elapsed_ms, limits)
        if retry_after_s is not None:
            sent |= headers.retry_after(retry_after_s)
            sent["x-ratelimit-remaining-requests"] = "0"
        return sent

    def content_type(self, parsed: Parsed) -> str:
        return EVENT_STREAM if parsed.stream else JSON

    def body(self, reply: Reply, parsed: Parsed, request_id: str) -> bytes:
        return render.completion(reply, render.Envelope.new(parsed.conversation.model))

    def events(self, reply: Reply, parsed: Parsed, request_id: str) -> list[bytes]:
        envelope = render.Envelope.new(parsed.conversation.model)
        return render.events(reply, envelope, parsed.include_usage)

    def break_events(self, events: list[bytes]) -> list[bytes]:
        return cut_events(events)


def reject(rejection: Rejection) -> ApiError:
    """OpenAI's 400 for a prompt over the context window or against the usage policy."""
    if isinstance(rejection, ContextWindow):
        return errors.context_length(rejection.tokens, rejection.limit)
    return errors.content_policy()


def fault_error(fault: Fault, model: str, retry_after_s: float) -> ApiError | None:
    """The error a fault answers with; None for a hang or a malformed body."""
    if fault == "rate_limit":
        return errors.rate_limited(model, retry_after_s)
    if fault == "quota":
        return errors.quota_exceeded()
    if fault == "server_error":
        return errors.server_error()
    if fault == "overloaded":
        return errors.overloaded()
    return None
