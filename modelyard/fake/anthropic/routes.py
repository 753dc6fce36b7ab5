"""``POST /v1/messages``: Anthropic's dialect for the shared request handler.

The key is read from ``x-api-key`` or an ``Authorization: Bearer`` header,
``anthropic-version`` is required. A
prompt that trips the content policy is answered the way current Claude
models refuse: a 200 with ``stop_reason: "refusal"`` and no content (the
prompt is billed). A malformed stream ends, after some deltas, with an
``error`` event carrying ``overloaded_error``, as real streams fail.
"""

from __future__ import annotations

from aiohttp import web

from modelyard.fake.anthropic import errors, headers, render
from modelyard.fake.anthropic.parse import Parsed, parse
from modelyard.fake.conversation import Reply
from modelyard.fake.dialect import WireError
from modelyard.fake.handler import handler
from modelyard.fake.ids import BASE58, random_id
from modelyard.fake.limits import RateLimits
from modelyard.fake.screen import ContextWindow, Rejection
from modelyard.fake.settings import Fault
from modelyard.fake.validation import model_in_body

PATH = "/v1/messages"
JSON = "application/json"
EVENT_STREAM = "text/event-stream; charset=utf-8"


def add_routes(app: web.Application) -> None:
    """Mount the Anthropic routes on app (which must hold a ``FakeState`` under ``STATE``)."""
    app.router.add_post(PATH, handler(AnthropicDialect()))


class AnthropicDialect:
    """Anthropic Messages."""

    provider = "anthropic"

    def request_id(self) -> str:
        return f"req_01{random_id(22, BASE58)}"

    def authorize(self, request: web.Request, api_key: str) -> WireError | None:
        # Current SDKs send the key as a bearer token; older clients use x-api-key.
        bearer = request.headers.get("Authorization", "").removeprefix("Bearer ")
        sent = request.headers.get("x-api-key") or bearer
        if sent == api_key:
            return None
        return errors.missing_key() if not sent else errors.bad_key()

    def parse(self, request: web.Request, body: bytes) -> Parsed | WireError:
        return parse(request.headers, body)

    def requested_model(self, request: web.Request, body: bytes) -> str | None:
        return model_in_body(body)

    def reject(self, rejection: Rejection, parsed: Parsed) -> WireError | None:
        if isinstance(rejection, ContextWindow):
            return errors.prompt_too_long(rejection.tokens, rejection.limit)
        return None

    def fault(self, fault: Fault, parsed: Parsed, retry_after_s: float) -> WireError | None:
        if fault == "rate_limit":
            return errors.rate_limited(retry_after_s)
        if fault == "quota":
            return errors.billing()
        if fault == "server_error":
            return errors.api_error()
        if fault == "overloaded":
            return errors.overloaded()
        return None

    def headers(
        self, request_id: str, elapsed_ms: int, limits: RateLimits, retry_after_s: float | None
    ) -> dict[str, str]:
        sent = headers.common(request_id, limits)
        if retry_after_s is not None:
            sent |= headers.retry_after(retry_after_s)
        return sent

    def content_type(self, parsed: Parsed) -> str:
        return EVENT_STREAM if parsed.stream else JSON

    def body(self, reply: Reply, parsed: Parsed, request_id: str) -> bytes:
        return render.message(reply, parsed.conversation.model, _message_id())

    def events(self, reply: Reply, parsed: Parsed, request_id: str) -> list[bytes]:
        return render.events(reply, parsed.conversation.model, _message_id())

    def break_events(self, events: list[bytes]) -> list[bytes]:
        return [*events[: len(events) // 2], errors.overloaded_event()]


def _message_id() -> str:
    return f"msg_01{random_id(22, BASE58)}"
