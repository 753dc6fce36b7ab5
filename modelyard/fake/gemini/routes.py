"""``POST /v1beta/models/{model}:generateContent`` and ``:streamGenerateContent``: Gemini's dialect.

The key is read from ``x-goog-api-key`` or the ``key`` query parameter; a
wrong key is Google's 400 ``API_KEY_INVALID``, a missing one its 403. A
prompt that trips the content policy gets a 200 with
``promptFeedback.blockReason: SAFETY`` and no candidates (the prompt is
billed). The log's request id is the body's ``responseId``: Gemini sends no
request-id header. ``/v1/models/...`` is served the same way.
"""

from __future__ import annotations

from aiohttp import web

from modelyard.fake.conversation import Reply
from modelyard.fake.dialect import WireError, cut_events
from modelyard.fake.gemini import errors, render
from modelyard.fake.gemini.parse import Parsed, parse
from modelyard.fake.handler import handler
from modelyard.fake.ids import URLSAFE, random_id
from modelyard.fake.limits import RateLimits
from modelyard.fake.screen import ContextWindow, Rejection
from modelyard.fake.settings import Fault

PATHS = ("/v1beta/models/{target}", "/v1/models/{target}")
METHODS = {"generateContent": False, "streamGenerateContent": True}
EVENT_STREAM = "text/event-stream"


def add_routes(app: web.Application) -> None:
    """Mount the Gemini routes on app (which must hold a ``FakeState`` under ``STATE``)."""
    handle = handler(GeminiDialect())
    for path in PATHS:
        app.router.add_post(path, handle)


class GeminiDialect:
    """Gemini generateContent and streamGenerateContent."""

    provider = "gemini"

    def request_id(self) -> str:
        return random_id(22, URLSAFE)

    def authorize(self, request: web.Request, api_key: str) -> WireError | None:
        sent = request.headers.get("x-goog-api-key") or request.query.get("key")
        if sent == api_key:
            return None
        return errors.missing_api_key() if not sent else errors.bad_api_key()

    def parse(self, request: web.Request, body: bytes) -> Parsed | WireError:
        model, _, method = request.match_info["target"].rpartition(":")
        if method not in METHODS or not model:
            return errors.unknown_method(request.match_info["target"])
        sse = request.query.get("alt") == "sse"
        return parse(model.removeprefix("models/"), METHODS[method], sse, body)

    def requested_model(self, request: web.Request, body: bytes) -> str | None:
        return request.match_info["target"].rpartition(":")[0] or None

    def reject(self, rejection: Rejection, parsed: Parsed) -> WireError | None:
        if isinstance(rejection, ContextWindow):
            return errors.context_length(rejection.tokens, rejection.limit)
        return None

    def fault(self, fault: Fault, parsed: Parsed, retry_after_s: float) -> WireError | None:
        model = parsed.conversation.model
        if fault == "rate_limit":
            return errors.rate_limited(model, retry_after_s)
        if fault == "quota":
            return errors.quota_exceeded(model)
        if fault == "server_error":
            return errors.internal()
        if fault == "overloaded":
            return errors.unavailable()
        return None

    def headers(
        self, request_id: str, elapsed_ms: int, limits: RateLimits, retry_after_s: float | None
    ) -> dict[str, str]:
        # Google sends no rate-limit or retry headers: the delay is in the 429's RetryInfo.
        return {
            "Server-Timing": f"gfet4t7; dur={elapsed_ms}",
            "Vary": "Origin, X-Origin, Referer",
            "X-Content-Type-Options": "nosniff",
        }

    def content_type(self, parsed: Parsed) -> str:
        return EVENT_STREAM if parsed.stream and parsed.sse else errors.JSON

    def body(self, reply: Reply, parsed: Parsed, request_id: str) -> bytes:
        return render.response(reply, parsed.conversation.model, request_id)

    def events(self, reply: Reply, parsed: Parsed, request_id: str) -> list[bytes]:
        chunks = render.chunks(reply, parsed.conversation.model, request_id)
        return render.sse(chunks) if parsed.sse else render.json_array(chunks)

    def break_events(self, events: list[bytes]) -> list[bytes]:
        return cut_events(events)
