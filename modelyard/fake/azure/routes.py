"""``POST /openai/deployments/{deployment}/chat/completions``: Azure OpenAI's dialect.

The key is read from ``api-key`` (a bearer token equal to the key is
accepted too, as Entra tokens are). Every deployment name is accepted and
answers as the model of that name. A missing ``api-version`` is answered
like Azure does, with a 404 "Resource not found"; a malformed one with a
400. A prompt that trips the content policy gets Azure's 400
``content_filter``; a prompt over the context window OpenAI's
``context_length_exceeded``.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass

from aiohttp import web

from modelyard.fake.azure import errors, render
from modelyard.fake.conversation import Conversation, Reply
from modelyard.fake.dialect import WireError, cut_events
from modelyard.fake.handler import handler
from modelyard.fake.limits import RateLimits
from modelyard.fake.openai import errors as openai_errors
from modelyard.fake.openai import headers as openai_headers
from modelyard.fake.openai.errors import ApiError
from modelyard.fake.openai.parse import parse
from modelyard.fake.openai.render import Envelope
from modelyard.fake.openai.routes import EVENT_STREAM, JSON
from modelyard.fake.screen import ContextWindow, Rejection
from modelyard.fake.settings import Fault

PATH = "/openai/deployments/{deployment}/chat/completions"
REGION = "Sweden Central"
_API_VERSION = re.compile(r"\d{4}-\d{2}-\d{2}(-preview)?|preview|latest")


@dataclass(frozen=True, slots=True)
class Parsed:
    """A valid request, with the API version it named."""

    conversation: Conversation
    stream: bool
    include_usage: bool
    api_version: str


def add_routes(app: web.Application) -> None:
    """Mount the Azure routes on app (which must hold a ``FakeState`` under ``STATE``)."""
    app.router.add_post(PATH, handler(AzureDialect()))


class AzureDialect:
    """Azure OpenAI chat completions."""

    provider = "azure"

    def request_id(self) -> str:
        return str(uuid.uuid4())

    def authorize(self, request: web.Request, api_key: str) -> WireError | None:
        sent = request.headers
        if sent.get("api-key") == api_key or sent.get("Authorization") == f"Bearer {api_key}":
            return None
        return errors.unauthorized()

    def parse(self, request: web.Request, body: bytes) -> Parsed | WireError:
        version = request.query.get("api-version")
        if version is None:
            return errors.resource_not_found()
        if not _API_VERSION.fullmatch(version):
            return errors.unsupported_version()
        parsed = parse(body, model=request.match_info["deployment"])
        if isinstance(parsed, ApiError):
            return parsed.wire()
        return Parsed(parsed.conversation, parsed.stream, parsed.include_usage, version)

    def requested_model(self, request: web.Request, body: bytes) -> str | None:
        return request.match_info["deployment"]

    def reject(self, rejection: Rejection, parsed: Parsed) -> WireError | None:
        if isinstance(rejection, ContextWindow):
            return openai_errors.context_length(rejection.tokens, rejection.limit).wire()
        return errors.content_filter()

    def fault(self, fault: Fault, parsed: Parsed, retry_after_s: float) -> WireError | None:
        if fault == "rate_limit":
            return errors.rate_limited(parsed.api_version, retry_after_s)
        if fault == "quota":
            return openai_errors.quota_exceeded().wire()
        if fault == "server_error":
            return errors.server_error()
        if fault == "overloaded":
            return openai_errors.overloaded().wire()
        return None

    def headers(
        self, request_id: str, elapsed_ms: int, limits: RateLimits, retry_after_s: float | None
    ) -> dict[str, str]:
        sent = {
            "apim-request-id": request_id,
            "x-request-id": request_id,
            "x-ms-region": REGION,
            "x-ratelimit-limit-requests": str(limits.requests.limit),
            "x-ratelimit-limit-tokens": str(limits.tokens.limit),
            "x-ratelimit-remaining-requests": str(limits.requests.remaining()),
            "x-ratelimit-remaining-tokens": str(limits.tokens.remaining()),
        }
        if retry_after_s is not None:
            sent |= openai_headers.retry_after(retry_after_s)
            sent["x-ratelimit-remaining-requests"] = "0"
        return sent

    def content_type(self, parsed: Parsed) -> str:
        return EVENT_STREAM if parsed.stream else JSON

    def body(self, reply: Reply, parsed: Parsed, request_id: str) -> bytes:
        return render.completion(reply, Envelope.new(parsed.conversation.model))

    def events(self, reply: Reply, parsed: Parsed, request_id: str) -> list[bytes]:
        envelope = Envelope.new(parsed.conversation.model)
        return render.events(reply, envelope, parsed.include_usage)

    def break_events(self, events: list[bytes]) -> list[bytes]:
        return cut_events(events)
