"""``POST /v1/chat/completions``: auth, validation, faults, latency, then the answer.

Order of events for one request: the API key is checked (401), the body
is parsed and validated (400), then the dice pick a fault and the latency
is slept. Only valid requests roll the dice, so a run's fault sequence
depends only on its valid requests. Every exchange is logged when it ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time

from aiohttp import web

from modelyard.fake.conversation import Reply
from modelyard.fake.openai import errors, headers, render
from modelyard.fake.openai.errors import ApiError
from modelyard.fake.openai.parse import Parsed, parse, requested_model
from modelyard.fake.reply import answer
from modelyard.fake.requestlog import Exchange
from modelyard.fake.settings import Fault
from modelyard.fake.state import STATE, FakeState

PATH = "/v1/chat/completions"
_JSON = "application/json"
_STREAM_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}


def add_routes(app: web.Application) -> None:
    """Mount the OpenAI routes on app (which must hold a ``FakeState`` under ``STATE``)."""
    app.router.add_post(PATH, chat_completions)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """Answer one chat completion request and log it, however it ends."""
    state = request.app[STATE]
    exchange = Exchange(f"req_{secrets.token_hex(16)}", "openai", PATH)
    try:
        return await _Call(state, exchange).handle(request)
    finally:
        state.log.record(exchange.entry())


class _Call:
    """One request in flight: the shared state, its log record and its start time."""

    __slots__ = ("exchange", "started", "state")

    def __init__(self, state: FakeState, exchange: Exchange) -> None:
        self.state = state
        self.exchange = exchange
        self.started = time.perf_counter()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """401 for a wrong key, 400 for an invalid body, else the answer."""
        key = self.state.settings.api_key
        authorization = request.headers.get("Authorization")
        if key is not None and authorization != f"Bearer {key}":
            return self.error(errors.bad_api_key(authorization))
        body = await request.read()
        parsed = parse(body)
        if isinstance(parsed, ApiError):
            self.exchange.model = requested_model(body)
            return self.error(parsed)
        self.exchange.model = parsed.conversation.model
        self.exchange.stream = parsed.stream
        return await self.deliver(request, parsed)

    async def deliver(self, request: web.Request, parsed: Parsed) -> web.StreamResponse:
        """The answer after the fault roll and the latency (plus hang_s for a hang)."""
        dice = self.state.dice
        fault = self.exchange.fault = dice.draw()
        delay = dice.delay_s() + (dice.settings.hang_s if fault == "hang" else 0)
        if delay:
            await asyncio.sleep(delay)
        if (error := _fault_error(fault, parsed, dice.settings.retry_after_s)) is not None:
            return self.error(error)
        reply = self.exchange.reply = answer(parsed.conversation, self.state.cache)
        self.state.limits.take(reply.prompt_tokens + reply.completion_tokens)
        envelope = render.Envelope.new(parsed.conversation.model)
        if parsed.stream:
            return await self.stream(request, reply, envelope, parsed.include_usage)
        body = render.completion(reply, envelope)
        if fault == "malformed":
            body = body[: len(body) // 2]
        return self.respond(web.Response(body=body, content_type=_JSON, headers=self.headers()))

    async def stream(
        self, request: web.Request, reply: Reply, envelope: render.Envelope, include_usage: bool
    ) -> web.StreamResponse:
        """Send the role chunk at once (the first token), then the rest in one write.

        A malformed stream is cut in the middle of a chunk and never sends ``[DONE]``.
        """
        sse = render.events(reply, envelope, include_usage)
        if self.exchange.fault == "malformed":
            half = len(sse) // 2
            sse = [*sse[:half], sse[half][: len(sse[half]) // 2]]
        response = web.StreamResponse(headers={**_STREAM_HEADERS, **self.headers()})
        await response.prepare(request)
        self.exchange.status = response.status
        # A client that leaves mid-stream is no error: the log records the 200 it was sent.
        with contextlib.suppress(ConnectionResetError):
            await response.write(sse[0])
            await response.write(b"".join(sse[1:]))
            await response.write_eof()
        return response

    def error(self, error: ApiError) -> web.Response:
        """An OpenAI error response with the usual headers (and retry hints on a 429)."""
        self.state.limits.take(0)
        sent = self.headers()
        if error.code == "rate_limit_exceeded":
            sent |= headers.retry_after(self.state.settings.retry_after_s)
            sent["x-ratelimit-remaining-requests"] = "0"
        response = web.Response(
            status=error.status, body=error.body(), content_type=_JSON, headers=sent
        )
        return self.respond(response)

    def respond(self, response: web.Response) -> web.Response:
        """Note the status for the log; the entry is written before aiohttp sends the bytes."""
        self.exchange.status = response.status
        return response

    def headers(self) -> dict[str, str]:
        """The headers OpenAI puts on every answer."""
        elapsed_ms = int((time.perf_counter() - self.started) * 1000)
        return headers.common(self.exchange.request_id, elapsed_ms, self.state.limits)


def _fault_error(fault: Fault | None, parsed: Parsed, retry_after_s: float) -> ApiError | None:
    """The error a fault answers with; None for no fault, a hang or a malformed body."""
    if fault == "rate_limit":
        return errors.rate_limited(parsed.conversation.model, retry_after_s)
    if fault == "quota":
        return errors.quota_exceeded()
    if fault == "server_error":
        return errors.server_error()
    if fault == "overloaded":
        return errors.overloaded()
    return None
