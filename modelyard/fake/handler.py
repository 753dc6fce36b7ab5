"""One request through any wire format: auth, validation, refusal, faults, latency, answer.

Order of events: the API key is checked, the body is parsed and validated,
then the prompt is screened (context window, content policy). Only requests
that pass all three roll the fault dice and sleep the latency, so a run's
fault sequence depends only on its valid requests. A refusal the provider
answers with a 200 (Anthropic, Gemini) is a valid answer and rolls the dice
like any other. Every exchange is logged when it ends, however it ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Generic

import msgspec
from aiohttp import web

from modelyard.fake.conversation import Reply
from modelyard.fake.dialect import Dialect, P, WireError
from modelyard.fake.reply import answer, refusal
from modelyard.fake.requestlog import Exchange
from modelyard.fake.screen import screen
from modelyard.fake.state import STATE, FakeState
from modelyard.fake.text import digest_of

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def handler(dialect: Dialect[P]) -> Handler:
    """An aiohttp handler answering requests in dialect's format."""

    async def handle(request: web.Request) -> web.StreamResponse:
        state = request.app[STATE]
        exchange = Exchange(dialect.request_id(), dialect.provider, request.path)
        try:
            return await _Call(state, exchange, dialect).handle(request)
        finally:
            state.log.record(exchange.entry())

    return handle


class _Call(Generic[P]):
    """One request in flight: the shared state, its log record, its dialect and start time."""

    __slots__ = ("dialect", "exchange", "started", "state")

    def __init__(self, state: FakeState, exchange: Exchange, dialect: Dialect[P]) -> None:
        self.state = state
        self.exchange = exchange
        self.dialect = dialect
        self.started = time.perf_counter()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """The auth error, the validation error, the refusal error, or the answer."""
        key = self.state.settings.api_key
        if key is not None and (error := self.dialect.authorize(request, key)) is not None:
            return self.error(error)
        if self.state.settings.echo_key and key is not None:
            return self.error(_echoing(key))
        body = await request.read()
        parsed = self.dialect.parse(request, body)
        if isinstance(parsed, WireError):
            self.exchange.model = self.dialect.requested_model(request, body)
            return self.error(parsed)
        self.exchange.model = parsed.conversation.model
        self.exchange.stream = parsed.stream
        self.exchange.prompt_digest = digest_of(
            *(turn.text for turn in parsed.conversation.turns)
        ).hex()[:32]
        rejection = screen(parsed.conversation, self.state.settings.context_window)
        if rejection is not None and (error := self.dialect.reject(rejection, parsed)) is not None:
            return self.error(error)
        return await self.deliver(request, parsed, refused=rejection is not None)

    async def deliver(self, request: web.Request, parsed: P, refused: bool) -> web.StreamResponse:
        """The answer after the fault roll and the latency (plus hang_s for a hang)."""
        dice = self.state.dice
        fault = self.exchange.fault = dice.draw()
        delay = dice.delay_s() + (dice.settings.hang_s if fault == "hang" else 0)
        if delay:
            await asyncio.sleep(delay)
        if fault is not None:
            error = self.dialect.fault(fault, parsed, dice.settings.retry_after_s)
            if error is not None:
                return self.error(error)
        conversation = parsed.conversation
        reply = refusal(conversation) if refused else answer(conversation, self.state.cache)
        self.exchange.reply = reply
        self.state.limits.take(reply.prompt_tokens + reply.completion_tokens)
        if parsed.stream:
            return await self.stream(request, parsed, reply)
        body = self.dialect.body(reply, parsed, self.exchange.request_id)
        if fault == "malformed":
            body = body[: len(body) // 2]
        headers = self.headers()
        headers["Content-Type"] = self.dialect.content_type(parsed)
        return self.respond(web.Response(body=body, headers=headers))

    async def stream(self, request: web.Request, parsed: P, reply: Reply) -> web.StreamResponse:
        """Send the first event at once (the first token), then the rest in one
        write, or one by one `stream_gap_ms` apart."""
        events = self.dialect.events(reply, parsed, self.exchange.request_id)
        if self.exchange.fault == "malformed":
            events = self.dialect.break_events(events)
        headers = self.headers()
        headers["Content-Type"] = self.dialect.content_type(parsed)
        headers["Cache-Control"] = "no-cache"
        response = web.StreamResponse(headers=headers)
        await response.prepare(request)
        self.exchange.status = response.status
        # A client that leaves mid-stream is no error: the log records the 200 it was sent.
        gap_s = self.state.settings.stream_gap_ms / 1000
        with contextlib.suppress(ConnectionResetError):
            if gap_s:  # a model generating slowly: one event at a time
                for event in events:
                    await response.write(event)
                    await asyncio.sleep(gap_s)
            else:
                await response.write(events[0])
                await response.write(b"".join(events[1:]))
            await response.write_eof()
        return response

    def error(self, error: WireError) -> web.Response:
        """An error response with the dialect's headers (and retry hints when it has them)."""
        self.state.limits.take(0)
        headers = self.headers(error.retry_after_s)
        headers["Content-Type"] = error.content_type
        return self.respond(web.Response(status=error.status, body=error.body, headers=headers))

    def respond(self, response: web.Response) -> web.Response:
        """Note the status for the log; the entry is written before aiohttp sends the bytes."""
        self.exchange.status = response.status
        return response

    def headers(self, retry_after_s: float | None = None) -> dict[str, str]:
        """The dialect's headers for this exchange as it stands now."""
        elapsed_ms = int((time.perf_counter() - self.started) * 1000)
        return self.dialect.headers(
            self.exchange.request_id, elapsed_ms, self.state.limits, retry_after_s
        )


def _echoing(key: str) -> WireError:
    """A 400 repeating `key` in every field of every provider's error shape."""
    detail = {"message": key, "type": key, "param": key, "code": key, "status": key}
    body = {"error": detail, "type": "error", "message": key, "code": key}
    return WireError(400, msgspec.json.encode(body), None)
