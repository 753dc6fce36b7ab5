"""What a wire format supplies to the shared request handler (``handler.py``).

A dialect is a set of pure functions over one provider's format: check the
key, parse a request into a ``Conversation``, name the error for a fault or a
refusal, and render a ``Reply`` as a body or as stream events. The handler
owns everything else (latency, the fault dice, the cache, the log), so every
provider gets the same behaviour and only the bytes differ.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, TypeVar

from aiohttp import web

from modelyard.fake.conversation import Conversation, Reply
from modelyard.fake.limits import RateLimits
from modelyard.fake.screen import Rejection
from modelyard.fake.settings import Fault


@dataclass(frozen=True, slots=True)
class WireError:
    """An error answer in some provider's format, ready to send.

    retry_after_s is set on errors that tell the client when to retry (a
    429), so the dialect can add its retry headers.
    """

    status: int
    body: bytes
    retry_after_s: float | None = None
    content_type: str = "application/json"


class Parsed(Protocol):
    """A valid request of any wire format: what to answer and whether to stream it."""

    @property
    def conversation(self) -> Conversation: ...

    @property
    def stream(self) -> bool: ...


P = TypeVar("P", bound=Parsed)


class Dialect(Protocol[P]):
    """One provider's wire format; P is its parsed request."""

    @property
    def provider(self) -> str:
        """The name the request log records."""
        ...

    def request_id(self) -> str:
        """A fresh id for one exchange, in the provider's format."""
        ...

    def authorize(self, request: web.Request, api_key: str) -> WireError | None:
        """The auth error when the request does not carry api_key the provider's way."""
        ...

    def parse(self, request: web.Request, body: bytes) -> P | WireError:
        """The request, or the validation error the real API would answer."""
        ...

    def requested_model(self, request: web.Request, body: bytes) -> str | None:
        """Best-effort model of a request that failed to parse, for the log."""
        ...

    def reject(self, rejection: Rejection, parsed: P) -> WireError | None:
        """The error for a refused request; None to answer with a refusal reply instead."""
        ...

    def fault(self, fault: Fault, parsed: P, retry_after_s: float) -> WireError | None:
        """The error an injected fault answers with; None for a hang or a malformed answer."""
        ...

    def headers(
        self, request_id: str, elapsed_ms: int, limits: RateLimits, retry_after_s: float | None
    ) -> dict[str, str]:
        """Headers every answer carries, errors included (with retry hints when given).

        A fresh dict: the handler adds Content-Type to it.
        """
        ...

    def content_type(self, parsed: P) -> str:
        """Content-Type of the answer to parsed, streamed or not."""
        ...

    def body(self, reply: Reply, parsed: P, request_id: str) -> bytes:
        """The body of a non-streamed answer."""
        ...

    def events(self, reply: Reply, parsed: P, request_id: str) -> list[bytes]:
        """The streamed answer, one element per event (the first is sent on its own)."""
        ...

    def break_events(self, events: list[bytes]) -> list[bytes]:
        """The events of a malformed stream: cut short, or ending in an error event."""
        ...


def cut_events(events: list[bytes]) -> list[bytes]:
    """The first half of events, then half of the next one: a stream broken mid-event."""
    half = len(events) // 2
    return [*events[:half], events[half][: len(events[half]) // 2]]
