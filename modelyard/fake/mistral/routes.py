"""``POST /mistral/v1/chat/completions``: Mistral's dialect for the shared request handler.

Bearer auth as OpenAI; the request id is the completion's ``id`` and is sent
as ``mistral-correlation-id``. Content-policy and context-length refusals
are 400 ``invalid_request_error``s. Mistral sends per-minute rate-limit
headers but no ``retry-after``.
"""

from __future__ import annotations

import uuid

from aiohttp import web

from modelyard.fake.conversation import Reply
from modelyard.fake.dialect import WireError, cut_events
from modelyard.fake.handler import handler
from modelyard.fake.limits import RateLimits
from modelyard.fake.mistral import errors, render
from modelyard.fake.mistral.parse import Parsed, parse
from modelyard.fake.screen import ContextWindow, Rejection
from modelyard.fake.settings import Fault
from modelyard.fake.validation import model_in_body

PATH = "/mistral/v1/chat/completions"
JSON = "application/json"
EVENT_STREAM = "text/event-stream; charset=utf-8"


def add_routes(app: web.Application) -> None:
    """Mount the Mistral routes on app (which must hold a ``FakeState`` under ``STATE``)."""
    app.router.add_post(PATH, handler(MistralDialect()))


class MistralDialect:
    """Mistral chat completions."""

    provider = "mistral"

    def request_id(self) -> str:
        return uuid.uuid4().hex

    def authorize(self, request: web.Request, api_key: str) -> WireError | None:
        if request.headers.get("Authorization") == f"Bearer {api_key}":
            return None
        return errors.unauthorized()

    def parse(self, request: web.Request, body: bytes) -> Parsed | WireError:
        return parse(body)

    def requested_model(self, request: web.Request, body: bytes) -> str | None:
        return model_in_body(body)

    def reject(self, rejection: Rejection, parsed: Parsed) -> WireError | None:
        if isinstance(rejection, ContextWindow):
            return errors.context_length(rejection.tokens, rejection.limit)
        return errors.content_policy()

    def fault(self, fault: Fault, parsed: Parsed, retry_after_s: float) -> WireError | None:
        if fault == "rate_limit":
            return errors.rate_limited()
        if fault == "quota":
            return errors.usage_limit()
        if fault == "server_error":
            return errors.server_error()
        if fault == "overloaded":
            return errors.overloaded()
        return None

    def headers(
        self, request_id: str, elapsed_ms: int, limits: RateLimits, retry_after_s: float | None
    ) -> dict[str, str]:
        return {
            "mistral-correlation-id": request_id,
            "x-ratelimit-limit-req-minute": str(limits.requests.limit),
            "x-ratelimit-remaining-req-minute": str(limits.requests.remaining()),
            "x-ratelimit-limit-tokens-minute": str(limits.tokens.limit),
            "x-ratelimit-remaining-tokens-minute": str(limits.tokens.remaining()),
        }

    def content_type(self, parsed: Parsed) -> str:
        return EVENT_STREAM if parsed.stream else JSON

    def body(self, reply: Reply, parsed: Parsed, request_id: str) -> bytes:
        return render.completion(reply, parsed.conversation.model, request_id)

    def events(self, reply: Reply, parsed: Parsed, request_id: str) -> list[bytes]:
        return render.events(reply, parsed.conversation.model, request_id)

    def break_events(self, events: list[bytes]) -> list[bytes]:
        return cut_events(events)
